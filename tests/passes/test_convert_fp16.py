"""convert-fp16: weights stored in float16 (compute=fp32) and whole graphs in float16 (compute=fp16), compiled with
the -O3 passes before it and compared with onnxruntime.

Tolerances, relative to the largest output magnitude:
- against onnxruntime on the float32 model, weights mode: 1e-2. Each weight is rounded to float16 (relative error
  at most 2^-11 = 4.9e-4); a dot product of K such terms errs by at most 2^-11 of the sum of |w x| terms, which for
  these short reductions (K <= 72) and random signs stays well under 1e-2 of the largest output.
- against onnxruntime on the same model with its weights rounded to float16 and widened back (what edgecc
  computes): 2e-6, only float32 summation order differs (as in tests/backends/test_native_fused.py).
- compute=fp16 against float32 onnxruntime: 1e-2; activations are also rounded to float16 after every op (2^-11
  each, a handful of ops deep).
- compute=fp16 native against edgecc's reference interpreter on the same converted graph: 2e-3, one float16 ulp of
  the largest value (both round to float16 at the same points; summation order may flip a rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.checker
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from models import make_model, tensor_info

PASSES = "infer-shapes,canonicalize,fold-constants,fold-batchnorm,dce,fuse-epilogues,convert-fp16"
COMPUTE16 = PASSES + "{compute=fp16}"
RNG = np.random.default_rng(11)


def _init(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def conv_relu():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [tensor_info("x", [1, 8, 10, 12])], [tensor_info("y", [1, 16, 10, 12])],
                      [_init("w", (16, 8, 3, 3)), _init("b", (16,))])


def depthwise():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    inits = [_init("w", (8, 1, 3, 3)), _init("b", (8,)), numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(6), "hi")]
    return make_model(nodes, [tensor_info("x", [1, 8, 9, 9])], [tensor_info("y", [1, 8, 9, 9])], inits)


def residual():
    """Conv -> Add(skip) -> Relu, a 1x1 Conv on a narrow 5x5 map (output channels in vectors), a ConvTranspose."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["p"]),
             helper.make_node("ConvTranspose", ["p", "wt", "bt"], ["y"], strides=[2, 2])]
    inits = [_init("w", (8, 8, 3, 3)), _init("b", (8,)), _init("w1", (16, 8, 1, 1)), _init("wt", (16, 4, 2, 2)),
             _init("bt", (4,))]
    return make_model(nodes, [tensor_info("x", [1, 8, 5, 5])], [tensor_info("y", [1, 4, 10, 10])], inits)


def gemm():
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])]
    return make_model(nodes, [tensor_info("x", [3, 40])], [tensor_info("y", [3, 10])],
                      [_init("w", (24, 40)), _init("b", (24,)), _init("w2", (24, 10)), _init("b2", (10,))])


def matmul():
    """MatMul by a 2-D weight with a bias Add (FusedMatMul), then a batched MatMul by a 3-D weight."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("MatMul", ["h", "w3"], ["y"])]
    return make_model(nodes, [tensor_info("x", [2, 5, 32])], [tensor_info("y", [2, 5, 6])],
                      [_init("w", (32, 20)), _init("b", (20,)), _init("w3", (2, 20, 6))])


def softmax_layernorm():
    """Gemm -> LayerNormalization -> Relu -> Softmax: the two normalisations keep float32 in compute=fp16."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["n"], axis=-1),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Softmax", ["r"], ["y"], axis=-1)]
    return make_model(nodes, [tensor_info("x", [4, 16])], [tensor_info("y", [4, 12])],
                      [_init("w", (12, 16)), _init("b", (12,)), _init("g", (12,), 1.0), _init("beta", (12,))],
                      opset=17)


MODELS = {"conv_relu": conv_relu, "depthwise": depthwise, "residual": residual, "gemm": gemm, "matmul": matmul,
          "softmax_layernorm": softmax_layernorm}


WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def _feeds(model):
    return {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weights_rounded(model, compiled):
    """The model with the initializers the pass stored in float16 (found by value among the compiled graph's float16
    constants) rounded to float16 and widened back."""
    halved = [v.const for v in compiled.module.graph.constants() if v.type.dtype == DType.float16]
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for k, init in enumerate(rounded.graph.initializer):
        array = numpy_helper.to_array(init).astype(np.float16)
        if any(h.shape == array.shape and np.array_equal(h, array) for h in halved):
            rounded.graph.initializer[k].CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
    return rounded


def _close(actual, expected, rel):
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


@pytest.mark.parametrize("runtime", ["native", "reference"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_in_half_match_onnxruntime(name, runtime):
    model = MODELS[name]()
    feeds = _feeds(model)
    compiled = edgecc.compile(model, passes=PASSES, runtime=runtime)
    (y,) = compiled.run(feeds)
    assert y.dtype == np.float32
    _close(y, _ort(model, feeds), 1e-2)
    _close(y, _ort(_weights_rounded(model, compiled), feeds), 2e-6)
    weights = [n.inputs[1] for n in compiled.module.graph.nodes if n.op in WEIGHT_OPS]
    assert weights and all(v.type.dtype == DType.float16 for v in weights)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compute_in_half_matches_onnxruntime(name):
    model = MODELS[name]()
    feeds = _feeds(model)
    native = edgecc.compile(model, passes=COMPUTE16, runtime="native")
    (y,) = native.run(feeds)
    assert y.dtype == np.float32
    _close(y, _ort(model, feeds), 1e-2)
    (y_ref,) = edgecc.compile(model, passes=COMPUTE16, runtime="reference").run(feeds)
    _close(y, y_ref, 2e-3)
    graph = native.module.graph
    assert [v.type.dtype for v in graph.inputs] == [DType.float32]
    assert any(n.op == "Cast" for n in graph.nodes)


def test_fp32_policy_ops_keep_float32_between_casts():
    compiled = edgecc.compile(softmax_layernorm(), passes=COMPUTE16, runtime="reference")
    by_op = {n.op: n for n in compiled.module.graph.nodes}
    for op in ("LayerNormalization", "Softmax"):  # fp16_policy="fp32" in the registry
        assert by_op[op].inputs[0].type.dtype == DType.float32
        assert by_op[op].outputs[0].type.dtype == DType.float32
    assert by_op["Relu"].outputs[0].type.dtype == DType.float16
    assert by_op["Gemm"].outputs[0].type.dtype == DType.float16
    assert all(v.type.dtype == DType.float16 for v in by_op["Gemm"].inputs)
    assert edgecc.ops.get("Softmax").fp16_policy == "fp32" and edgecc.ops.get("Relu").fp16_policy == "fp16"


def test_constants_that_overflow_half_stay_float32():
    """A weight beyond half's range (65504) would become infinity: it stays float32, the other weights go to half."""
    big = numpy_helper.from_array(np.full((4, 6), 7e4, np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Gemm", ["h", "w2"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 6])], [tensor_info("y", [1, 3])], [big, _init("w2", (4, 3))])
    feeds = {"x": _feeds(model)["x"] * 1e-3}  # activations stay inside half's range
    for passes in (PASSES, COMPUTE16):
        compiled = edgecc.compile(model, passes=passes, runtime="native")
        (y,) = compiled.run(feeds)
        assert np.isfinite(y).all()
        _close(y, _ort(model, feeds), 1e-2)
        first, second = compiled.module.graph.nodes[-2:] if passes == PASSES else [
            n for n in compiled.module.graph.nodes if n.op == "Gemm"]
        assert first.inputs[1].type.dtype == DType.float32 and second.inputs[1].type.dtype == DType.float16


def test_weights_bytes_halve():
    model = conv_relu()
    fp32 = edgecc.compile(model, passes=PASSES.rsplit(",", 1)[0], runtime="reference").report["weights_bytes"]
    fp16 = edgecc.compile(model, passes=PASSES, runtime="reference").report["weights_bytes"]
    assert fp16 == fp32 // 2


@pytest.mark.parametrize("passes", [PASSES, COMPUTE16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_is_valid_onnx_with_casts(name, passes):
    model = MODELS[name]()
    feeds = _feeds(model)
    compiled = edgecc.compile(model, passes=passes, runtime="native")
    exported = compiled.to_onnx()
    onnx.checker.check_model(exported, full_check=True)
    assert "Cast" in [n.op_type for n in exported.graph.node]
    (y,) = compiled.run(feeds)
    # weights mode: onnxruntime runs the same float32 arithmetic; compute=fp16: its float16 kernels round differently
    _close(_ort(exported, feeds), y, 2e-6 if passes == PASSES else 2e-3)


def test_resize_scales_stay_float32():
    """Resize's `scales` is tensor(float) in ONNX: the data goes to half, the scales do not."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear"),
             helper.make_node("Relu", ["r"], ["y"])]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = make_model(nodes, [tensor_info("x", [1, 2, 4, 4])], [tensor_info("y", [1, 2, 8, 8])], [scales])
    feeds = _feeds(model)
    compiled = edgecc.compile(model, passes=COMPUTE16, runtime="native")
    resize = next(n for n in compiled.module.graph.nodes if n.op == "Resize")
    assert resize.inputs[0].type.dtype == DType.float16 and resize.inputs[2].type.dtype == DType.float32
    _close(compiled.run(feeds)[0], _ort(model, feeds), 1e-2)


def test_unknown_compute_is_an_error():
    with pytest.raises(EdgeccError, match="compute=bf16"):
        edgecc.compile(conv_relu(), passes=PASSES + "{compute=bf16}", runtime="reference")


def test_mobilenet_v2_weights_at_most_51_percent(shared_dir):
    path = str(shared_dir / "models" / "mobilenet_v2.onnx")
    fp32 = edgecc.compile(path, passes=PASSES.rsplit(",", 1)[0], runtime="reference").report["weights_bytes"]
    fp16 = edgecc.compile(path, passes=PASSES, runtime="reference").report["weights_bytes"]
    assert fp16 <= 0.51 * fp32, (fp16, fp32)


def _accuracy(compiled, test) -> float:
    hits = sum(int(np.argmax(compiled.run({"input": x})[0]) == label) for x, label in zip(test["input"], test["label"]))
    return 100.0 * hits / len(test["label"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
@pytest.mark.parametrize("compute", ["fp32", "fp16"])
def test_digits_accuracy_drop_at_most_a_tenth_of_a_point(shared_dir, name, compute):
    path = str(shared_dir / "data" / f"{name}.onnx")
    test = np.load(shared_dir / "data" / f"{name}_test.npz")
    base = _accuracy(edgecc.compile(path, opt_level=3, runtime="native"), test)
    passes = PASSES + ("{compute=fp16}" if compute == "fp16" else "")
    half = _accuracy(edgecc.compile(path, passes=passes, runtime="native"), test)
    assert base - half <= 0.1, (base, half)
