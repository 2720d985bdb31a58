"""Epilogue fusion end to end: Conv/Gemm followed by bias Add, residual Add and each fusable activation compile
(-O3) to edgecc.FusedConv / edgecc.FusedGemm, run natively and in the reference interpreter, and export back to
plain ONNX; all three are compared with onnxruntime on the original, unfused model.

Tolerances, relative to the largest magnitude before the activation (the convolution's float32 sums run in a
different order than onnxruntime's MLAS, an error of a few ulp of the largest partial sum, which every activation
here passes on with slope <= 1; the epilogue itself is the same float32 operations as the unfused ops):
float32 2e-6 (Sigmoid/Tanh add edgecc's own approximations, a few ulp of values <= 1, inside the same bound);
float16 2e-3, one float16 ulp, since the fused kernel rounds to float16 once where the unfused ops round after
each op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.ops.fused import ACTIVATIONS
from models import make_model, tensor_info

RNG = np.random.default_rng(7)
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
REL_TOL = {np.float32: 2e-6, np.float16: 2e-3}


def _activation_nodes(name: str, src: str, dst: str, dtype) -> tuple[list, list]:
    if name == "Clip":
        bounds = [numpy_helper.from_array(np.array(v, dtype), n) for v, n in ((0.0, "lo"), (6.0, "hi"))]
        return [helper.make_node("Clip", [src, "lo", "hi"], [dst])], bounds
    if name == "Gelu":  # as exported (ONNX's Gelu op is opset 20): fuse-epilogues first turns it into one Gelu
        return _gelu_chain(src, dst)
    attrs = {"LeakyRelu": {"alpha": 0.2}, "HardSigmoid": {"alpha": 0.3, "beta": 0.4}}.get(name, {})
    return [helper.make_node(name, [src], [dst], **attrs)], []


def conv_block(activation: str, residual: bool, dtype=np.float32, group: int = 1):
    """Conv(3x3, pad 1) -> Add(per-channel constant) -> [Add(skip)] -> activation."""
    c, m = 8, 8
    inits = [numpy_helper.from_array((RNG.standard_normal((m, c // group, 3, 3)) * 0.3).astype(dtype), "w"),
             numpy_helper.from_array(RNG.standard_normal(m).astype(dtype), "b"),
             numpy_helper.from_array(RNG.standard_normal((1, m, 1, 1)).astype(dtype), "shift")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=group),
             helper.make_node("Add", ["c", "shift"], ["s"])]
    inputs = [tensor_info("x", [1, c, 9, 11], ELEM[dtype])]
    last = "s"
    if residual:
        nodes.append(helper.make_node("Add", ["skip", last], ["r"]))
        inputs.append(tensor_info("skip", [1, m, 9, 11], ELEM[dtype]))
        last = "r"
    act_nodes, act_inits = _activation_nodes(activation, last, "y", dtype)
    model = make_model(nodes + act_nodes, inputs, [tensor_info("y", [1, m, 9, 11], ELEM[dtype])], inits + act_inits)
    feeds = {"x": RNG.standard_normal((1, c, 9, 11)).astype(dtype) * 2}
    if residual:
        feeds["skip"] = RNG.standard_normal((1, m, 9, 11)).astype(dtype)
    return model, feeds


def gemm_block(activation: str):
    """Gemm(transB) -> Add(row bias) -> activation."""
    inits = [numpy_helper.from_array(RNG.standard_normal((24, 40)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(RNG.standard_normal(24).astype(np.float32), "bias")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1), helper.make_node("Add", ["g", "bias"], ["s"])]
    act_nodes, act_inits = _activation_nodes(activation, "s", "y", np.float32)
    model = make_model(nodes + act_nodes, [tensor_info("x", [3, 40])], [tensor_info("y", [3, 24])], inits + act_inits)
    return model, {"x": RNG.standard_normal((3, 40)).astype(np.float32) * 2}


def _onnxruntime(model, feeds, extra_output: str | None = None):
    if extra_output:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.append(helper.make_tensor_value_info(extra_output, model.graph.output[0].type.tensor_type
                                                                .elem_type, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def check_all_paths(model, feeds, fused_op: str, dtype=np.float32):
    last = model.graph.node[-1]
    before_name = last.input[0] if last.op_type != "Mul" else model.graph.node[-5].input[0]  # the Gelu chain's x
    want, before = _onnxruntime(model, feeds, extra_output=before_name)
    scale = max(float(np.abs(before.astype(np.float32)).max()), float(np.abs(want.astype(np.float32)).max()), 1e-6)
    compiled = edgecc.compile(model, opt_level=3)
    assert compiled.report["ops"] == {fused_op: 1}, compiled.report["ops"]
    reference = edgecc.compile(model, opt_level=3, runtime="reference")
    exported = ort.InferenceSession(compiled.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    for got in (compiled.run(feeds)[0], reference.run(feeds)[0], exported.run(None, feeds)[0]):
        err = np.abs(got.astype(np.float32) - want.astype(np.float32)).max() / scale
        assert err <= REL_TOL[dtype], err


@pytest.mark.parametrize("residual", [False, True], ids=["bias", "residual"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_conv_epilogue_matches_onnxruntime(activation, residual):
    check_all_paths(*conv_block(activation, residual), "FusedConv")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gemm_epilogue_matches_onnxruntime(activation):
    check_all_paths(*gemm_block(activation), "FusedGemm")


def test_depthwise_float16_residual_relu():
    model, feeds = conv_block("Relu", True, np.float16, group=8)
    check_all_paths(model, feeds, "FusedConv", np.float16)


def test_residual_computed_after_the_conv_moves_the_fused_node():
    """Add(conv_a(x), conv_b(x)) where conv_b runs second: conv_a's fused form must run after conv_b."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    v = numpy_helper.from_array(RNG.standard_normal((4, 4, 1, 1)).astype(np.float32), "v")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node("Conv", ["x", "v"], ["b"]),
             helper.make_node("Relu", ["b"], ["rb"]), helper.make_node("Add", ["a", "rb"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 4, 5, 5])], [tensor_info("y", [1, 4, 5, 5])], [w, v])
    feeds = {"x": RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    compiled = edgecc.compile(model, opt_level=3)
    assert compiled.report["ops"] == {"FusedConv": 2}
    np.testing.assert_allclose(compiled.run(feeds)[0], want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_activation_with_other_readers_is_not_fused():
    w = numpy_helper.from_array(RNG.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 4, 5, 5])],
                       [tensor_info("y", [1, 4, 5, 5]), tensor_info("c", [1, 4, 5, 5])], [w])
    assert edgecc.compile(model, opt_level=3).report["ops"] == {"Conv": 1, "Relu": 1}


# -- the channel-vectorised convolution (conv_channels.py): narrow maps, constant weights ---------------------------

CHANNEL_CASES = {
    # name: (x shape, w shape, attrs); each is chosen so prefers_channel_vectors picks the kernel on 512-bit and
    # 256-bit hosts alike (rows of 7 or 10, channel counts that fill vectors, or leave a remainder vector)
    "resnet_last_stage_3x3_pad1": ((1, 24, 7, 7), (32, 24, 3, 3), {"pads": [1, 1, 1, 1]}),
    "stride2_to_7": ((1, 16, 14, 14), (48, 16, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "lenet_5x5_width10": ((1, 6, 14, 14), (16, 6, 5, 5), {}),
    "pointwise_7x7_flattened": ((1, 40, 7, 7), (64, 40, 1, 1), {}),
    "remainder_channels_dilated": ((1, 8, 9, 7), (40, 8, 3, 3), {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    "conv1d": ((2, 8, 7), (32, 8, 3), {"pads": [1, 1]}),
    "conv3d": ((1, 4, 3, 5, 7), (16, 4, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    "pointwise_remainder_vector": ((1, 12, 3, 3), (20, 12, 1, 1), {}),
}


@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_channel_vectorised_conv_with_residual_and_activation(case, dtype):
    from edgecc.backends.kernels.conv_channels import position_vector_use
    from edgecc.backends.targets import resolve_target

    x_shape, w_shape, attrs = CHANNEL_CASES[case]
    w = (RNG.standard_normal(w_shape) * 0.3).astype(dtype)
    b = RNG.standard_normal(w_shape[0]).astype(dtype)
    probe = edgecc.compile(make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
                                      [tensor_info("x", list(x_shape), ELEM[dtype])], [tensor_info("y", None, ELEM[dtype])],
                                      [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]), runtime="reference")
    y_shape = probe.module.graph.outputs[0].type.shape
    width = int(np.prod(y_shape[2:])) if set(w_shape[2:]) == {1} else y_shape[-1]
    vl = resolve_target("host").vector_bits // 32
    assert position_vector_use(width, vl) + 0.1 < 1, "the case must select the channel-vectorised kernel here"
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Add", ["c", "skip"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    model = make_model(nodes, [tensor_info("x", list(x_shape), ELEM[dtype]), tensor_info("skip", list(y_shape), ELEM[dtype])],
                       [tensor_info("y", list(y_shape), ELEM[dtype])],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    feeds = {"x": RNG.standard_normal(x_shape).astype(dtype), "skip": RNG.standard_normal(y_shape).astype(dtype)}
    check_all_paths(model, feeds, "FusedConv", dtype)


# -- depthwise convolution by row blocks (depthwise.py) ------------------------------------------------------------

DEPTHWISE_CASES = {
    # name: (x shape, kernel, attrs); suits_depthwise_rows picks every one of them
    "mobilenet_14x14_3x3": ((1, 24, 14, 14), (3, 3), {"pads": [1, 1, 1, 1]}),
    "mobilenet_7x7": ((1, 16, 7, 7), (3, 3), {"pads": [1, 1, 1, 1]}),
    "wide_rows_stride1": ((1, 4, 9, 40), (3, 3), {"pads": [1, 1, 1, 1]}),
    "stride2_narrow": ((1, 8, 15, 15), (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "kernel5_dilated_asymmetric": ((1, 8, 11, 13), (5, 5), {"pads": [2, 1, 0, 3], "dilations": [2, 1]}),
    "stride2_rows_stride1_cols": ((1, 8, 12, 10), (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 1]}),
    "no_padding_odd_height": ((2, 4, 13, 9), (3, 3), {}),
}


@pytest.mark.parametrize("case", sorted(DEPTHWISE_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_depthwise_rows_with_residual_and_clip(case, dtype):
    from edgecc.backends.kernels.depthwise import suits_depthwise_rows
    from edgecc.ops.conv import window_geometry
    from edgecc.ops.registry import Call

    x_shape, kernel, attrs = DEPTHWISE_CASES[case]
    c = x_shape[1]
    w = (RNG.standard_normal((c, 1, *kernel)) * 0.5).astype(dtype)
    b = RNG.standard_normal(c).astype(dtype)
    window = window_geometry(Call("Conv", [], dict(attrs)), x_shape[2:], kernel)
    y_shape = [x_shape[0], c, *window.out]

    class _Buf:  # just the shape/dtype view suits_depthwise_rows reads
        def __init__(self, shape, dt):
            self.shape, self.dtype = shape, edgecc.ir.dtypes.DType.from_numpy(np.dtype(dt))

    assert suits_depthwise_rows(_Buf(x_shape, dtype), _Buf(w.shape, dtype), window, c)
    lo, hi = [numpy_helper.from_array(np.array(v, dtype), n) for v, n in ((0.0, "lo"), (6.0, "hi"))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=c, **attrs),
             helper.make_node("Add", ["skip", "c"], ["s"]), helper.make_node("Clip", ["s", "lo", "hi"], ["y"])]
    model = make_model(nodes, [tensor_info("x", list(x_shape), ELEM[dtype]), tensor_info("skip", y_shape, ELEM[dtype])],
                       [tensor_info("y", y_shape, ELEM[dtype])],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), lo, hi])
    feeds = {"x": (RNG.standard_normal(x_shape) * 2).astype(dtype), "skip": RNG.standard_normal(y_shape).astype(dtype)}
    check_all_paths(model, feeds, "FusedConv", dtype)


def test_zero_pad_folds_into_conv_padding():
    w = numpy_helper.from_array(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["c"], pads=[1, 0, 0, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 4, 9, 7])], [tensor_info("y", None)], [w, pads], opset=18)
    feeds = {"x": RNG.standard_normal((1, 4, 9, 7)).astype(np.float32)}
    check_all_paths(model, feeds, "FusedConv")


# -- MatMul epilogues and the Gelu pattern (transformers) ----------------------------------------------------------

def _gelu_chain(src: str, dst: str) -> tuple[list, list]:
    """x * 0.5 * (1 + erf(x / sqrt(2))), as PyTorch exports nn.GELU()."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n)
              for v, n in ((2 ** 0.5, "sqrt2"), (1.0, "one"), (0.5, "half"))]
    nodes = [helper.make_node("Div", [src, "sqrt2"], ["g_div"]), helper.make_node("Erf", ["g_div"], ["g_erf"]),
             helper.make_node("Add", ["g_erf", "one"], ["g_add"]), helper.make_node("Mul", [src, "g_add"], ["g_mul"]),
             helper.make_node("Mul", ["g_mul", "half"], [dst])]
    return nodes, consts


@pytest.mark.parametrize("tail", ["gelu", "residual_relu", "bias_only"])
def test_matmul_epilogue_matches_onnxruntime(tail):
    w = numpy_helper.from_array((RNG.standard_normal((40, 24)) * 0.3).astype(np.float32), "w")
    bias = numpy_helper.from_array(RNG.standard_normal(24).astype(np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["bias", "m"], ["s"])]
    inputs, inits = [tensor_info("x", [1, 5, 40])], [w, bias]
    feeds = {"x": RNG.standard_normal((1, 5, 40)).astype(np.float32)}
    if tail == "gelu":
        chain, consts = _gelu_chain("s", "y")
        nodes, inits = nodes + chain, inits + consts
    elif tail == "residual_relu":
        nodes += [helper.make_node("Add", ["s", "skip"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
        inputs.append(tensor_info("skip", [1, 5, 24]))
        feeds["skip"] = RNG.standard_normal((1, 5, 24)).astype(np.float32)
    else:
        nodes[-1] = helper.make_node("Add", ["bias", "m"], ["y"])
    model = make_model(nodes, inputs, [tensor_info("y", [1, 5, 24])], inits, opset=18)
    check_all_paths(model, feeds, "FusedMatMul")


def test_gelu_pattern_becomes_one_gelu():
    chain, consts = _gelu_chain("x", "y")
    model = make_model(chain, [tensor_info("x", [3, 7])], [tensor_info("y", [3, 7])], consts, opset=18)
    compiled = edgecc.compile(model, opt_level=3)
    assert compiled.report["ops"] == {"Gelu": 1}
    x = (RNG.standard_normal((3, 7)) * 3).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    # edgecc's float32 erf-based Gelu against onnxruntime's five float32 ops: a few ulp of the largest value
    np.testing.assert_allclose(compiled.run({"x": x})[0], want, rtol=0, atol=4e-6 * np.abs(want).max())


def test_fusion_keeps_the_macs_reported():
    """The report counts the multiply-adds of fused ops like those of the ops they replace."""
    for model, _ in (conv_block("Relu", True), gemm_block("Relu")):
        assert edgecc.compile(model, opt_level=3).report["macs"] == edgecc.compile(model, opt_level=0).report["macs"]
    w = numpy_helper.from_array(RNG.standard_normal((8, 6)).astype(np.float32), "w")
    chain, consts = _gelu_chain("m", "y")
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"])] + chain, [tensor_info("x", [2, 3, 8])],
                       [tensor_info("y", [2, 3, 6])], [w] + consts, opset=18)
    compiled = edgecc.compile(model, opt_level=3)
    assert compiled.report["ops"] == {"FusedMatMul": 1} and compiled.report["macs"] == 2 * 3 * 8 * 6
