"""Native kernels on float16 data and float16-stored weights (convert-fp16).

Weights mode: every Conv/Gemm/MatMul kernel path (direct, channel vectors, depthwise rows, transposed; row form with
packed panels, dot form, batched) takes float16 weights with float32 data and widens them at load (x86 F16C
`vcvtph2ps`, AArch64 `fcvt`/`fcvtl`). Native results are compared with the reference interpreter on the same
converted graph, which computes with the widened weights: 2e-6 of the largest output, only the float32 summation
order differs.

compute=fp16 on armv8.2 (+fullfp16): the Conv and Gemm kernels compute in half precision (`fmla v.8h`, checked in
the assembly) and run under qemu. They are compared with onnxruntime's float32 result at 1e-2 of the largest output:
weights and activations round to half (2^-11 each) and the K-term sums accumulate in half, an error growing like
sqrt(K) * 2^-11 (4e-3 for K = 72 here).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.ir.dtypes import DType
from models import make_model, tensor_info

PASSES = "infer-shapes,canonicalize,fold-constants,fold-batchnorm,dce,fuse-epilogues,convert-fp16"
COMPUTE16 = PASSES + "{compute=fp16}"
RNG = np.random.default_rng(5)
needs_qemu = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs gcc-aarch64-linux-gnu and qemu-user")


def _w(name, shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _one(op, inputs, x_shape, y_shape, inits, **attrs):
    node = helper.make_node(op, ["x", *inputs], ["y"], **attrs)
    return make_model([node], [tensor_info("x", x_shape)], [tensor_info("y", y_shape)], inits, opset=18)


CASES = {
    "conv-direct": lambda: _one("Conv", ["w", "b"], [1, 8, 12, 20], [1, 16, 12, 20], [_w("w", (16, 8, 3, 3)), _w("b", (16,))],
                                pads=[1, 1, 1, 1]),
    "conv-strided": lambda: _one("Conv", ["w"], [1, 4, 13, 13], [1, 8, 6, 6], [_w("w", (8, 4, 3, 3))], strides=[2, 2]),
    "conv-channel-vectors": lambda: _one("Conv", ["w", "b"], [1, 32, 7, 7], [1, 64, 7, 7],
                                         [_w("w", (64, 32, 3, 3)), _w("b", (64,))], pads=[1, 1, 1, 1]),
    "conv-depthwise": lambda: _one("Conv", ["w", "b"], [1, 16, 10, 10], [1, 16, 10, 10],
                                   [_w("w", (16, 1, 3, 3)), _w("b", (16,))], pads=[1, 1, 1, 1], group=16),
    "conv-transpose": lambda: _one("ConvTranspose", ["w", "b"], [1, 8, 5, 6], [1, 4, 10, 12],
                                   [_w("w", (8, 4, 2, 2)), _w("b", (4,))], strides=[2, 2]),
    "gemm-packed": lambda: _one("Gemm", ["w", "b"], [5, 40], [5, 24], [_w("w", (40, 24)), _w("b", (24,))]),
    "gemm-transb": lambda: _one("Gemm", ["w", "b"], [5, 40], [5, 24], [_w("w", (24, 40)), _w("b", (24,))], transB=1,
                                alpha=0.5, beta=2.0),
    "matmul-2d": lambda: _one("MatMul", ["w"], [3, 4, 33], [3, 4, 17], [_w("w", (33, 17))]),
    "matmul-batched": lambda: _one("MatMul", ["w"], [3, 4, 33], [3, 4, 17], [_w("w", (3, 33, 17))]),
    "matmul-vector": lambda: _one("MatMul", ["w"], [2, 33], [2], [_w("w", (33,))]),
}


def _feeds(model):
    return {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _close(actual, expected, rel):
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


def _assembly(model, target: str, passes: str) -> str:
    compiled = edgecc.compile(model, passes=passes, target=target)
    with tempfile.TemporaryDirectory() as tmp:
        (text,) = compiled.artifacts(os.path.join(tmp, "model"), emit="asm").values()
    return text.decode() if isinstance(text, bytes) else text


@pytest.mark.parametrize("case", sorted(CASES))
def test_float16_weights_native_matches_reference(case):
    model = CASES[case]()
    feeds = _feeds(model)
    native = edgecc.compile(model, passes=PASSES, runtime="native")
    node = native.module.graph.nodes[0]
    assert node.inputs[0].type.dtype == DType.float32 and node.inputs[1].type.dtype == DType.float16
    (y,) = native.run(feeds)
    (y_ref,) = edgecc.compile(model, passes=PASSES, runtime="reference").run(feeds)
    _close(y, y_ref, 2e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float16_data_native_matches_reference(case):
    """compute=fp16 on the host: float16 buffers, float32 arithmetic rounded once per output (both runtimes)."""
    model = CASES[case]()
    feeds = _feeds(model)
    (y,) = edgecc.compile(model, passes=COMPUTE16, runtime="native").run(feeds)
    (y_ref,) = edgecc.compile(model, passes=COMPUTE16, runtime="reference").run(feeds)
    _close(y, y_ref, 2e-3)  # one float16 ulp: a different summation order may round the other way


@pytest.mark.parametrize("target, pattern", [("x86-64-v3", r"vcvtph2ps"), ("armv8", r"\bfcvtl2?\s+v\d+\.4s")])
def test_stored_weights_widen_with_the_target_conversion(target, pattern):
    text = _assembly(CASES["gemm-packed"](), target, PASSES)
    assert re.search(pattern, text), f"no {pattern} in the {target} Gemm kernel"


@pytest.mark.parametrize("case", ["conv-direct", "gemm-packed"])
def test_half_arithmetic_on_fullfp16_uses_fmla_8h(case):
    text = _assembly(CASES[case](), "armv8.2", COMPUTE16)
    assert re.search(r"\bfmla\s+v\d+\.8h", text), "no half-precision vector FMA in the armv8.2 assembly"
    assert not re.search(r"\bfmla\s+v\d+\.4s", text)


def test_elementwise_ops_compute_in_half_on_fullfp16():
    """Add and Mul of float16 values, computed in float32 and rounded once, equal the half operations (float32
    holds every such result exactly before the rounding), so LLVM shrinks them to `fadd/fmul v.8h`."""
    nodes = [helper.make_node("Add", ["x", "z"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 64, 32]), tensor_info("z", [1, 64, 32])],
                       [tensor_info("y", [1, 64, 32])], opset=18)
    text = _assembly(model, "armv8.2", COMPUTE16)
    assert re.search(r"\bfadd\s+v\d+\.8h", text) and re.search(r"\bfmul\s+v\d+\.8h", text)


@pytest.mark.slow
@needs_qemu
@pytest.mark.parametrize("target, passes", [("armv8", PASSES), ("armv8.2", COMPUTE16)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_arm_under_qemu(case, target, passes):
    """armv8: float16-stored weights widened by fcvt/fcvtl; armv8.2: half arithmetic throughout."""
    model = CASES[case]()
    feeds = _feeds(model)
    (y,) = edgecc.compile(model, passes=passes, target=target).run(feeds)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    _close(y, expected, 1e-2)


@pytest.mark.slow
@needs_qemu
def test_armv82_digits_cnn_accuracy_in_half(shared_dir):
    """The trained digits CNN with half arithmetic under qemu classifies the test split as well as float32."""
    path = str(shared_dir / "data" / "digits_cnn.onnx")
    test = np.load(shared_dir / "data" / "digits_cnn_test.npz")

    def accuracy(compiled):
        hits = [np.argmax(compiled.run({"input": x})[0]) == label for x, label in zip(test["input"], test["label"])]
        return 100.0 * float(np.mean(hits))

    base = accuracy(edgecc.compile(path, opt_level=3, runtime="native"))
    half = accuracy(edgecc.compile(path, passes=COMPUTE16, target="armv8.2"))
    assert base - half <= 0.1, (base, half)
