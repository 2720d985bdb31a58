"""Convolution, pooling and normalisation ops (edgecc.ops.conv / edgecc.ops.nn) against onnx.reference.

Tolerances: float32 results use rtol=atol=1e-5 (im2col + BLAS sums in a different order than the
reference's loops; the values here are O(1) sums of at most ~50 products, so a few float32 ulps);
float16 results use 1e-2 (edgecc computes in float32 and rounds once, the reference works in float16);
integer ConvInteger results must be exact; QLinearConv allows 1 LSB (edgecc requantises in float32 like
runtimes do, the reference in float64, so a value within one float32 ulp of a .5 tie may round differently).
Where onnx.reference is known to be wrong (grouped ConvTranspose, MaxPool with asymmetric pads / SAME_LOWER,
BatchNormalization's batch statistics, LRN's channel loop) the expectation comes from the spec formula.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgecc.errors import OpAttributeError, ShapeError
from edgecc.ops.testing import run_node
from oracle import onnx_reference

OPSET = 22
F32 = dict(rtol=1e-5, atol=1e-5)
F16 = dict(rtol=1e-2, atol=1e-2)

rng = np.random.default_rng(1234)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def qrand(dtype, *shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def run(n, inputs):
    """edgecc's outputs, after checking inference agrees with them (with and without constant inputs)."""
    outs, types = run_node(n, inputs, constant_inputs=True)
    _, types_dynamic = run_node(n, inputs, constant_inputs=False)
    for o, t, td in zip(outs, types, types_dynamic):
        assert t == td
        assert t.shape == o.shape and t.dtype.numpy == o.dtype, (t, o.dtype, o.shape)
    return outs


def check(n, inputs, tol=F32, opset=OPSET):
    outs = run(n, inputs)
    expected = onnx_reference(n, inputs, opset)
    for o, e in zip(outs, expected):
        assert o.shape == e.shape and o.dtype == e.dtype, (o.shape, o.dtype, e.shape, e.dtype)
        np.testing.assert_allclose(o.astype(np.float64), e.astype(np.float64), **tol)
    return outs


# ---------------------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs, x_shape, w_shape", [
    (dict(pads=[1, 2, 0, 1], strides=[2, 1], dilations=[1, 2]), (2, 3, 9, 8), (4, 3, 3, 3)),
    (dict(group=2, pads=[1, 1, 1, 1]), (1, 4, 7, 7), (6, 2, 3, 3)),
    (dict(group=6, pads=[1, 1, 1, 1], strides=[2, 2]), (1, 6, 8, 8), (6, 1, 3, 3)),  # depthwise
    (dict(auto_pad="SAME_LOWER", strides=[2]), (2, 3, 10), (5, 3, 4)),  # 1-d, odd padding goes first
    (dict(auto_pad="SAME_UPPER", strides=[2, 1, 2]), (1, 2, 5, 6, 7), (3, 2, 2, 3, 2)),  # 3-d
    (dict(auto_pad="VALID", strides=[3, 2]), (1, 2, 10, 9), (2, 2, 2, 3)),
    (dict(kernel_shape=[1, 1], strides=[2, 2]), (1, 8, 6, 6), (4, 8, 1, 1)),
])
def test_conv_matches_reference(attrs, x_shape, w_shape):
    b = randn(w_shape[0])
    check(node("Conv", ["x", "w", "b"], **attrs), [randn(*x_shape), randn(*w_shape), b])


def test_conv_float16_is_computed_in_float32():
    x, w = randn(1, 3, 6, 6), randn(4, 3, 3, 3)
    n = node("Conv", ["x", "w"], pads=[1, 1, 1, 1])
    (y,) = run(n, [x.astype(np.float16), w.astype(np.float16)])
    assert y.dtype == np.float16
    (expected,) = onnx_reference(n, [x.astype(np.float16).astype(np.float32),
                                     w.astype(np.float16).astype(np.float32)], OPSET)
    np.testing.assert_allclose(y.astype(np.float32), expected, **F16)


def test_conv_errors():
    with pytest.raises(ShapeError, match="input channels"):
        run_node(node("Conv", ["x", "w"]), [randn(1, 3, 5, 5), randn(2, 2, 3, 3)])
    with pytest.raises(ShapeError, match="kernel_shape"):
        run_node(node("Conv", ["x", "w"], kernel_shape=[2, 2]), [randn(1, 3, 5, 5), randn(2, 3, 3, 3)])
    with pytest.raises(OpAttributeError, match="auto_pad"):
        run_node(node("Conv", ["x", "w"], auto_pad="SAME"), [randn(1, 3, 5, 5), randn(2, 3, 3, 3)])
    with pytest.raises(OpAttributeError, match="strides"):
        run_node(node("Conv", ["x", "w"], strides=[1]), [randn(1, 3, 5, 5), randn(2, 3, 3, 3)])
    with pytest.raises(ShapeError, match="larger than the padded input"):
        run_node(node("Conv", ["x", "w"]), [randn(1, 3, 2, 2), randn(2, 3, 3, 3)])


# ---------------------------------------------------------------------------------------------------------------
# ConvTranspose
# ---------------------------------------------------------------------------------------------------------------


def conv_transpose_spec(x, w, b, strides, pads_begin, out_shape, group, dilations):
    """Direct scatter formulation of ConvTranspose (2-d), straight from the definition."""
    n, c, h, wd = x.shape
    cg, mg, kh, kw = w.shape[0] // group, w.shape[1], w.shape[2], w.shape[3]
    y = np.zeros((n, group * mg, *out_shape))
    for g in range(group):
        for ci in range(cg):
            for mi in range(mg):
                for i in range(h):
                    for j in range(wd):
                        for a in range(kh):
                            for bb in range(kw):
                                oi = i * strides[0] + a * dilations[0] - pads_begin[0]
                                oj = j * strides[1] + bb * dilations[1] - pads_begin[1]
                                if 0 <= oi < out_shape[0] and 0 <= oj < out_shape[1]:
                                    y[:, g * mg + mi, oi, oj] += x[:, g * cg + ci, i, j] * w[g * cg + ci, mi, a, bb]
    return (y + b.reshape(1, -1, 1, 1)).astype(np.float32)


@pytest.mark.parametrize("attrs, x_shape, w_shape", [
    (dict(strides=[3, 2], pads=[1, 2, 1, 2]), (1, 2, 3, 3), (2, 3, 3, 3)),
    (dict(strides=[2, 2], output_padding=[1, 0], pads=[0, 1, 1, 0]), (2, 1, 3, 4), (1, 2, 3, 2)),
    (dict(dilations=[2, 2]), (1, 1, 3, 3), (1, 2, 2, 2)),
    (dict(strides=[2], auto_pad="SAME_UPPER"), (1, 2, 5), (2, 3, 4)),
    (dict(strides=[2, 1, 2]), (1, 1, 2, 3, 2), (1, 2, 2, 2, 3)),
])
def test_conv_transpose_matches_reference(attrs, x_shape, w_shape):
    b = randn(w_shape[1])
    check(node("ConvTranspose", ["x", "w", "b"], **attrs), [randn(*x_shape), randn(*w_shape), b])


def test_grouped_conv_transpose_follows_spec():
    x, w, b = randn(2, 4, 3, 3), randn(4, 3, 2, 3), randn(6)  # group 2: 2 -> 3 channels per group
    n = node("ConvTranspose", ["x", "w", "b"], group=2, strides=[2, 1], pads=[1, 0, 0, 1], dilations=[1, 2])
    (y,) = run(n, [x, w, b])
    expected = conv_transpose_spec(x, w, b, (2, 1), (1, 0), y.shape[2:], 2, (1, 2))
    assert y.shape == (2, 6, 5, 6)
    np.testing.assert_allclose(y, expected, **F32)


def test_conv_transpose_output_shape_larger_than_natural():
    # natural size (4-1)*2+3 = 9 by (3-1)*3+3 = 9; output_shape 12 on W: total padding -3, begin -3 - (-3 // 2) = -1,
    # so the result is shifted one column right and zero-extended (onnx.reference cannot run this case)
    x, w, b = randn(1, 2, 4, 3), randn(2, 1, 3, 3), randn(1)
    (y,) = run(node("ConvTranspose", ["x", "w", "b"], strides=[2, 3], output_shape=[9, 12]), [x, w, b])
    np.testing.assert_allclose(y, conv_transpose_spec(x, w, b, (2, 3), (0, -1), (9, 12), 1, (1, 1)), **F32)


@pytest.mark.parametrize("auto_pad, begin", [("SAME_LOWER", 1), ("SAME_UPPER", 0)])
def test_conv_transpose_same_odd_padding(auto_pad, begin):
    # out = 3 * 2 = 6, natural size (3-1)*2+3 = 7: one cropped element, at the start for SAME_LOWER
    x, w = randn(1, 1, 3, 1), randn(1, 1, 3, 1)
    (y,) = run(node("ConvTranspose", ["x", "w"], strides=[2, 1], auto_pad=auto_pad), [x, w])
    expected = conv_transpose_spec(x, w, np.zeros(1, np.float32), (2, 1), (begin, 0), (6, 1), 1, (1, 1))
    np.testing.assert_allclose(y, expected, **F32)


# ---------------------------------------------------------------------------------------------------------------
# Integer convolutions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_type, w_type, per_channel", [(np.uint8, np.int8, True), (np.int8, np.uint8, False),
                                                         (np.uint8, np.uint8, False)])
def test_conv_integer(x_type, w_type, per_channel):
    x, w = qrand(x_type, 1, 4, 6, 6), qrand(w_type, 6, 2, 3, 3)
    wzp = qrand(w_type, 6) if per_channel else qrand(w_type)
    n = node("ConvInteger", ["x", "w", "xzp", "wzp"], pads=[1, 0, 2, 1], strides=[1, 2], group=2)
    (y,) = check(n, [x, w, qrand(x_type), wzp], tol=dict(rtol=0, atol=0))
    assert y.dtype == np.int32


def test_conv_integer_without_zero_points():
    x, w = qrand(np.uint8, 1, 3, 5, 5), qrand(np.int8, 2, 3, 2, 2)
    check(node("ConvInteger", ["x", "w"], auto_pad="SAME_UPPER"), [x, w], tol=dict(rtol=0, atol=0))


@pytest.mark.parametrize("y_type, per_channel", [(np.uint8, False), (np.int8, True)])
def test_qlinear_conv(y_type, per_channel):
    x, w = qrand(np.uint8, 1, 3, 7, 7), qrand(np.int8, 4, 3, 3, 3)
    w_scale = (rng.uniform(0.005, 0.02, 4) if per_channel else np.array(0.01)).astype(np.float32)
    w_zp = np.zeros(4, np.int8) if per_channel else np.array(0, np.int8)
    inputs = [x, np.array(0.02, np.float32), np.array(128, np.uint8), w, w_scale, w_zp,
              np.array(0.05, np.float32), np.array(3, y_type), rng.integers(-3000, 3000, 4).astype(np.int32)]
    n = node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"], pads=[1, 1, 1, 1], strides=[2, 2])
    (y,) = check(n, inputs, tol=dict(rtol=0, atol=1))
    assert y.dtype == y_type
    assert y.min() == np.iinfo(y_type).min or y.max() == np.iinfo(y_type).max  # saturation is exercised


def test_qlinear_conv_rounds_half_to_even():
    x = np.array([[[[1, 3, 5, 7]]]], np.uint8)  # acc = x, scale 0.5 -> 0.5, 1.5, 2.5, 3.5
    n = node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"])
    (y,) = run(n, [x, np.array(1, np.float32), np.array(0, np.uint8), np.ones((1, 1, 1, 1), np.int8),
                   np.array(0.5, np.float32), np.array(0, np.int8), np.array(1, np.float32), np.array(0, np.uint8)])
    np.testing.assert_array_equal(y, [[[[0, 2, 2, 4]]]])


# ---------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs, shape", [
    (dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (1, 2, 7, 7)),
    (dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), (1, 2, 8, 8)),
    (dict(kernel_shape=[2, 2], dilations=[2, 2]), (1, 1, 5, 6)),
    (dict(kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER"), (2, 2, 8)),
    (dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2]), (1, 1, 4, 4, 5)),
])
def test_max_pool_matches_reference(attrs, shape):
    check(node("MaxPool", ["x"], **attrs), [randn(*shape)])


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices(storage_order):
    n = node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             storage_order=storage_order)
    y, i = check(n, [randn(2, 3, 5, 6)])
    assert i.dtype == np.int64


def max_pool_spec(x, kernel, strides, pads_begin, pads_end):
    """2-d MaxPool of one N x C x H x W array from the definition: pad with -inf, take each window's maximum and
    the row-major flat index (within its H x W plane) of its first maximal element."""
    h, w = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pads_begin[0], pads_end[0]), (pads_begin[1], pads_end[1])),
                constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    flat = win.reshape(*win.shape[:4], -1)
    arg = flat.argmax(axis=-1)
    oy, ox = np.meshgrid(np.arange(win.shape[2]), np.arange(win.shape[3]), indexing="ij")
    row = oy * strides[0] + arg // kernel[1] - pads_begin[0]
    col = ox * strides[1] + arg % kernel[1] - pads_begin[1]
    plane = np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], 1, 1) * h * w
    return flat.max(axis=-1), plane + row * w + col


def test_max_pool_asymmetric_pads_and_same_lower_follow_spec():
    x = randn(2, 2, 4, 5)
    # pads [top=1, left=0, bottom=0, right=1]: padding is -inf, never the maximum
    y, i = run(node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1]), [x])
    y_spec, i_spec = max_pool_spec(x, (2, 2), (2, 2), (1, 0), (0, 1))
    assert y.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(y, y_spec)
    np.testing.assert_array_equal(i, i_spec)
    # SAME_LOWER, stride 1, kernel 2: the one padding row/column goes at the beginning
    y, i = run(node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], auto_pad="SAME_LOWER"), [x])
    y_spec, i_spec = max_pool_spec(x, (2, 2), (1, 1), (1, 1), (0, 0))
    np.testing.assert_array_equal(y, y_spec)
    np.testing.assert_array_equal(i, i_spec)


def test_max_pool_uint8_ties_pick_first():
    x = np.zeros((1, 1, 4, 4), np.uint8)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = 7
    y, i = run(node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 3], strides=[2, 1]), [x])
    np.testing.assert_array_equal(y[0, 0], [[7, 7], [0, 0]])
    np.testing.assert_array_equal(i[0, 0], [[5, 5], [8, 9]])


@pytest.mark.parametrize("attrs, shape", [
    (dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (1, 2, 5, 5)),
    (dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), (1, 2, 5, 5)),
    (dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), (1, 1, 6, 6)),
    (dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1), (1, 1, 6, 6)),
    (dict(kernel_shape=[2, 2], dilations=[2, 2], ceil_mode=1), (1, 1, 6, 7)),
    (dict(kernel_shape=[3], strides=[2], auto_pad="SAME_LOWER"), (2, 3, 8)),
    (dict(kernel_shape=[2, 2, 2], pads=[1, 0, 0, 0, 1, 1]), (1, 1, 3, 4, 4)),
])
def test_average_pool_matches_reference(attrs, shape):
    check(node("AveragePool", ["x"], **attrs), [randn(*shape)])


def test_average_pool_float16():
    x = randn(1, 2, 6, 6)
    n = node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    (y,) = run(n, [x.astype(np.float16)])
    (expected,) = onnx_reference(n, [x.astype(np.float16).astype(np.float32)], OPSET)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), expected, **F16)


def test_pool_errors():
    with pytest.raises(OpAttributeError, match="kernel_shape"):
        run_node(node("MaxPool", ["x"]), [randn(1, 1, 4, 4)])
    with pytest.raises(OpAttributeError, match="kernel_shape has 1"):
        run_node(node("AveragePool", ["x"], kernel_shape=[2]), [randn(1, 1, 4, 4)])
    with pytest.raises(ShapeError, match="rank"):
        run_node(node("MaxPool", ["x"], kernel_shape=[2]), [randn(4, 4)])


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 3, 5), (1, 2, 2, 3, 4)])
def test_global_pools(op, shape):
    x = randn(*shape)
    (y,) = check(node(op, ["x"]), [x]) if len(shape) == 4 else run(node(op, ["x"]), [x])
    # onnx.reference's GlobalMaxPool reduces the wrong axes for non-4-d inputs: check every rank against NumPy
    reduce = np.mean if op == "GlobalAveragePool" else np.max
    np.testing.assert_allclose(y, reduce(x, axis=tuple(range(2, x.ndim)), keepdims=True), **F32)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3), (1, 4, 6)])
def test_batch_normalization_uses_running_statistics(shape):
    c = shape[1]
    x, s, b, m = randn(*shape), randn(c), randn(c), randn(c)
    v = rng.uniform(0.5, 2, c).astype(np.float32)
    n = node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3, training_mode=0)
    (y,) = check(n, [x, s, b, m, v])
    bshape = (1, c) + (1,) * (len(shape) - 2)
    expected = (x - m.reshape(bshape)) / np.sqrt(v.reshape(bshape) + 1e-3) * s.reshape(bshape) + b.reshape(bshape)
    np.testing.assert_allclose(y, expected, **F32)


def test_batch_normalization_float16_and_training_mode():
    x, p = randn(1, 2, 3, 3), [randn(2) for _ in range(3)] + [np.ones(2, np.float32)]
    n = node("BatchNormalization", ["x", "s", "b", "m", "v"])
    (y,) = run(n, [x.astype(np.float16)] + p)
    (expected,) = run(n, [x.astype(np.float16).astype(np.float32)] + p)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), expected, **F16)
    with pytest.raises(ShapeError, match="training mode"):
        run_node(node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"]), [x] + p)


def test_batch_normalization_training_mode_from_the_spec():
    """Training mode: batch statistics (population variance) normalise X, running stats are updated with
    momentum. Expected values from the ONNX spec's formulas in float64 (onnx.reference does the same)."""
    x, s, b, m = randn(3, 2, 4, 4), randn(2), randn(2), randn(2)
    v = rng.uniform(0.5, 2, 2).astype(np.float32)
    n = node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1, momentum=0.8)
    (y, rm, rv), _ = run_node(n, [x, s, b, m, v])
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    bshape = (1, 2, 1, 1)
    expected = (x64 - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5) * s.reshape(bshape) + b.reshape(bshape)
    np.testing.assert_allclose(y, expected, **F32)
    np.testing.assert_allclose(rm, m * 0.8 + mean * 0.2, **F32)
    np.testing.assert_allclose(rv, v * 0.8 + var * 0.2, **F32)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 4, 4), (1, 2, 2, 3, 2)])
def test_instance_normalization(shape):
    c = shape[1]
    check(node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-4), [randn(*shape), randn(c), randn(c)],
          tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("axis, shape", [(-1, (2, 3, 8)), (1, (2, 3, 4, 5)), (0, (3, 4)), (-2, (2, 5, 6))])
def test_layer_normalization(axis, shape):
    norm_shape = shape[axis:] if axis >= 0 else shape[len(shape) + axis:]
    n = node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=axis, epsilon=1e-3)
    check(n, [randn(*shape), randn(*norm_shape), randn(*norm_shape)], tol=dict(rtol=1e-4, atol=1e-5))


def test_layer_normalization_float16_stats_are_float32():
    x, s = randn(2, 8).astype(np.float16), randn(8).astype(np.float16)
    n = node("LayerNormalization", ["x", "s"], ["y", "mean", "inv"])
    y, mean, inv = run(n, [x, s])
    assert (y.dtype, mean.dtype, inv.dtype) == (np.float16, np.float32, np.float32)
    assert mean.shape == inv.shape == (2, 1)
    # onnx.reference returns the stats in X's dtype
    ref = onnx_reference(n, [x.astype(np.float32), s.astype(np.float32)], OPSET)
    for got, want in zip((y, mean, inv), ref):
        np.testing.assert_allclose(got.astype(np.float32), want, **F16)
    with pytest.raises(OpAttributeError, match="stash_type"):
        run_node(node("LayerNormalization", ["x", "s"], stash_type=16), [x, s])


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_lrn(size):
    # onnx.reference's LRN loops over the batch axis where it means channels: N == C keeps it correct
    check(node("LRN", ["x"], size=size, alpha=0.02, beta=0.6, bias=1.5), [randn(5, 5, 3, 3)])


def test_lrn_three_dims_and_default_attrs():
    x = randn(1, 4, 6)
    (y,) = run(node("LRN", ["x"], size=3), [x])
    sq = np.pad(x ** 2, ((0, 0), (1, 1), (0, 0)))
    square_sum = sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:]
    np.testing.assert_allclose(y, x / (1.0 + 1e-4 / 3 * square_sum) ** 0.75, **F32)
