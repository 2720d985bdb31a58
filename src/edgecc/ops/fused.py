"""edgecc's own fused ops (domain `edgecc`): a Conv or Gemm with its epilogue, created by the fuse-epilogues pass.

    edgecc.FusedConv(X, W, B?, Z?)         = activation(Conv(X, W, B) + Z)
    edgecc.FusedGemm(A, B, C?)             = activation(Gemm(A, B, C))
    edgecc.FusedMatMul(A, B, bias?, Z?)    = activation(MatMul(A, B) + bias + Z)

Z is a residual of the output's exact shape; a MatMul bias is a vector over the output's last axis. The activation is one of ACTIVATIONS, its parameters in
`activation_params` in the order listed there (Clip: min, max). Each fused op is defined by the ONNX ops it
replaces: its reference runs theirs, and `expand` writes it back as them (for ONNX export).
"""

from __future__ import annotations

import numpy as np

from edgecc.ops.common import tensor
from edgecc.ops.conv import CONV_ATTRS, _infer_conv, stored_weight_ok
from edgecc.ops.linalg import _infer_gemm, _infer_matmul
from edgecc.ops.registry import EDGECC_DOMAIN, AttrSpec, Call, get, op

ACTIVATIONS: dict[str, dict[str, float]] = {
    "Relu": {},
    "LeakyRelu": {"alpha": 0.01},
    "Clip": {"min": -np.inf, "max": np.inf},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "HardSwish": {},
    "Sigmoid": {},
    "Tanh": {},
    "Gelu": {},
}
"""Activations an epilogue applies: name -> {parameter: default}. Clip's bounds are inputs in ONNX, the others'
parameters attributes."""

EPILOGUE_ATTRS = {"activation": AttrSpec("string", ""), "activation_params": AttrSpec("floats", ())}


def activation_params(name: str, params) -> dict[str, float]:
    """{parameter: value} of an activation from its `activation_params` list (defaults for missing ones)."""
    names = list(ACTIVATIONS[name])
    values = list(params or ())
    return {k: float(values[i]) if i < len(values) else float(ACTIVATIONS[name][k]) for i, k in enumerate(names)}


def apply_activation(call: Call, y: np.ndarray) -> np.ndarray:
    """The ONNX reference of the call's activation applied to y."""
    name = call.attrs.get("activation", "")
    if not name:
        return y
    if name not in ACTIVATIONS:
        call.bad_attr(f"unknown activation '{name}'", hint=f"use one of {', '.join(ACTIVATIONS)}")
    params = activation_params(name, call.attrs.get("activation_params"))
    if name == "Clip":
        inner = Call("Clip", [y, np.array(params["min"], y.dtype), np.array(params["max"], y.dtype)], {})
    else:
        inner = Call(name, [y], get(name).complete_attrs(params))
    return get(name).run_reference(inner)[0]


def _same_as_output(call: Call, z, out) -> None:
    if z is not None and (z.shape != out.shape or z.dtype != out.dtype):
        call.fail(f"residual Z {z.dtype.name}{list(z.shape)} does not match the output {out.dtype.name}"
                  f"{list(out.shape)}")


def _infer_fused_conv(call: Call):
    (out,) = _infer_conv(call)
    _same_as_output(call, call.input(3), out)
    return [tensor(out.dtype, out.shape)]


@op("FusedConv", infer=_infer_fused_conv, attrs={**CONV_ATTRS, **EPILOGUE_ATTRS}, inputs=(2, 4), kind="conv",
    domain=EDGECC_DOMAIN)
def fused_conv(call: Call):
    """activation(Conv(X, W, B) + Z): a convolution with its residual Add and activation (fuse-epilogues)."""
    conv_attrs = {k: v for k, v in call.attrs.items() if k in CONV_ATTRS}
    y = get("Conv").run_reference(Call("Conv", call.inputs[:3], conv_attrs, where=call.where))[0]
    z = call.input(3)
    if z is not None:
        y = (y + z).astype(y.dtype, copy=False)
    return [apply_activation(call, y)]


@op("FusedGemm", infer=_infer_gemm, inputs=(2, 3), domain=EDGECC_DOMAIN,
    attrs={"alpha": AttrSpec("float", 1.0), "beta": AttrSpec("float", 1.0), "transA": AttrSpec("int", 0),
           "transB": AttrSpec("int", 0), **EPILOGUE_ATTRS})
def fused_gemm(call: Call):
    """activation(Gemm(A, B, C)): a matrix product with its bias or residual (C) and activation."""
    gemm_attrs = {k: v for k, v in call.attrs.items() if k not in EPILOGUE_ATTRS}
    y = get("Gemm").run_reference(Call("Gemm", call.inputs, gemm_attrs, where=call.where))[0]
    return [apply_activation(call, y)]


def _infer_fused_matmul(call: Call):
    (out,) = _infer_matmul(Call("MatMul", call.inputs[:2], {}, where=call.where))
    bias = call.input(2)
    if bias is not None and (bias.shape != (out.shape[-1],) or not stored_weight_ok(out.dtype, bias.dtype)):
        call.fail(f"bias {bias.dtype.name}{list(bias.shape)} is not a vector of the output's last axis "
                  f"({out.dtype.name}[{out.shape[-1]}])")
    _same_as_output(call, call.input(3), out)
    return [tensor(out.dtype, out.shape)]


@op("FusedMatMul", infer=_infer_fused_matmul, inputs=(2, 4), domain=EDGECC_DOMAIN, attrs=dict(EPILOGUE_ATTRS))
def fused_matmul(call: Call):
    """activation(MatMul(A, B) + bias + Z): a matrix product with its bias, residual and activation."""
    y = get("MatMul").run_reference(Call("MatMul", call.inputs[:2], {}, where=call.where))[0]
    for extra in (call.input(2), call.input(3)):
        if extra is not None:
            y = (y + extra).astype(y.dtype, copy=False)
    return [apply_activation(call, y)]


BASE_OP = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}
"""Each fused op and the ONNX op at its core."""

PREVIOUS = None
"""In `onnx_stages`, the input that is the previous stage's result."""


def onnx_stages(op_name: str, inputs: list, attrs: dict) -> list[tuple[str, list, dict]]:
    """The ONNX ops a fused node stands for, in order: [(op, inputs, attrs)]. Inputs are the node's own (values),
    PREVIOUS for the previous stage's result, or NumPy arrays for new constants (Clip bounds)."""
    base_attrs = {k: v for k, v in attrs.items() if k not in EPILOGUE_ATTRS}
    core = list(inputs[:3])
    while core and core[-1] is None:
        core.pop()
    if op_name == "FusedMatMul":
        core = list(inputs[:2])
    stages = [(BASE_OP[op_name], core, base_attrs)]
    if op_name == "FusedMatMul" and len(inputs) > 2 and inputs[2] is not None:
        stages.append(("Add", [PREVIOUS, inputs[2]], {}))
    if op_name in ("FusedConv", "FusedMatMul") and len(inputs) > 3 and inputs[3] is not None:
        stages.append(("Add", [PREVIOUS, inputs[3]], {}))
    act = attrs.get("activation", "")
    if act:
        params = activation_params(act, attrs.get("activation_params"))
        if act == "Clip":
            stages.append(("Clip", [PREVIOUS, np.float32(params["min"]), np.float32(params["max"])], {}))
        else:
            stages.append((act, [PREVIOUS], params))
    return stages
