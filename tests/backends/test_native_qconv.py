"""Fast int8 kernels (backends/kernels/qconv.py, qgemm.py): QLinearConv with constant symmetric int8 weights and
edgecc.QGemm, native against the op's registry reference (which follows the ONNX spec) and, for QLinearConv,
onnxruntime; on the host, the AVX2 and SSE2 presets (pmaddwd over int16 pairs), and armv8.2 (sdot) and armv7
(generic NEON) under qemu-user.

Tolerance: atol 1 (uint8/int8 units) with at least 99% of outputs exact. The kernels requantise in fixed point
(qconv.QuantParams): with every multiplier M = x_scale * w_scale / y_scale below 1/2, an integer multiplier
round(M * 2^32) and the high word of the product, whose error is below |acc| * 2^-33 < 1/4 of a unit; otherwise
M's exact mantissa and a shift. So results differ from the reference (the float64 product rounded half to even)
by at most 1, and only for products within that error of a tie; onnxruntime's own requantisation differs from
the reference by the same kind of rounding, hence the same bound against it. The generic fallbacks stay exact.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends.llvm_driver import host_features
from toolchains import skip_unless_runnable

RNG = np.random.default_rng(11)


def _np(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def qconv_model(x_shape, m: int, k: int, group: int = 1, x_dtype=np.uint8, y_dtype=np.uint8, per_channel=True,
                bias=True, y_scale=0.2, **attrs) -> tuple[onnx.ModelProto, dict]:
    """One QLinearConv with every parameter a constant (weights symmetric int8) and a random input."""
    c = x_shape[1]
    info = np.iinfo(x_dtype)
    w = RNG.integers(-127, 128, (m, c // group, k, k)).astype(np.int8)
    w_scale = (RNG.random(m if per_channel else 1) * 0.004 + 0.0005).astype(np.float32)
    if not per_channel:
        w_scale = w_scale.reshape(())
    y_zp = np.array(100 if y_dtype == np.uint8 else -10, y_dtype)
    x_zp = np.array(7 if x_dtype == np.uint8 else -5, x_dtype)
    params = [("x_scale", np.array(0.05, np.float32)), ("x_zp", x_zp), ("w", w), ("w_scale", w_scale),
              ("w_zp", np.zeros(w_scale.shape, np.int8)), ("y_scale", np.array(y_scale, np.float32)), ("y_zp", y_zp)]
    if bias:
        params.append(("b", RNG.integers(-20000, 20000, m).astype(np.int32)))
    node = helper.make_node("QLinearConv", ["x"] + [n for n, _ in params], ["y"], group=group, **attrs)
    graph = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", _np(x_dtype), x_shape)],
                              [helper.make_tensor_value_info("y", _np(y_dtype), None)],
                              [numpy_helper.from_array(a, n) for n, a in params])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = RNG.integers(info.min, int(info.max) + 1, x_shape).astype(x_dtype)
    return model, {"x": x}


def qgemm_model(a_shape, n: int, trans_b: int = 1, a_dtype=np.uint8, const_b=True, b_zp=None, y_scale=0.25,
                bias=20000):
    """One edgecc.QGemm (domain edgecc), B int8 [N, K] (transB) or [K, N], per-column scales, int32 bias."""
    k = a_shape[-1]
    b = RNG.integers(-127, 128, (n, k) if trans_b else (k, n)).astype(np.int8)
    params = [("a_scale", np.array(0.03, np.float32)), ("a_zp", np.array(9 if a_dtype == np.uint8 else -4, a_dtype)),
              ("b", b), ("b_scale", (RNG.random(n) * 0.004 + 0.0005).astype(np.float32)),
              ("b_zp", np.zeros(n, np.int8) if b_zp is None else b_zp), ("y_scale", np.array(y_scale, np.float32)),
              ("y_zp", np.array(120, np.uint8)), ("c", RNG.integers(-bias, bias, n).astype(np.int32))]
    info = np.iinfo(a_dtype)
    feeds = {"a": RNG.integers(info.min, int(info.max) + 1, a_shape).astype(a_dtype)}
    inputs = [helper.make_tensor_value_info("a", _np(a_dtype), a_shape)]
    if not const_b:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.INT8, b.shape))
        feeds["b"] = b
    node = helper.make_node("QGemm", ["a"] + [name for name, _ in params], ["y"], domain="edgecc", transB=trans_b)
    graph = helper.make_graph([node], "qgemm", inputs, [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, name) for name, v in params if const_b or name != "b"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edgecc", 1)]), \
        feeds


def reference(model, feeds) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return edgecc.compile(model, runtime="reference").run(feeds)[0]


def assert_close_int(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= 1, f"max difference {diff.max()} at {np.unravel_index(diff.argmax(), diff.shape)}"
    assert (diff == 0).mean() >= 0.99, f"only {(diff == 0).mean():.4f} of the outputs are exact"


def check_qconv(model, feeds, target: str = "host", onnx_reference: bool = True) -> None:
    want = reference(model, feeds)
    got = edgecc.compile(model, runtime="native", target=target).run(feeds)[0]
    assert_close_int(got, want)
    if onnx_reference:  # onnx.reference: onnxruntime's QLinearConv saturates on x86 without VNNI (see tests/qdq_reference.py)
        from qdq_reference import reference_runner

        assert_close_int(got, reference_runner(model)(feeds))


# (x shape, output channels, kernel, group, attributes): ResNet-18 / MobileNet-v2 layer kinds on small maps
CONV_CASES = {
    "first_7x7_s2_3ch": ((1, 3, 30, 29), 16, 7, 1, dict(strides=[2, 2], pads=[3, 3, 3, 3])),
    "3x3_s1": ((1, 16, 14, 13), 24, 3, 1, dict(pads=[1, 1, 1, 1])),
    "3x3_s2_odd_channels": ((1, 21, 15, 39), 37, 3, 1, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "1x1": ((1, 24, 9, 9), 40, 1, 1, {}),
    "1x1_s2": ((1, 12, 11, 11), 20, 1, 1, dict(strides=[2, 2])),
    "dilated_asymmetric_pads": ((2, 5, 12, 17), 6, 3, 1, dict(dilations=[2, 2], pads=[2, 1, 0, 3])),
    "narrow_7x7_map": ((1, 64, 7, 7), 48, 3, 1, dict(pads=[1, 1, 1, 1])),  # output channels in the lanes
    "narrow_1x1_partial_channel_vector": ((2, 40, 7, 7), 60, 1, 1, {}),
    "narrow_3x3_s2": ((1, 24, 13, 13), 32, 3, 1, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "same_upper_s2": ((1, 8, 10, 11), 12, 3, 1, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "depthwise_s1": ((1, 24, 14, 37), 24, 3, 24, dict(pads=[1, 1, 1, 1])),
    "depthwise_s2": ((1, 20, 15, 41), 20, 3, 20, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "depthwise_5x5_no_pad": ((1, 7, 12, 11), 7, 5, 7, {}),
    "dilated_depthwise": ((1, 5, 13, 21), 5, 3, 5, dict(dilations=[2, 2], strides=[1, 2], pads=[2, 1, 0, 2])),
    "one_input_channel_5x5": ((2, 1, 16, 19), 6, 5, 1, dict(pads=[1, 2, 0, 1])),  # lenet5's first layer kind
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_qlinear_conv_shapes(case):
    x_shape, m, k, group, attrs = CONV_CASES[case]
    check_qconv(*qconv_model(x_shape, m, k, group, **attrs))


def test_qlinear_conv_several_bands_per_map():
    """A map whose packed input exceeds one band of stack scratch (64 KiB): bands of rows, the last one short."""
    check_qconv(*qconv_model((1, 64, 45, 45), 8, 3, pads=[1, 1, 1, 1]))


@pytest.mark.parametrize("x_dtype,y_dtype", [(np.int8, np.int8), (np.uint8, np.int8), (np.int8, np.uint8)])
def test_qlinear_conv_signed_activations_and_outputs(x_dtype, y_dtype):
    check_qconv(*qconv_model((1, 10, 8, 9), 12, 3, x_dtype=x_dtype, y_dtype=y_dtype, pads=[1, 1, 1, 1]))
    check_qconv(*qconv_model((1, 10, 8, 9), 10, 3, group=10, x_dtype=x_dtype, y_dtype=y_dtype, pads=[1, 1, 1, 1]))


@pytest.mark.parametrize("group", [1, 6, 12])
def test_qlinear_conv_multipliers_of_one_half_and_more(group):
    """x_scale * w_scale / y_scale >= 1/2 for some channels: the exact (i64, variable shift) requantisation."""
    check_qconv(*qconv_model((1, 12, 7, 9), 12, 3, group=group, y_scale=0.0003, pads=[1, 1, 1, 1]))


def test_qlinear_conv_per_tensor_scale_without_bias():
    check_qconv(*qconv_model((1, 8, 9, 10), 12, 3, per_channel=False, bias=False, pads=[1, 1, 1, 1]))


def test_fast_path_is_taken_and_fallbacks_stay_exact():
    """Constant symmetric weights take qconv.py; grouped (not depthwise) convolutions and nonzero weight zero
    points keep the generic kernel, which is exact."""
    from edgecc.backends.kernels import qconv

    calls = []
    fast = {name: getattr(qconv, name) for name in ("emit_dot_conv", "emit_channel_dot_conv")}  # by lane count
    try:
        for name, original in fast.items():
            setattr(qconv, name, lambda *args, original=original: calls.append(1) or original(*args))
        check_qconv(*qconv_model((1, 8, 6, 7), 8, 3, pads=[1, 1, 1, 1]), onnx_reference=False)
    finally:
        for name, original in fast.items():
            setattr(qconv, name, original)
    assert calls
    model, feeds = qconv_model((1, 8, 6, 7), 8, 3, group=2, pads=[1, 1, 1, 1])
    np.testing.assert_array_equal(edgecc.compile(model, runtime="native").run(feeds)[0], reference(model, feeds))
    model, feeds = qconv_model((1, 8, 6, 7), 8, 3, pads=[1, 1, 1, 1])
    w_zp = next(t for t in model.graph.initializer if t.name == "w_zp")
    w_zp.CopyFrom(numpy_helper.from_array(RNG.integers(-2, 3, 8).astype(np.int8), "w_zp"))
    np.testing.assert_array_equal(edgecc.compile(model, runtime="native").run(feeds)[0], reference(model, feeds))


QGEMM_CASES = {
    "gemv_transB": ((1, 37), 21, 1, np.uint8),
    "rows_kn": ((5, 64), 70, 0, np.uint8),
    "batched_int8_a": ((2, 3, 130), 40, 1, np.int8),
    "fc_512_1000": ((1, 512), 1000, 1, np.uint8),
}


@pytest.mark.parametrize("case", sorted(QGEMM_CASES))
def test_qgemm(case):
    a_shape, n, trans_b, a_dtype = QGEMM_CASES[case]
    model, feeds = qgemm_model(a_shape, n, trans_b, a_dtype)
    assert_close_int(edgecc.compile(model, runtime="native").run(feeds)[0], reference(model, feeds))


def test_qgemm_small_multipliers_with_large_accumulators():
    """A classifier whose int32 bias dwarfs its products (|acc| ~ 2^29, M ~ 2^-23, as on shufflenet's last Gemm): a
    32-bit multiplier of M keeps only ~9 bits and put 2.8% of the outputs off by one, so such multipliers take the
    exact form."""
    model, feeds = qgemm_model((1, 1024), 1000, 1, y_scale=750.0, bias=2 ** 30)
    got, want = edgecc.compile(model, runtime="native").run(feeds)[0], reference(model, feeds)
    assert len(np.unique(want)) > 100  # the outputs spread over the range
    assert_close_int(got, want)


def test_qgemm_generic_fallbacks_are_exact():
    for model, feeds in (qgemm_model((3, 17), 9, 0, const_b=False),
                         qgemm_model((3, 17), 9, 1, b_zp=RNG.integers(-3, 3, 9).astype(np.int8))):
        np.testing.assert_array_equal(edgecc.compile(model, runtime="native").run(feeds)[0], reference(model, feeds))
    model, feeds = qgemm_model((3, 17), 9, 1, const_b=False)
    with pytest.raises(edgecc.errors.EdgeccError, match="runtime B"):
        edgecc.compile(model, runtime="native")


def check_int8_kernels(target, cases, signed_x_shape, qgemm_shape) -> None:
    """CONV_CASES `cases`, a signed-int8 3x3 padded conv on `signed_x_shape` and a QGemm (rows, K, N) compiled for
    `target` (a name or a Target) against the reference interpreter."""
    for case in cases:
        x_shape, m, k, group, attrs = CONV_CASES[case]
        check_qconv(*qconv_model(x_shape, m, k, group, **attrs), target=target, onnx_reference=False)
    check_qconv(*qconv_model(signed_x_shape, signed_x_shape[1] + 3, 3, x_dtype=np.int8, y_dtype=np.int8,
                             pads=[1, 1, 1, 1]), target=target, onnx_reference=False)
    rows, k, n = qgemm_shape
    model, feeds = qgemm_model((rows, k), n)
    assert_close_int(edgecc.compile(model, runtime="native", target=target).run(feeds)[0], reference(model, feeds))


@pytest.mark.parametrize("target", ["x86-64-v3", "x86-64"])
def test_pmaddwd_without_vnni(target):
    """x86 without VNNI (AVX2, and SSE2's 128-bit form; both run on any x86-64 host): pmaddwd over int16 pairs
    (qconv.Dot4) in the group-1, channel-lanes, depthwise and QGemm kernels, never the saturating vpmaddubsw."""
    check_int8_kernels(target, ("3x3_s2_odd_channels", "narrow_7x7_map", "depthwise_s1", "depthwise_s2",
                                "dilated_depthwise", "one_input_channel_5x5"), (1, 9, 10, 11), (3, 45, 19))
    asm = _kernel_asm(*qconv_model((1, 9, 10, 11), 13, 3, pads=[1, 1, 1, 1])[:1], target, "QLinearConv")
    assert re.search(r"\bv?pmaddwd\b", asm) and not re.search(r"pmaddubsw", asm)


@pytest.mark.parametrize("group", [1, 12])
def test_pmaddwd_bound_at_the_extremes(group):
    """The pmaddwd form's bound (qconv.Dot4): x - x_zp = 255 (uint8 input 255, zero point 0) against weights -128
    and 127 gives pair sums of +-65280 and accumulators far past int16, all exact in int32."""
    model, feeds = qconv_model((1, 12, 9, 10), 12, 3, group, pads=[1, 1, 1, 1], y_scale=60.0)
    weights = next(t for t in model.graph.initializer if t.name == "w")
    w = numpy_helper.to_array(weights).copy()
    w[...] = -128
    w[:, :, 1] = 127
    weights.CopyFrom(numpy_helper.from_array(w, "w"))
    zp = next(t for t in model.graph.initializer if t.name == "x_zp")
    zp.CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), "x_zp"))
    feeds["x"][...] = 255
    feeds["x"][..., ::3] = 254
    check_qconv(model, feeds, target="x86-64-v3", onnx_reference=False)


@pytest.mark.skipif(not {"+avx512vnni", "+avx512vl"} <= set(host_features().split(",")),
                    reason="the host has no AVX-512 VNNI with VL")
def test_256_bit_vpdpbusd():
    """256-bit vectors with VNNI (as AVX-VNNI machines have): the ymm vpdpbusd, run on this host."""
    features = "+avx2,+fma,+f16c,+avx512vnni,+avx512vl"
    model, feeds = qconv_model((1, 9, 10, 11), 13, 3, pads=[1, 1, 1, 1])
    compiled = edgecc.compile(model, target="x86-64-v3", mattr=features)
    assert_close_int(compiled.run(feeds)[0], reference(model, feeds))
    assert re.search(r"\bvpdpbusd\s+.*ymm", _kernel_asm(model, "x86-64-v3", "QLinearConv", features))
    model, feeds = qgemm_model((3, 45), 19)
    assert_close_int(edgecc.compile(model, target="x86-64-v3", mattr=features).run(feeds)[0], reference(model, feeds))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["armv7", "armv8.2"])
def test_arm_targets_under_qemu(target):
    skip_unless_runnable(target)
    check_int8_kernels(target, ("3x3_s2_odd_channels", "depthwise_s1", "narrow_7x7_map"), (1, 10, 8, 9), (3, 37, 21))


def _kernel_asm(model, target: str, op: str, mattr: str | None = None) -> str:
    """The -O3 assembly of the model's `op` kernels (from each kernel's label to its end)."""
    import os
    import tempfile

    compiled = edgecc.compile(model, opt_level=3, target=target, runtime="native", mattr=mattr)
    with tempfile.TemporaryDirectory() as tmp:
        (text,) = compiled.artifacts(os.path.join(tmp, "model"), emit="asm").values()
    bodies = re.findall(rf"^(\w*_k\d+_{op}_\w+):\n(.*?)^\.Lfunc_end", text.decode(), re.S | re.M)
    assert bodies, f"no {op} kernel in the {target} assembly"
    return "\n".join(body for _, body in bodies)


def test_armv82_kernels_use_sdot():
    model, _ = qconv_model((1, 16, 8, 8), 16, 3, pads=[1, 1, 1, 1])
    assert re.search(r"\bsdot\s+v\d+\.4s", _kernel_asm(model, "armv8.2", "QLinearConv"))
    model, _ = qgemm_model((2, 64), 32)
    assert re.search(r"\bsdot\s+v\d+\.4s", _kernel_asm(model, "armv8.2", "QGemm"))


@pytest.mark.skipif("+avx512vnni" not in host_features().split(","), reason="the host has no AVX-512 VNNI")
def test_host_kernels_use_vpdpbusd():
    model, _ = qconv_model((1, 16, 8, 8), 16, 3, pads=[1, 1, 1, 1])
    assert re.search(r"\bvpdpbusd\s+.*zmm", _kernel_asm(model, "host", "QLinearConv"))
    model, _ = qgemm_model((2, 64), 32)
    assert re.search(r"\bvpdpbusd\s+.*zmm", _kernel_asm(model, "host", "QGemm"))


def _cortex_m4_measured():
    """Cortex-M4 code (same CPU, features and kernels: stack_scratch False) linked for Linux, run by qemu-arm's A15."""
    from edgecc.devices import load_device
    from edgecc.estimate import measuring_target

    return measuring_target(load_device("stm32f4"))


@pytest.mark.slow
def test_cortex_m4_kernels_use_smlad_with_small_scratch():
    """Cortex-M4 (DSP extension, no vectors): the group-1, depthwise, one-input-channel and QGemm kernels run on
    smlad over int16 pairs with a few KiB of stack scratch, and agree with the reference under qemu-arm."""
    target = _cortex_m4_measured()
    skip_unless_runnable("armv7")
    check_int8_kernels(target, ("3x3_s2_odd_channels", "1x1", "narrow_7x7_map", "depthwise_s1", "depthwise_s2",
                                "one_input_channel_5x5", "dilated_asymmetric_pads"), (1, 10, 8, 9), (3, 37, 21))
    model, _ = qconv_model((1, 16, 8, 8), 16, 1)
    asm = _kernel_asm(model, "cortex-m4", "QLinearConv")
    assert re.search(r"\bsmlad\b", asm)
    frames = [int(v) for v in re.findall(r"\bsub(?:\.w|w)?\s+sp,\s*(?:sp,\s*)?#(\d+)", asm)]
    assert frames and max(frames) <= 8192, frames
