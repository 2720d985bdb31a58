"""edgecc's integer elementwise ops for int8 graphs: each one is defined as the QDQ computation it replaces
(DequantizeLinear -> float op -> QuantizeLinear, with the registry's own references), so the references are exact
by definition and lower-qdq may swap the float pattern for them.

    edgecc.QLinearAdd(A, a_scale, a_zp, B, b_scale, b_zp, y_scale, y_zp)   activation='' | 'Relu' | 'Clip'
        y = Q(act(DQ(A) + DQ(B)))      multidirectional broadcasting; float32 steps, round half to even
    edgecc.QLinearMul(...)             the same with DQ(A) * DQ(B)
    edgecc.QLookup(X, table, x_scale?, x_zp?, y_scale?, y_zp?)              op=..., op_attrs='{json}'
        y = table[x]                   table[v] = Q(op(DQ(v))) for each of the 256 values v of X's type
    edgecc.QLinearGlobalAveragePool(X, x_scale, x_zp, y_scale, y_zp)
        y = Q(GlobalAveragePool(DQ(X)))

The activation of QLinearAdd/QLinearMul is exact for any output parameters: Q is monotone (positive scale), so
Q(clip(v, lo, hi)) = clip(Q(v), Q(lo), Q(hi)); a kernel applies it as an integer clamp after requantising.
QLookup's quantisation parameters are not used by the computation (the table holds it all); they record what the
table was built from, so export can write the lookup back as DQ -> op -> Q. `op_attrs` holds the original op's
attributes and `op_inputs` its other (constant float32 scalar) inputs, e.g. Clip's bounds, as JSON.
"""

from __future__ import annotations

import json

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ops.common import broadcast_shapes, tensor
from edgecc.ops.fused import EPILOGUE_ATTRS, apply_activation
from edgecc.ops.registry import EDGECC_DOMAIN, AttrSpec, Call, get, op

_INT8 = (DType.int8, DType.uint8)
ADD_ACTIVATIONS = ("", "Relu", "Clip")
"""Activations QLinearAdd/QLinearMul fold: monotone clamps, exact as integer clamps after the requantisation."""


def _dq(x, scale, zp) -> np.ndarray:
    """The DequantizeLinear reference (float32), per tensor."""
    return get("DequantizeLinear").run_reference(Call("DequantizeLinear", [x, scale, zp], {"axis": 1, "block_size": 0,
                                                                                           "output_dtype": 0}))[0]


def _q(x, scale, zp) -> np.ndarray:
    """The QuantizeLinear reference, per tensor, to zp's type."""
    attrs = get("QuantizeLinear").complete_attrs({})
    return get("QuantizeLinear").run_reference(Call("QuantizeLinear", [x, scale, zp], attrs))[0]


def _check_params(call: Call, specs) -> None:
    """specs: (data, scale, zero point, name) TensorTypes: 8-bit data, scalar float32 scale, scalar zero point of
    the data's type (per tensor only: the kernels requantise with one multiplier per operand)."""
    for data, scale, zp, name in specs:
        if data is not None and data.dtype not in _INT8:
            call.fail(f"{call.op} input {name} is {data.dtype.name}", hint="it takes int8 or uint8")
        if scale is None or scale.dtype != DType.float32 or scale.size != 1:
            call.fail(f"{call.op} {name}_scale must be a float32 scalar (per tensor)")
        if zp is None or zp.dtype not in _INT8 or zp.size != 1:
            call.fail(f"{call.op} {name}_zero_point must be an int8/uint8 scalar (per tensor)")
        if data is not None and zp.dtype != data.dtype:
            call.fail(f"{call.op} {name}_zero_point is {zp.dtype.name} but {name} is {data.dtype.name}")


# -- QLinearAdd, QLinearMul -------------------------------------------------------------------------------------

BINARY = {"QLinearAdd": "Add", "QLinearMul": "Mul"}
"""The integer binary ops and the float op each stands for."""


def _infer_qlinear_binary(call: Call):
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (call.input(i) for i in range(8))
    _check_params(call, ((a, a_s, a_zp, "a"), (b, b_s, b_zp, "b"), (None, y_s, y_zp, "y")))
    if call.attrs.get("activation", "") not in ADD_ACTIVATIONS:
        call.bad_attr(f"{call.op} activation {call.attrs['activation']!r} is not folded",
                      hint="use '', 'Relu' or 'Clip' (monotone clamps); other activations stay a separate op")
    return [tensor(y_zp.dtype, broadcast_shapes(call, a.shape, b.shape))]


def _qlinear_binary(call: Call):
    """Q(act(DQ(A) op DQ(B))): the float32 QDQ computation (onnxruntime's QLinearAdd/QLinearMul follow it too)."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = call.inputs
    float_op = get(BINARY[call.op])
    result = float_op.run_reference(Call(BINARY[call.op], [_dq(a, a_s, a_zp), _dq(b, b_s, b_zp)], {}))[0]
    return [_q(apply_activation(call, result), y_s, y_zp)]


for _name in BINARY:
    # not `commutative`: that would let passes reorder all eight inputs, not the (data, scale, zero point) triples
    op(_name, infer=_infer_qlinear_binary, inputs=(8, 8), domain=EDGECC_DOMAIN,
       attrs=dict(EPILOGUE_ATTRS))(_qlinear_binary)


# -- QLookup ---------------------------------------------------------------------------------------------------

def int_values(dtype: DType) -> np.ndarray:
    """Every value of an 8-bit type in table order (the table is indexed by value - min)."""
    info = np.iinfo(dtype.numpy)
    return np.arange(info.min, info.max + 1).astype(dtype.numpy)


def lookup_table(op_name: str, attrs: dict, extra: list, x_scale, x_zp, y_scale, y_zp) -> np.ndarray:
    """table[v - min] = Q(op(DQ(v))) for every value v of x_zp's type, by the registry's references: the exact
    result of the DQ -> op -> Q it replaces, for any elementwise op whose other inputs (`extra`, None for an absent
    optional one) are scalars."""
    opdef = get(op_name)
    x = _dq(int_values(DType.from_numpy(np.asarray(x_zp).dtype)), x_scale, x_zp)
    y = opdef.run_reference(Call(op_name, [x, *extra], opdef.complete_attrs(attrs)))[0]
    return _q(np.asarray(y, np.float32).reshape(-1), y_scale, y_zp)


def _infer_qlookup(call: Call):
    x, table = call.inputs[0], call.inputs[1]
    if x.dtype not in _INT8 or table.dtype not in _INT8 or table.shape != (256,):
        call.fail(f"QLookup takes 8-bit X and a [256] 8-bit table, got {x.dtype.name} and "
                  f"{table.dtype.name}{list(table.shape)}", hint="the table holds one result per value of X")
    if len(call.inputs) > 2:
        _check_params(call, ((x, call.input(2), call.input(3), "x"), (None, call.input(4), call.input(5), "y")))
        if call.input(5).dtype != table.dtype:
            call.fail(f"QLookup y_zero_point is {call.input(5).dtype.name} but the table is {table.dtype.name}")
    if get(call.attrs["op"]) is None:
        call.bad_attr(f"QLookup op {call.attrs['op']!r} is not an ONNX op edgecc knows")
    return [tensor(table.dtype, x.shape)]


@op("QLookup", infer=_infer_qlookup, inputs=(2, 6), domain=EDGECC_DOMAIN,
    attrs={"op": AttrSpec("string", ""), "op_attrs": AttrSpec("string", "{}"), "op_inputs": AttrSpec("string", "[]")})
def qlookup(call: Call):
    """y = table[x]: a unary float op between a DequantizeLinear and a QuantizeLinear, tabulated at compile time
    (see `lookup_table`)."""
    x, table = call.inputs[0], call.inputs[1]
    return [table[x.astype(np.int64) - int(np.iinfo(x.dtype).min)]]


def lookup_source(attrs: dict) -> tuple[dict, list]:
    """The original op's attributes and its other inputs (float32 scalars, None where absent) recorded in a
    QLookup's `op_attrs` / `op_inputs` JSON."""
    extra = json.loads(attrs.get("op_inputs", "[]") or "[]")
    return json.loads(attrs.get("op_attrs", "{}") or "{}"), [None if e is None else np.float32(e) for e in extra]


# -- QLinearGlobalAveragePool ------------------------------------------------------------------------------

def _infer_qgap(call: Call):
    x, x_s, x_zp, y_s, y_zp = (call.input(i) for i in range(5))
    _check_params(call, ((x, x_s, x_zp, "x"), (None, y_s, y_zp, "y")))
    if x.rank < 3:
        call.fail(f"QLinearGlobalAveragePool needs [N, C, spatial...], got {list(x.shape)}")
    return [tensor(y_zp.dtype, x.shape[:2] + (1,) * (x.rank - 2))]


@op("QLinearGlobalAveragePool", infer=_infer_qgap, inputs=(5, 5), domain=EDGECC_DOMAIN)
def qlinear_global_average_pool(call: Call):
    """Q(GlobalAveragePool(DQ(X))), the registry's float32 mean; kernels sum the integers exactly (int32) and
    requantise once, so they differ from this only when the mean lies within float32 rounding of a tie."""
    x, x_s, x_zp, y_s, y_zp = call.inputs
    mean = get("GlobalAveragePool").run_reference(Call("GlobalAveragePool", [_dq(x, x_s, x_zp)], {}))[0]
    return [_q(mean, y_s, y_zp)]
