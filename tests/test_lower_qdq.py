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
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.errors import EdgeccError
from edgecc.frontend.onnx_import import import_model
from edgecc.passes import PassContext, PassManager, parse_pipeline

from models import make_model, tensor_info

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
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


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
    # integer data flows between the lowered ops: no DQ -> Q pair is left inside the graph
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
