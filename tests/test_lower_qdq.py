"""lower-qdq: QDQ models (quantised by onnxruntime, or built by hand) lower to QLinearConv / edgecc.QGemm / integer
data movement, and compute what onnxruntime computes on the same quantised model.

Tolerance: one quantisation step of the output (its DequantizeLinear scale). The integer ops and onnxruntime's
kernels (which fuse the same QDQ patterns into QLinearConv/QGemm) agree except where a value lands on (or, with
float32 multiplier products taken in another order, within an ulp of) a rounding tie: then one side rounds to
the neighbouring integer, a 1-step difference that can reach the output when it happens on the last layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.errors import EdgeccError
from edgecc.frontend.onnx_import import import_model
from edgecc.passes import PassContext, PassManager, parse_pipeline

from models import make_model, tensor_info
from qdq_reference import float_path, qdq_runner, reference_runner

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

PIPELINE = "infer-shapes,lower-qdq,canonicalize,fold-constants,dce"
FLOAT_LINEAR = {"Conv", "Gemm", "MatMul"}


# -- small float models ----------------------------------------------------------------------------------------

def _init(rng, name, shape, scale=0.5):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, x_shape, y_shape, inits, name):
    return make_model(nodes, [tensor_info("x", x_shape)], [tensor_info("y", y_shape)], inits, opset=17, name=name)


def conv_relu(rng):
    inits = [_init(rng, "w", (8, 3, 3, 3)), _init(rng, "b", (8,))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [1, 3, 10, 10], [1, 8, 10, 10], inits, "conv_relu"), {"QLinearConv": 1}


def conv_s2_maxpool(rng):
    inits = [_init(rng, "w", (6, 3, 3, 3)), _init(rng, "b", (6,))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    return _model(nodes, [1, 3, 16, 16], [1, 6, 4, 4], inits, "conv_s2_maxpool"), {"QLinearConv": 1, "MaxPool": 1}


def depthwise(rng):
    inits = [_init(rng, "w1", (8, 3, 1, 1)), _init(rng, "w2", (8, 1, 3, 3)), _init(rng, "b2", (8,))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pointwise"),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["y"], name="relu6")]
    inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    return _model(nodes, [1, 3, 9, 9], [1, 8, 9, 9], inits, "depthwise"), {"QLinearConv": 2}


def gemm(rng):
    inits = [_init(rng, "w1", (16, 48)), _init(rng, "b1", (16,)), _init(rng, "w2", (16, 5)), _init(rng, "b2", (5,))]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], name="fc1", transB=1),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    return _model(nodes, [2, 3, 4, 4], [2, 5], inits, "gemm"), {"QGemm": 2}


def matmul(rng):
    inits = [_init(rng, "w", (16, 8)), _init(rng, "bias", (8,))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "bias"], ["y"], name="add")]
    return _model(nodes, [1, 4, 16], [1, 4, 8], inits, "matmul"), {"QGemm": 1}


def residual(rng):
    inits = [_init(rng, "w1", (4, 4, 3, 3)), _init(rng, "w2", (4, 4, 3, 3))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    return _model(nodes, [1, 4, 8, 8], [1, 4, 8, 8], inits, "residual"), {"QLinearConv": 2}


def concat(rng):
    inits = [_init(rng, "w1", (4, 3, 3, 3)), _init(rng, "w2", (4, 3, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
             helper.make_node("Concat", ["c1", "c2"], ["y"], name="concat", axis=1)]
    return _model(nodes, [1, 3, 6, 6], [1, 8, 6, 6], inits, "concat"), {"QLinearConv": 2}


def reshape(rng):
    inits = [_init(rng, "w", (6, 3, 3, 3)), numpy_helper.from_array(np.array([1, 6, 16], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["y"], name="transpose", perm=[0, 2, 1])]
    return _model(nodes, [1, 3, 6, 6], [1, 16, 6], inits, "reshape"), {"QLinearConv": 1, "Reshape": 1,
                                                                      "Transpose": 1}


MODELS = [conv_relu, conv_s2_maxpool, depthwise, gemm, matmul, residual, concat, reshape]


# -- quantisation with onnxruntime --------------------------------------------------------------------------------

class _Reader(quantization.CalibrationDataReader):
    def __init__(self, samples: list[dict]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def _samples(model: onnx.ModelProto, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def ort_quantise(model: onnx.ModelProto, tmp_path, fmt="QDQ", calibration=None) -> str:
    """quantize_static as users run it: uint8 activations, int8 per-channel weights."""
    src, dst = tmp_path / f"{model.graph.name}.onnx", tmp_path / f"{model.graph.name}_{fmt}.onnx"
    onnx.save(model, src)
    quantization.quantize_static(
        str(src), str(dst), _Reader(calibration or _samples(model, 8, 0)),
        quant_format=getattr(quantization.QuantFormat, fmt), per_channel=True,
        activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8)
    return str(dst)


def output_step(path: str) -> float:
    """The scale of the DequantizeLinear producing the graph output (one quantisation step)."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(inits[node.input[1]])


def op_counts(compiled) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in compiled.module.graph.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts




def _ort_run(model, feeds):
    return qdq_runner(model)(feeds)


def _edgecc_run(compiled, feeds):
    return compiled.run(feeds)[0]


# -- models quantised by onnxruntime -----------------------------------------------------------------------------

@pytest.mark.parametrize("build", MODELS, ids=[b.__name__ for b in MODELS])
def test_ort_qdq_models_lower_and_match_onnxruntime(build, tmp_path):
    model, expected = build(np.random.default_rng(1))
    path = ort_quantise(model, tmp_path)
    compiled = edgecc.compile(path, passes=PIPELINE)
    counts = op_counts(compiled)
    for op, n in expected.items():
        assert counts.get(op, 0) == n, counts
    assert not FLOAT_LINEAR & counts.keys(), counts
    # no DQ feeds a Q directly: integer data flows between the lowered ops
    assert not [n for n in compiled.module.graph.nodes if n.op == "QuantizeLinear"
                and n.inputs[0].producer is not None and n.inputs[0].producer.op == "DequantizeLinear"]
    step = output_step(path)
    for feeds in _samples(model, 4, 7):
        ours, theirs = _edgecc_run(compiled, feeds), _ort_run(path, feeds)
        assert np.abs(ours - theirs).max() <= step * 1.001, (np.abs(ours - theirs).max(), step)


def test_lowered_graph_holds_no_float_between_integer_ops(tmp_path):
    """Conv -> MaxPool -> Flatten -> Gemm: the data stays uint8 from the input Q to the output DQ."""
    rng = np.random.default_rng(3)
    inits = [_init(rng, "w", (4, 3, 3, 3)), _init(rng, "b", (4,)), _init(rng, "g", (36, 5)), _init(rng, "c", (5,))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "g", "c"], ["y"], name="fc")]
    model = _model(nodes, [1, 3, 8, 8], [1, 5], inits, "chain")
    path = ort_quantise(model, tmp_path)
    compiled = edgecc.compile(path, passes=PIPELINE, runtime="reference")
    ops = [n.op for n in compiled.module.graph.nodes]
    assert ops in (["QuantizeLinear", "QLinearConv", "MaxPool", "Flatten", "QGemm", "DequantizeLinear"],
                   ["QuantizeLinear", "QLinearConv", "MaxPool", "Reshape", "QGemm", "DequantizeLinear"]), ops
    feeds = _samples(model, 1, 5)[0]
    assert np.abs(_edgecc_run(compiled, feeds) - _ort_run(path, feeds)).max() <= output_step(path) * 1.001


@pytest.mark.parametrize("build", [gemm, matmul, conv_s2_maxpool], ids=["gemm", "matmul", "conv_s2_maxpool"])
def test_export_of_lowered_graph_runs_in_onnxruntime(build, tmp_path):
    """to_onnx writes QLinearConv as is and edgecc.QGemm as DQ/Gemm|MatMul/Add/Q: standard ONNX that onnxruntime
    runs, matching edgecc within one step (onnxruntime computes the expanded QGemm in float)."""
    model, _ = build(np.random.default_rng(2))
    path = ort_quantise(model, tmp_path)
    compiled = edgecc.compile(path, passes=PIPELINE)
    exported = compiled.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    assert all(not n.domain for n in exported.graph.node)
    step = output_step(path)
    for feeds in _samples(model, 3, 11):
        assert np.abs(_ort_run(exported, feeds) - _edgecc_run(compiled, feeds)).max() <= step * 1.001


# -- QOperator models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [conv_relu, conv_s2_maxpool, depthwise, reshape],
                         ids=["conv_relu", "conv_s2_maxpool", "depthwise", "reshape"])
def test_qoperator_models_of_standard_ops_compile_and_match(build, tmp_path):
    """QOperator output that stays in the ONNX domain (QLinearConv, integer MaxPool/Reshape) runs as it is."""
    model, _ = build(np.random.default_rng(1))
    path = ort_quantise(model, tmp_path, fmt="QOperator")
    compiled = edgecc.compile(path, passes=PIPELINE)
    assert "QLinearConv" in op_counts(compiled)
    step, reference = output_step(path), reference_runner(path)
    for feeds in _samples(model, 3, 7):
        assert np.abs(_edgecc_run(compiled, feeds) - reference(feeds)).max() <= step * 1.001


@pytest.mark.parametrize("build", [gemm, residual, concat], ids=["gemm", "residual", "concat"])
def test_qoperator_microsoft_ops_are_listed_with_what_to_do(build, tmp_path):
    model, _ = build(np.random.default_rng(1))
    path = ort_quantise(model, tmp_path, fmt="QOperator")
    with pytest.raises(EdgeccError) as info:
        edgecc.compile(path, passes=PIPELINE, runtime="reference")
    text = str(info.value)
    assert "com.microsoft.Q" in text and "QDQ" in text and "quant_format" in text, text


# -- hand-built QDQ patterns: what folds, what stays ------------------------------------------------------------

def _const(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def qdq_conv(act=None, y_range=(0.0, 6.0), bias_scale_factor=1.0, weights="dq", x_type=np.uint8, seed=0):
    """x -> Q -> DQ -> Conv(DQ(int8 w, per channel), DQ(int32 b)) [-> act] -> Q -> DQ -> y, written by hand."""
    rng = np.random.default_rng(seed)
    w_float = rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3
    w_scale = (np.abs(w_float).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.rint(w_float / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    x_scale, x_zp = (np.float32(8 / 255), x_type(128)) if x_type == np.uint8 else (np.float32(8 / 255), x_type(0))
    b_scale = (x_scale * w_scale * np.float32(bias_scale_factor)).astype(np.float32)
    b_q = rng.integers(-300, 300, 4).astype(np.int32)
    qmin, qmax = (0, 255) if x_type == np.uint8 else (-128, 127)
    y_scale = np.float32((y_range[1] - y_range[0]) / (qmax - qmin))
    y_zp = x_type(np.clip(np.rint(qmin - y_range[0] / y_scale), qmin, qmax))
    inits = [_const("xs", x_scale, np.float32), _const("xz", x_zp, x_type), _const("ws", w_scale, np.float32),
             _const("wz", np.zeros(4), np.int8), _const("bq", b_q, np.int32), _const("bs", b_scale, np.float32),
             _const("bz", np.zeros(4), np.int32), _const("ys", y_scale, np.float32), _const("yz", y_zp, x_type)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0)]
    if weights == "float":
        inits.append(_const("wd", w_q.astype(np.float32) * w_scale[:, None, None, None], np.float32))
    elif weights == "dq":
        inits.append(_const("wq", w_q, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0))
    else:  # "q_of_const": PyTorch-style fake-quantised float weights
        inits.append(_const("wf", w_float, np.float32))
        nodes += [helper.make_node("QuantizeLinear", ["wf", "ws", "wz"], ["wq"], axis=0),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0)]
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv", pads=[1, 1, 1, 1]))
    last = "c"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"], name="act"))
        last = "a"
    elif act is not None:  # ("Clip", lo, hi)
        inits += [_const("lo", act[1], np.float32), _const("hi", act[2], np.float32)]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="act"))
        last = "a"
    nodes += [helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 2, 6, 6])], [tensor_info("y", [1, 4, 6, 6])], inits,
                       opset=19, name="qdq_conv")
    return model, float(y_scale)


def check_against_float_path(model, step, lowered: bool, runtime="reference"):
    compiled = edgecc.compile(model, passes=PIPELINE, runtime=runtime)
    ops = op_counts(compiled)
    assert ("QLinearConv" in ops) == lowered and ("Conv" in ops) != lowered, ops
    for feeds in _samples(model, 4, 3):
        feeds = {"x": feeds["x"] * 3}  # wide enough to saturate both ends of the output range
        diff = np.abs(_edgecc_run(compiled, feeds) - float_path(model, feeds))
        assert diff.max() <= step * 1.001, diff.max() / step
    return compiled


@pytest.mark.parametrize("act, y_range, lowered", [
    (None, (-4.0, 6.0), True),
    ("Relu", (0.0, 6.0), True),           # zero point 0 == qmin: the uint8 clamp is the Relu
    ("Relu", (-1.0, 6.0), False),         # zero point 36: Relu(-0.5) = 0 -> 36, but Q(-0.5) = 31
    (("Clip", 0.0, 6.0), (0.0, 6.0), True),
    (("Clip", 0.0, 6.0), (0.0, 8.0), False),  # Q(6) = 191 < 255: the clip at 6 is not implied
    (("Clip", -1.0, 6.0), (0.0, 6.0), True),  # Q(-1) saturates to 0 anyway
], ids=["plain", "relu-exact", "relu-not-implied", "clip-exact", "clip-upper-not-implied", "clip-below-range"])
def test_activation_folds_only_when_exact(act, y_range, lowered):
    model, step = qdq_conv(act=act, y_range=y_range)
    check_against_float_path(model, step, lowered)


def test_int8_activations_lower_natively():
    model, step = qdq_conv(act="Relu", y_range=(0.0, 6.0), x_type=np.int8)
    compiled = check_against_float_path(model, step, lowered=True, runtime="native")
    assert compiled.module.graph.nodes[1].inputs[0].type.dtype.name == "int8"


def test_bias_with_another_scale_is_requantised():
    """b_scale = 2 x_scale w_scale: the int32 bias is doubled at compile time (exact here), so QLinearConv's B
    equals 2 * bq and the result matches the float path."""
    model, step = qdq_conv(bias_scale_factor=2.0, y_range=(-4.0, 6.0))
    compiled = check_against_float_path(model, step, lowered=True)
    conv = next(n for n in compiled.module.graph.nodes if n.op == "QLinearConv")
    bq = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "bq")
    np.testing.assert_array_equal(conv.inputs[8].const, 2 * bq)


def test_float_weights_leave_the_pattern_alone():
    model, step = qdq_conv(weights="float", y_range=(-4.0, 6.0))
    check_against_float_path(model, step, lowered=False)


def test_fake_quantised_weights_are_quantised_at_compile_time():
    model, step = qdq_conv(weights="q_of_const", y_range=(-4.0, 6.0))
    check_against_float_path(model, step, lowered=True)


def _lowered(model: onnx.ModelProto):
    module = import_model(model)
    PassManager(parse_pipeline("infer-shapes,lower-qdq"), PassContext()).run(module)
    return [n.op for n in module.graph.nodes]


def _qdq_chain(middle: list, scales=(0.05, 0.05), zps=(3, 3), x_shape=(1, 2, 4, 4), y_shape=(1, 2, 4, 4)):
    """x -> Q(s0) -> DQ(s0) -> middle ops ('m' -> 'mo') -> Q(s1) -> DQ(s1) -> y."""
    inits = [_const("s0", scales[0], np.float32), _const("z0", zps[0], np.uint8),
             _const("s1", scales[1], np.float32), _const("z1", zps[1], np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s0", "z0"], ["m"]), *middle,
             helper.make_node("QuantizeLinear", ["mo", "s1", "z1"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["y"])]
    return make_model(nodes, [tensor_info("x", list(x_shape))], [tensor_info("y", list(y_shape))], inits, opset=19)


def test_quantize_of_dequantize_with_same_parameters_is_dropped():
    model = _qdq_chain([helper.make_node("Identity", ["m"], ["mo"])])
    assert _lowered(model) == ["QuantizeLinear", "Identity", "DequantizeLinear"]
    model = _qdq_chain([helper.make_node("Neg", ["m"], ["n"]), helper.make_node("Neg", ["n"], ["mo"])])
    ops = _lowered(model)
    assert ops.count("QuantizeLinear") == 2 and "Neg" in ops  # float ops keep their DQ -> op -> Q


@pytest.mark.parametrize("op, attrs, y_shape", [
    ("MaxPool", {"kernel_shape": [2, 2], "pads": [1, 1, 0, 0]}, (1, 2, 4, 4)),
    ("Transpose", {"perm": [0, 2, 3, 1]}, (1, 4, 4, 2)),
    ("Flatten", {}, (1, 32)),
    ("Concat", {"axis": 1}, (1, 4, 4, 4)),
])
def test_data_movement_runs_on_integers_only_with_identical_parameters(op, attrs, y_shape):
    middle = [helper.make_node(op, ["m", "m"] if op == "Concat" else ["m"], ["mo"], **attrs)]
    same = _qdq_chain(middle, y_shape=y_shape)
    assert _lowered(same) == ["QuantizeLinear", op, "DequantizeLinear"]
    other = _qdq_chain(middle, scales=(0.05, 0.07), y_shape=y_shape)
    if op == "Concat":  # inputs with other parameters are requantised by a lookup table: still integer, exact
        assert _lowered(other) == ["QuantizeLinear", "QLookup", "QLookup", op, "DequantizeLinear"]
    else:
        assert _lowered(other).count("DequantizeLinear") == 2
    for model in (same, other):
        compiled = edgecc.compile(model, passes=PIPELINE)
        x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32) * 4
        np.testing.assert_array_equal(_edgecc_run(compiled, {"x": x}), float_path(model, {"x": x}))


# -- trained models (../shared/data) ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("preprocess", [False, True], ids=["as-is", "quant-pre-process"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "mobilenet"])
def test_digits_qdq_accuracy_equals_onnxruntime(name, preprocess, shared_dir, tmp_path):
    """The digits models quantised by onnxruntime (QDQ, per channel, the calibration split), with and without
    onnxruntime's quant_pre_process (which folds BatchNormalization first): edgecc's accuracy on the test split
    equals onnxruntime's on the same QDQ model (run as written: qdq_reference) within 0.2 points (one image of 500)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = shared_dir / "data"
    if not (data / f"digits_{name}.onnx").is_file():
        pytest.skip(f"{data} holds no digits_{name}.onnx")
    source = data / f"digits_{name}.onnx"
    if preprocess:
        quant_pre_process(str(source), str(tmp_path / "pre.onnx"))
        source = tmp_path / "pre.onnx"
    calibration = [{"input": x} for x in np.load(data / f"digits_{name}_calib.npz")["input"]]
    model = onnx.load(source)
    model.graph.name = name
    path = ort_quantise(model, tmp_path, calibration=calibration)
    compiled = edgecc.compile(path, passes=PIPELINE)
    counts = op_counts(compiled)
    assert not FLOAT_LINEAR & counts.keys() and counts.get("QLinearConv", 0) + counts.get("QGemm", 0) > 0, counts
    test = np.load(data / f"digits_{name}_test.npz")
    ours = np.array([_edgecc_run(compiled, {"input": x}).argmax() for x in test["input"]])
    theirs = np.array([qdq_runner(path)({"input": x}).argmax() for x in test["input"]])
    accuracy, reference = (ours == test["label"]).mean(), (theirs == test["label"]).mean()
    assert abs(accuracy - reference) <= 0.002 + 1e-9, (accuracy, reference)
    # the lowered graph exported back runs in onnxruntime within one output step of edgecc
    exported, step = qdq_runner(compiled.to_onnx()), output_step(path)
    for x in test["input"][:50]:
        assert np.abs(exported({"input": x}) - _edgecc_run(compiled, {"input": x})).max() <= step * 1.001


def qdq_matmul(op="MatMul", per_channel=True, trans_b=0, bias_scale_factor=1.0, seed=0):
    """x[2,3,8] (MatMul) or x[3,8] (Gemm) -> Q -> DQ -> op(DQ(int8 w), bias) -> Q -> DQ, the bias an Add of a
    DQ'd int32 vector (MatMul) or Gemm's C."""
    rng = np.random.default_rng(seed)
    k, n = 8, 5
    w_q = rng.integers(-127, 128, (n, k) if trans_b else (k, n)).astype(np.int8)
    w_scale = (rng.uniform(0.5, 2, n) / 127).astype(np.float32) if per_channel else np.float32(1 / 127)
    x_scale = np.float32(6 / 255)
    b_scale = (x_scale * w_scale * np.float32(bias_scale_factor)).astype(np.float32)
    inits = [_const("xs", x_scale, np.float32), _const("xz", 120, np.uint8), _const("wq", w_q, np.int8),
             _const("ws", w_scale, np.float32), _const("wz", np.zeros(np.shape(w_scale)), np.int8),
             _const("bq", rng.integers(-500, 500, n), np.int32), _const("bs", b_scale, np.float32),
             _const("ys", 0.05, np.float32), _const("yz", 128, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0 if trans_b else 1),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0)]
    if op == "MatMul":
        nodes += [helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
                  helper.make_node("Add", ["bd", "m"], ["s"], name="bias")]
        x_shape, y_shape = [2, 3, k], [2, 3, n]
    else:
        nodes.append(helper.make_node("Gemm", ["xd", "wd", "bd"], ["s"], name="gemm", transB=trans_b))
        x_shape, y_shape = [3, k], [3, n]
    nodes += [helper.make_node("QuantizeLinear", ["s", "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    model = make_model(nodes, [tensor_info("x", x_shape)], [tensor_info("y", y_shape)], inits, opset=19)
    return model, 0.05


@pytest.mark.parametrize("op, per_channel, trans_b, factor", [
    ("MatMul", True, 0, 1.0), ("MatMul", False, 0, 1.0), ("MatMul", True, 0, 0.5),
    ("Gemm", True, 1, 1.0), ("Gemm", False, 0, 1.0), ("Gemm", True, 0, 3.0)],
    ids=["matmul-add", "matmul-per-tensor", "matmul-bias-rescaled", "gemm-transB", "gemm-per-tensor",
         "gemm-bias-rescaled"])
def test_matmul_and_gemm_fold_their_int32_bias_into_qgemm(op, per_channel, trans_b, factor):
    model, step = qdq_matmul(op, per_channel, trans_b, factor)
    for runtime in ("reference", "native"):
        compiled = edgecc.compile(model, passes=PIPELINE, runtime=runtime)
        assert [n.op for n in compiled.module.graph.nodes] == ["QuantizeLinear", "QGemm", "DequantizeLinear"]
        assert compiled.module.graph.nodes[1].input(8) is not None  # the bias went into QGemm's C
        for feeds in _samples(model, 3, 4):
            diff = np.abs(_edgecc_run(compiled, feeds) - float_path(model, feeds))
            assert diff.max() <= step * 1.001, diff.max() / step


@pytest.mark.parametrize("op, trans_b", [("MatMul", 0), ("Gemm", 1)], ids=["matmul-add", "gemm-transB"])
def test_export_of_qgemm_with_bias_matches(op, trans_b):
    model, step = qdq_matmul(op, True, trans_b)
    compiled = edgecc.compile(model, passes=PIPELINE)
    exported = compiled.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    for feeds in _samples(model, 3, 9):
        assert np.abs(_ort_run(exported, feeds) - _edgecc_run(compiled, feeds)).max() <= step * 1.001


def test_export_of_qgemm_with_batched_a_and_transposed_b():
    """A of rank 3 with transB = 1 is written as DQ -> Transpose -> MatMul -> Add -> Q."""
    from edgecc.frontend.onnx_export import export_model
    from edgecc.interpreter import run_module
    from edgecc.ir.parser import parse_module

    module = parse_module('''module @m {opset = 18} {
      @as = const dense<[0.1]> : tensor<f32>
      @az = const dense<[3]> : tensor<u8>
      @b = const dense<[1, -2, 3, 4, 5, -6, 7, -8, 9, 10, -11, 12]> : tensor<3x4xi8>
      @bs = const dense<[0.5, 0.25, 0.125]> : tensor<3xf32>
      @bz = const dense<[0, 0, 0]> : tensor<3xi8>
      @ys = const dense<[0.2]> : tensor<f32>
      @yz = const dense<[128]> : tensor<u8>
      @c = const dense<[40, -80, 7]> : tensor<3xi32>
      graph @main(%a : tensor<2x2x4xu8>) {
        %0 = "edgecc.QGemm"(%a, @as, @az, @b, @bs, @bz, @ys, @yz, @c) {transB = 1}
        return %0 as "y"
      }
    }''')
    PassManager(parse_pipeline("infer-shapes"), PassContext()).run(module)
    exported = export_model(module)
    onnx.checker.check_model(exported, full_check=True)
    assert [n.op_type for n in exported.graph.node] == ["DequantizeLinear", "DequantizeLinear", "Mul",
                                                         "DequantizeLinear", "Transpose", "MatMul", "Add",
                                                         "QuantizeLinear"]
    a = np.random.default_rng(0).integers(0, 40, (2, 2, 4)).astype(np.uint8)
    ours = run_module(module, {"a": a})[0]
    theirs = _ort_run(exported, {"a": a})
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_a_one_weight_convolution_keeps_its_weight_shape():
    """A 1x1 convolution from one channel to one (a Tucker-2 factor of a first layer) has a single weight: lowered
    to QLinearConv it stays 1x1x1x1 with a one-entry bias (a scalar fails the op's shape check), and matches
    onnxruntime's run of the float model to int8 precision."""
    import onnxruntime as ort

    inits = [numpy_helper.from_array(np.array([[[[0.7]]]], np.float32), "w"),
             numpy_helper.from_array(np.array([0.1], np.float32), "b")]
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                       [tensor_info("x", [1, 1, 4, 4])], [tensor_info("y", [1, 1, 4, 4])], inits)
    x = np.random.default_rng(2).standard_normal((16, 1, 1, 4, 4)).astype(np.float32)
    compiled = edgecc.compile(model, quantize="int8", calibration={"x": x})
    conv = next(n for n in compiled.module.graph.nodes if n.op == "QLinearConv")
    assert conv.inputs[3].const.shape == (1, 1, 1, 1) and conv.inputs[8].const.shape == (1,)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for v in x[:4]:
        ours, theirs = compiled.run({"x": v})[0], session.run(None, {"x": v})[0]
        assert np.abs(ours - theirs).max() <= 0.02 * np.abs(theirs).max()
