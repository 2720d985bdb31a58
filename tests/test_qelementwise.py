"""Integer Add, lookup-table activations and GlobalAveragePool for int8 graphs: edgecc.QLinearAdd, edgecc.QLookup,
edgecc.QLinearGlobalAveragePool (ops/qelementwise.py, backends/kernels/qelementwise.py, the lower-qdq rules).

Oracle: onnxruntime running the QDQ model written with onnx.helper (DequantizeLinear -> float op ->
QuantizeLinear), with its graph optimisations off so it computes exactly that float path.

Tolerances:
- QLookup is bit-exact: its table is the float path evaluated on every one of the 256 inputs.
- QLinearAdd / QLinearGlobalAveragePool references are the float path too, but onnxruntime's float kernels may
  round differently from NumPy in the last ulp (its Add is the same, its mean sums in another order), and the
  native kernels requantise in fixed point (multipliers rounded to 2^-S, see the kernel module): a value within
  about 2^-13 of a step of a rounding tie may land on the other side. So: at most one step, and >= 99% exact.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc

from models import make_model, tensor_info
from qdq_reference import float_path, qdq_session

ort = pytest.importorskip("onnxruntime")

PIPELINE = "infer-shapes,lower-qdq,canonicalize,fold-constants,dce"
ONNX_TYPE = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _const(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _range(dtype):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _random_int(rng, shape, dtype):
    lo, hi = _range(dtype)
    return rng.integers(lo, hi + 1, shape).astype(dtype)


# -- QDQ models written by hand: integer in, integer out -------------------------------------------------------

def add_model(a_shape, b_shape, a=(0.0473, 128, np.uint8), b=(0.0311, -3, np.int8), y=(0.0687, 100, np.uint8),
              act=None, op="Add"):
    """a, b (integers) -> DQ -> Add|Mul [-> Relu | Clip(lo, hi)] -> Q -> y (integers). Scales like 0.05 and 0.07 put
    many sums exactly on a tie in real arithmetic, where the float32 reference and the fixed point may round either
    way: the defaults are calibration-like arbitrary values."""
    inits = [_const("as", a[0], np.float32), _const("az", a[1], a[2]), _const("bs", b[0], np.float32),
             _const("bz", b[1], b[2]), _const("ys", y[0], np.float32), _const("yz", y[1], y[2])]
    nodes = [helper.make_node("DequantizeLinear", ["a", "as", "az"], ["ad"]),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"]),
             helper.make_node(op, ["ad", "bd"], ["s"], name="add")]
    last = "s"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["s"], ["r"], name="relu"))
        last = "r"
    elif act is not None:
        inits += [_const("lo", act[1], np.float32), _const("hi", act[2], np.float32)]
        nodes.append(helper.make_node("Clip", ["s", "lo", "hi"], ["r"], name="clip"))
        last = "r"
    nodes.append(helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["y"]))
    out_shape = list(np.broadcast_shapes(a_shape, b_shape))
    model = make_model(nodes, [tensor_info("a", list(a_shape), ONNX_TYPE[a[2]]),
                               tensor_info("b", list(b_shape), ONNX_TYPE[b[2]])],
                       [tensor_info("y", out_shape, ONNX_TYPE[y[2]])], inits, opset=19, name="qadd")
    rng = np.random.default_rng(len(a_shape) * 7 + len(b_shape))
    return model, {"a": _random_int(rng, a_shape, a[2]), "b": _random_int(rng, b_shape, b[2])}


def unary_model(op, attrs=None, extra=(), shape=(256,), x=(0.04, 128, np.uint8), y=(0.03, 20, np.uint8),
                opset=19):
    """x (integers) -> DQ -> op(., *extra constants) -> Q -> y. With shape (256,) the feed is every value."""
    inits = [_const("xs", x[0], np.float32), _const("xz", x[1], x[2]), _const("ys", y[0], np.float32),
             _const("yz", y[1], y[2])]
    names = []
    for i, value in enumerate(extra):
        if value is None:
            names.append("")
        else:
            inits.append(_const(f"e{i}", value, np.float32))
            names.append(f"e{i}")
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
             helper.make_node(op, ["xd", *names], ["f"], name="act", **(attrs or {})),
             helper.make_node("QuantizeLinear", ["f", "ys", "yz"], ["y"])]
    model = make_model(nodes, [tensor_info("x", list(shape), ONNX_TYPE[x[2]])],
                       [tensor_info("y", list(shape), ONNX_TYPE[y[2]])], inits, opset=opset, name="qlookup")
    lo, hi = _range(x[2])
    values = np.arange(lo, hi + 1).astype(x[2])
    feed = values if shape == (256,) else np.random.default_rng(1).choice(values, shape)
    return model, {"x": feed}


def gap_model(shape, x=(0.02, 128, np.uint8), y=(0.01, 120, np.uint8)):
    inits = [_const("xs", x[0], np.float32), _const("xz", x[1], x[2]), _const("ys", y[0], np.float32),
             _const("yz", y[1], y[2])]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
             helper.make_node("GlobalAveragePool", ["xd"], ["p"], name="gap"),
             helper.make_node("QuantizeLinear", ["p", "ys", "yz"], ["y"])]
    out = list(shape[:2]) + [1] * (len(shape) - 2)
    model = make_model(nodes, [tensor_info("x", list(shape), ONNX_TYPE[x[2]])],
                       [tensor_info("y", out, ONNX_TYPE[y[2]])], inits, opset=19, name="qgap")
    return model, {"x": _random_int(np.random.default_rng(2), shape, x[2])}


# -- runners ------------------------------------------------------------------------------------------------


def compiled(model, runtime="reference", target="host"):
    return edgecc.compile(model, passes=PIPELINE, runtime=runtime, target=target)


def ops_of(c) -> list[str]:
    return [n.op for n in c.module.graph.nodes]


def assert_within_one_step(ours, theirs, exact=0.99):
    diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() >= exact, (diff == 0).mean()


# -- references against onnxruntime ----------------------------------------------------------------------------

LOOKUP_OPS = [
    ("HardSwish", {}, (), 19),
    ("HardSigmoid", {"alpha": 0.25, "beta": 0.4}, (), 19),
    ("Sigmoid", {}, (), 19),
    ("Tanh", {}, (), 19),
    ("LeakyRelu", {"alpha": 0.1}, (), 19),
    ("Relu", {}, (), 19),
    ("Clip", {}, (-1.5, 2.0), 19),
    ("Clip", {}, (None, 1.0), 19),
    ("Exp", {}, (), 19),
    ("Gelu", {}, (), 20),
    ("Mul", {}, (0.75,), 19),
]


@pytest.mark.parametrize("op, attrs, extra, opset", LOOKUP_OPS,
                         ids=[f"{o[0]}{'-' + str(len(o[2])) if o[2] else ''}" for o in LOOKUP_OPS])
@pytest.mark.parametrize("x_type", [np.uint8, np.int8])
def test_qlookup_is_bit_exact_to_the_float_path(op, attrs, extra, opset, x_type):
    zp = 128 if x_type == np.uint8 else 0
    model, feeds = unary_model(op, attrs, extra, x=(0.04, zp, x_type), y=(0.03, -20, np.int8), opset=opset)
    ref = compiled(model)
    assert ops_of(ref) == ["QLookup"], ops_of(ref)
    np.testing.assert_array_equal(ref.run(feeds)[0], float_path(model, feeds))
    np.testing.assert_array_equal(compiled(model, "native").run(feeds)[0], float_path(model, feeds))


ADD_CASES = {
    "same-shape": dict(a_shape=(2, 3, 8, 8), b_shape=(2, 3, 8, 8)),
    "per-channel": dict(a_shape=(2, 3, 5, 7), b_shape=(1, 3, 1, 1)),
    "scalar": dict(a_shape=(4, 33), b_shape=()),
    "both-ways": dict(a_shape=(3, 1, 40), b_shape=(1, 50, 1)),
    "int8-relu-zp-not-qmin": dict(a_shape=(2, 64), b_shape=(2, 64), a=(0.02, -5, np.int8), b=(0.03, 7, np.int8),
                                  y=(0.04, 10, np.int8), act="Relu"),
    "clip": dict(a_shape=(1, 4, 9, 9), b_shape=(1, 4, 9, 9), act=("Clip", -1.0, 3.5)),
    "ties": dict(a_shape=(16, 16), b_shape=(16, 16), a=(0.5, 128, np.uint8), b=(0.25, 3, np.uint8),
                 y=(1.0, 128, np.uint8)),
}


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("case", sorted(ADD_CASES))
def test_qlinear_add_mul_reference_and_native_match_onnxruntime(case, op):
    params = dict(ADD_CASES[case])
    if op == "Mul" and "y" not in params:
        params["y"] = (0.0913, 100, np.uint8)  # products reach about +-24
    model, feeds = add_model(**params, op=op)
    ref = compiled(model)
    assert ops_of(ref) == [f"QLinear{op}"], ops_of(ref)
    expected = float_path(model, feeds)
    assert_within_one_step(ref.run(feeds)[0], expected, exact=0.999)
    native = compiled(model, "native").run(feeds)[0]
    assert_within_one_step(native, ref.run(feeds)[0])
    assert_within_one_step(native, expected)
    if case == "ties":  # dyadic multipliers: the fixed point is exact, ties round half to even like rint
        np.testing.assert_array_equal(native, ref.run(feeds)[0])


@pytest.mark.parametrize("shape, x, y", [
    ((1, 16, 7, 7), (0.02, 128, np.uint8), (0.01, 120, np.uint8)),
    ((2, 5, 3, 4, 2), (0.1, 3, np.int8), (0.03, -7, np.int8)),
    ((1, 8, 1, 1), (0.05, 0, np.uint8), (0.05, 0, np.uint8)),
    ((1, 4, 56, 56), (0.013, 100, np.uint8), (0.002, 5, np.int8)),
], ids=["7x7", "3d-int8", "1x1", "56x56-int8-out"])
def test_qlinear_global_average_pool_matches_onnxruntime(shape, x, y):
    model, feeds = gap_model(shape, x, y)
    ref = compiled(model)
    assert ops_of(ref) == ["QLinearGlobalAveragePool"], ops_of(ref)
    expected = float_path(model, feeds)
    assert_within_one_step(ref.run(feeds)[0], expected, exact=0.9)
    native = compiled(model, "native").run(feeds)[0]
    assert_within_one_step(native, ref.run(feeds)[0], exact=0.9)


def test_native_lookup_on_a_large_tensor():
    model, feeds = unary_model("HardSwish", shape=(2, 16, 15, 15), x=(0.05, 0, np.int8), y=(0.04, -100, np.int8))
    native = compiled(model, "native")
    np.testing.assert_array_equal(native.run(feeds)[0], float_path(model, feeds))


# -- what lower-qdq leaves float --------------------------------------------------------------------------------

def test_patterns_that_stay_float():
    """A per-channel DequantizeLinear into Add, a Mul by a per-channel constant (not a function of x alone), and a
    Softmax (not elementwise) keep their float path."""
    model, _ = add_model((1, 3, 4, 4), (1, 3, 4, 4))
    graph = model.graph
    bs = next(i for i in graph.initializer if i.name == "bs")
    bs.CopyFrom(_const("bs", [0.03, 0.02, 0.01], np.float32))
    bz = next(i for i in graph.initializer if i.name == "bz")
    bz.CopyFrom(_const("bz", [0, 0, 0], np.int8))
    graph.node[1].attribute.extend([helper.make_attribute("axis", 1)])
    assert "QLinearAdd" not in ops_of(compiled(model))
    model, _ = unary_model("Mul", extra=(np.ones(1, np.float32),), shape=(1, 3))
    model.graph.initializer[-1].CopyFrom(_const("e0", [0.5, 1.0, 2.0], np.float32))
    assert "QLookup" not in ops_of(compiled(model))
    model, _ = unary_model("Softmax", shape=(1, 8))
    assert "Softmax" in ops_of(compiled(model))


# -- export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: add_model((1, 3, 4, 4), (1, 3, 1, 1), act="Relu"),
    lambda: add_model((2, 8), (2, 8), act=("Clip", 0.0, 2.0)),
    lambda: add_model((1, 3, 4, 4), (1, 3, 1, 1), op="Mul"),
    lambda: unary_model("HardSwish"),
    lambda: unary_model("Clip", extra=(None, 1.0)),
    lambda: unary_model("LeakyRelu", {"alpha": 0.2}, x=(0.04, 0, np.int8), y=(0.03, 0, np.int8)),
    lambda: gap_model((1, 6, 5, 5)),
], ids=["add-relu", "add-clip", "mul", "hardswish", "clip-max-only", "leakyrelu", "gap"])
def test_export_writes_qdq_that_onnxruntime_runs(build):
    model, feeds = build()
    c = compiled(model, "native")
    assert any(n.domain == "edgecc" for n in c.module.graph.nodes)
    exported = c.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    assert all(not n.domain for n in exported.graph.node)
    assert_within_one_step(float_path(exported, feeds), c.run(feeds)[0])


# -- models quantised by onnxruntime.quantization.quantize_static ----------------------------------------------

def _init(rng, name, shape, scale=0.5):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _float_model(nodes, inits, x_shape, y_shape, name):
    return make_model(nodes, [tensor_info("x", x_shape)], [tensor_info("y", y_shape)], inits, opset=17, name=name)


def residual_hardswish_gap():
    """Conv -> Relu -> Conv -> Add(x) -> Relu -> HardSwish -> GlobalAveragePool: resnet's residual block, then
    mobilenet-v3's activation and head."""
    rng = np.random.default_rng(4)
    inits = [_init(rng, "w1", (8, 8, 3, 3), 0.3), _init(rng, "b1", (8,)), _init(rng, "w2", (8, 8, 3, 3), 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("HardSwish", ["r2"], ["h"], name="hswish"),
             helper.make_node("GlobalAveragePool", ["h"], ["y"], name="gap")]
    return _float_model(nodes, inits, [1, 8, 10, 10], [1, 8, 1, 1], "residual_hswish_gap")


def test_quantize_static_model_lowers_add_activation_and_pool(tmp_path):
    from test_lower_qdq import _samples, ort_quantise, output_step

    model = residual_hardswish_gap()
    path = ort_quantise(model, tmp_path, calibration=_samples(model, 8, 0))
    qdq = onnx.load(path)
    assert {"Add", "HardSwish", "GlobalAveragePool"} <= {n.op_type for n in qdq.graph.node}
    c = edgecc.compile(path, passes=PIPELINE)
    ops = ops_of(c)
    assert ops.count("QLinearConv") == 2 and "QLinearAdd" in ops and "QLinearGlobalAveragePool" in ops, ops
    assert not {"Add", "Relu", "HardSwish", "GlobalAveragePool", "Conv"} & set(ops), ops
    # integers flow from the input's Q to the output's DQ
    assert ops[0] == "QuantizeLinear" and ops[-1] == "DequantizeLinear" and not QDQ & set(ops[1:-1]), ops
    step = output_step(path)
    session = qdq_session(path)
    for feeds in _samples(model, 4, 9):
        diff = np.abs(c.run(feeds)[0] - session.run(None, feeds)[0])
        assert diff.max() <= step * 1.001, diff.max() / step


@pytest.mark.slow
def test_digits_mobilenet_runs_on_integers_end_to_end(shared_dir, tmp_path):
    """The trained digits MobileNet (HardSwish, residual Adds, GlobalAveragePool) after onnxruntime's
    quant_pre_process (HardSwish -> HardSigmoid * x) and quantize_static: every op between the input's Q and the
    output's DQ is integer, and the accuracy on the test split equals onnxruntime's on the same QDQ model (run as
    written: qdq_reference)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from test_lower_qdq import ort_quantise

    data = shared_dir / "data"
    if not (data / "digits_mobilenet.onnx").is_file():
        pytest.skip(f"{data} holds no digits_mobilenet.onnx")
    quant_pre_process(str(data / "digits_mobilenet.onnx"), str(tmp_path / "pre.onnx"))
    model = onnx.load(tmp_path / "pre.onnx")
    calibration = [{"input": x} for x in np.load(data / "digits_mobilenet_calib.npz")["input"]]
    path = ort_quantise(model, tmp_path, calibration=calibration)
    c = edgecc.compile(path, passes=PIPELINE)
    ops = ops_of(c)
    assert {"QLinearAdd", "QLinearMul", "QLookup", "QLinearGlobalAveragePool"} <= set(ops), ops
    assert ops[0] == "QuantizeLinear" and ops[-1] == "DequantizeLinear" and not QDQ & set(ops[1:-1]), ops
    assert not {"Add", "Mul", "HardSigmoid", "GlobalAveragePool"} & set(ops), ops
    test = np.load(data / "digits_mobilenet_test.npz")
    session = qdq_session(path)
    ours = np.array([c.run({"input": x})[0].argmax() for x in test["input"]])
    theirs = np.array([session.run(None, {"input": x})[0].argmax() for x in test["input"]])
    assert abs((ours == test["label"]).mean() - (theirs == test["label"]).mean()) <= 0.002 + 1e-9


# -- ARM under qemu ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("target, qemu", [("armv8", "qemu-aarch64"), ("armv7", "qemu-arm")])
def test_arm_under_qemu(target, qemu):
    """armv8: the tbl lookup (16 bytes per step, then the byte loop for the 7 left of 231); armv7: the byte loop;
    both: the i32 Add, the i64 Mul (no vector i64 multiply on NEON) and the pool."""
    if shutil.which(qemu) is None:
        pytest.skip(f"needs {qemu} (installed by .ci/run)")
    for model, feeds in (add_model((2, 3, 5, 7), (1, 3, 1, 1), act="Relu"), unary_model("HardSwish"),
                         add_model((2, 3, 5, 7), (1, 3, 1, 1), y=(0.0913, 100, np.uint8), op="Mul"),
                         unary_model("Sigmoid", shape=(3, 7, 11), x=(0.05, -3, np.int8), y=(0.004, -128, np.int8)),
                         gap_model((1, 16, 7, 7))):
        ref = compiled(model).run(feeds)[0]
        assert_within_one_step(compiled(model, "native", target=target).run(feeds)[0], ref)


def _asm(model, target: str) -> str:
    import os
    import tempfile

    c = edgecc.compile(model, passes=PIPELINE, target=target, runtime="native")
    with tempfile.TemporaryDirectory() as tmp:
        (text,) = c.artifacts(os.path.join(tmp, "model"), emit="asm").values()
    return text.decode()


def test_lookup_shuffles_registers_where_the_target_can():
    """AArch64: tbl over four q registers; x86 with AVX-512 VBMI: vpermi2b/vpermt2b (else a byte loop)."""
    import re

    from edgecc.backends.llvm_driver import host_features

    model, _ = unary_model("HardSwish", shape=(4, 256))
    assert re.search(r"\btbl\s+v\d+\.16b, \{ ?v\d+\.16b, v\d+\.16b, v\d+\.16b, v\d+\.16b ?\}", _asm(model, "armv8"))
    if "+avx512vbmi" in host_features().split(","):
        assert re.search(r"\bvperm[it]2b\s+.*zmm", _asm(model, "host"))
