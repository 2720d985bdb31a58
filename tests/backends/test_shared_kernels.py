"""Kernels shared across layer shapes (backends/kernels/shared.py), which flash-bound compiles
(`optimize_for="size"`) use for float and int8 convolutions and CodebookDecode: one function per family, the
shapes read from a descriptor at run time.

Each model chains layers of different shapes (stride 2, padding, dilation, depthwise, 1x1, with and without bias
and residual, each run-time activation) so that one compiled function serves several of them. Float models are
checked against onnxruntime (rtol 1e-5: float32 sums in another order); int8 convolutions exactly against the
op's reference, which the generic kernel they share their arithmetic with also matches exactly (and within one
unit of onnx.reference); codebook decodes exactly. Host here; armv7 under qemu-user and a Cortex-M4 board under
qemu-system-arm in the slow tests.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends.emitter import ModuleEmitter
from edgecc.backends.targets import resolve_target
from test_native_codebook import CASES as DECODE_CASES, decode_model
from test_native_qconv import assert_close_int, reference
from toolchains import needs_tools, skip_unless_runnable

RNG = np.random.default_rng(23)
RTOL = 1e-5


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def float_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv 3x3/2 + Clip(0, 6) -> depthwise 3x3 + HardSwish -> 1x1 + residual Add -> Relu -> dilated 3x3 with
    asymmetric pads, no bias -> LeakyRelu -> 1x1/2 (no activation)."""
    inits = {"w1": f32(8, 3, 3, 3, scale=0.4), "b1": f32(8), "w2": f32(8, 1, 3, 3, scale=0.4), "b2": f32(8),
             "w3": f32(8, 8, 1, 1, scale=0.4), "b3": f32(8), "w4": f32(6, 8, 3, 3, scale=0.3),
             "w5": f32(5, 6, 1, 1, scale=0.3), "b5": f32(5), "lo": np.array(0, np.float32),
             "hi": np.array(6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"]),
             helper.make_node("Add", ["c3", "a2"], ["s3"]),
             helper.make_node("Relu", ["s3"], ["a3"]),
             helper.make_node("Conv", ["a3", "w4"], ["c4"], dilations=[2, 2], pads=[2, 1, 0, 3]),
             helper.make_node("LeakyRelu", ["c4"], ["a4"], alpha=0.1),
             helper.make_node("Conv", ["a4", "w5", "b5"], ["y"], strides=[2, 2])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 15, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), f32(1, 3, 15, 13)


def onnxruntime(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def qconv_chain(x_dtype=np.uint8) -> tuple[onnx.ModelProto, dict]:
    """QLinearConvs of several shapes in a row (symmetric int8 weights, as the int8 quantisation writes them):
    3x3/2 padded per-channel, depthwise 3x3 per-tensor without bias, 1x1, dilated 3x3 with asymmetric pads and a
    nonzero weight zero point, depthwise 3x3/2."""
    layers = [(3, 8, 3, 1, dict(strides=[2, 2], pads=[1, 1, 1, 1]), True, True, False),
              (8, 8, 3, 8, dict(pads=[1, 1, 1, 1]), False, False, False),
              (8, 12, 1, 1, {}, True, True, False),
              (12, 6, 3, 1, dict(dilations=[2, 2], pads=[2, 1, 0, 3]), True, True, True),
              (6, 6, 3, 6, dict(strides=[2, 2], pads=[1, 1, 1, 1]), True, True, False)]
    info = np.iinfo(x_dtype)
    nodes, inits, name = [], [], "x"
    for i, (c, m, k, group, attrs, per_channel, bias, w_zp) in enumerate(layers):
        w_scale = (RNG.random(m if per_channel else 1) * 0.004 + 0.002).astype(np.float32)
        params = {f"xs{i}": np.array(0.05, np.float32), f"xz{i}": np.array(7 if i == 0 else 100, x_dtype),
                  f"w{i}": RNG.integers(-127, 128, (m, c // group, k, k)).astype(np.int8),
                  f"ws{i}": w_scale if per_channel else w_scale.reshape(()),
                  f"wz{i}": (RNG.integers(-2, 3, w_scale.shape) if w_zp else np.zeros(w_scale.shape)).astype(np.int8),
                  f"ys{i}": np.array(0.05, np.float32), f"yz{i}": np.array(100, np.uint8)}
        if bias:
            params[f"b{i}"] = RNG.integers(-2000, 2000, m).astype(np.int32)
        if i > 0:  # the previous output is uint8
            params[f"xz{i}"] = np.array(100, np.uint8)
        inits += [numpy_helper.from_array(v, n) for n, v in params.items()]
        nodes.append(helper.make_node("QLinearConv", [name] + list(params), [f"q{i}"], group=group, **attrs))
        name = f"q{i}"
    graph = helper.make_graph(nodes, "qchain", [helper.make_tensor_value_info("x", _onnx_type(x_dtype),
                                                                                [1, 3, 14, 15])],
                              [helper.make_tensor_value_info(name, TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, {"x": RNG.integers(info.min, int(info.max) + 1, (1, 3, 14, 15)).astype(x_dtype)}


def _onnx_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def kernel_count(compiled, optimise_for: str) -> int:
    """Kernel functions the emitter writes for the compiled module when optimising for `optimise_for`."""
    target = replace(resolve_target("host"), optimise_for=optimise_for)
    emitter = ModuleEmitter(compiled.module, target, "m")
    emitter.emit()
    return len(emitter.kernel_modules)


def test_float_convolutions_share_kernels_on_the_host():
    model, x = float_model()
    compiled = edgecc.compile(model, optimize_for="size")
    expected = onnxruntime(model, {"x": x})
    np.testing.assert_allclose(compiled.run([x])[0], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    ops = [n.op for n in compiled.module.graph.nodes]
    assert ops.count("FusedConv") + ops.count("Conv") == 5, ops
    # Clip and HardSwish share one FusedConv function; the residual one, LeakyRelu and the plain Conv one each
    assert kernel_count(compiled, "size") == 4
    assert kernel_count(compiled, "speed") == 5  # speed mode keeps one kernel per shape


def test_float16_and_float32_biases_share_one_kernel():
    """A clustered layer with its bias in float16 (edgecc.budgets' "clusters + fp16 bias") and one with a float32
    bias run through one float convolution function (the descriptor's bias_half picks the load); checked against
    onnxruntime on the exported model (decoded weights, the float16 bias cast back)."""
    inits = {"wa": f32(16, 16, 3, 3, scale=0.3), "ba": f32(16), "wb": f32(16, 16, 1, 1, scale=0.3), "bb": f32(16)}
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["c1"], pads=[1, 1, 1, 1], name="a"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "wb", "bb"], ["c2"], name="b"), helper.make_node("Relu", ["c2"], ["y"])]
    graph = helper.make_graph(nodes, "half_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    compiled = edgecc.compile(model, optimize_for="size", cluster_weights={"a": 16, "b": 16}, quantize={"a": "fp16"})
    biases = [n.inputs[2].type.dtype.name for n in compiled.module.graph.nodes if n.op == "FusedConv"]
    assert biases == ["float16", "float32"], biases
    x = f32(1, 16, 9, 7)
    expected = onnxruntime(compiled.to_onnx(), {"x": x})
    np.testing.assert_allclose(compiled.run([x])[0], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert kernel_count(compiled, "size") == 2  # one float convolution, one codebook decode


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_int8_convolutions_share_one_kernel_and_stay_exact(x_dtype):
    model, feeds = qconv_chain(x_dtype)
    compiled = edgecc.compile(model, optimize_for="size")
    got = compiled.run(feeds)[0]
    np.testing.assert_array_equal(got, reference(model, feeds))
    from qdq_reference import reference_runner

    assert_close_int(got, reference_runner(model)(feeds))
    # per-channel and per-tensor scales, with and without weight zero points: three families for five layers
    assert kernel_count(compiled, "size") <= 4 < kernel_count(compiled, "speed")


@pytest.mark.parametrize("shape, bits, entries", DECODE_CASES + [((3, 100, 130), 1, 2), ((41000,), 4, 16)])
def test_codebook_decode_shared(shape, bits, entries):  # the last two: sizes past int16 (numel_hi)
    model, x, expected = decode_model(shape, bits, entries)
    np.testing.assert_array_equal(edgecc.compile(model, optimize_for="size").run([x])[0], expected)


def test_shapes_beyond_int16_keep_their_own_kernel():
    from edgecc.backends.kernels.shared import pack_descriptor

    assert pack_descriptor([1, 40000]) is None
    assert pack_descriptor([3, -2], [1.5]).tobytes() == np.array([3, -2], "<i2").tobytes() + \
        np.array([1.5], "<f4").tobytes()


@pytest.mark.slow
def test_armv7_under_qemu():
    skip_unless_runnable("armv7")
    model, x = float_model()
    expected = onnxruntime(model, {"x": x})
    got = edgecc.compile(model, target="armv7", optimize_for="size").run([x])[0]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    model, feeds = qconv_chain()
    got = edgecc.compile(model, target="armv7", optimize_for="size").run(feeds)[0]
    np.testing.assert_array_equal(got, reference(model, feeds))
    for shape, bits, entries in DECODE_CASES[:4]:
        model, x, expected = decode_model(shape, bits, entries)
        np.testing.assert_array_equal(edgecc.compile(model, target="armv7", optimize_for="size").run([x])[0],
                                      expected)


@pytest.mark.slow
@needs_tools("arm-none-eabi-gcc", "qemu-system-arm")
def test_float_convolutions_on_cortex_m4(tmp_path):
    from test_bare_metal import run_on_cortex_m4

    model, x = float_model()
    got = run_on_cortex_m4(tmp_path, model, x, "--optimize-for", "size")
    expected = onnxruntime(model, {"x": x}).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
