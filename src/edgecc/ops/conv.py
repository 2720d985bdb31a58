"""Convolutions: Conv, ConvTranspose, ConvInteger, QLinearConv, and the window geometry shared with pooling.

All N-d convolutions run through one core, `conv_core`: the (zero-)padded input is laid out as an im2col
matrix per group (one strided-slice copy per kernel tap), and one batched matmul per call does the
arithmetic. Float convolutions accumulate in float32 (float16 inputs are widened and the result is
narrowed back); the integer ops accumulate exactly (float64 BLAS when the sum provably fits in 53 bits, which
is always the case for 8-bit operands of realistic size, otherwise an int64 matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import tensor
from edgecc.ops.registry import AttrSpec, Call, op

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


# ----------------------------------------------------------------------------------------------------------------
# Window geometry (shared by convolutions and pooling)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Where a sliding window goes along each spatial axis: kernel, strides, dilations, the padding actually
    applied at each end, and the number of window positions (the output's spatial shape)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def extents(self) -> tuple[int, ...]:
        """Span of each dilated kernel axis: (k - 1) * d + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def needed_end_pads(self, spatial) -> tuple[int, ...]:
        """End padding that makes every window fit inside the padded input (ceil_mode windows may run past the
        declared end padding; the extra is never counted as padding by AveragePool)."""
        return tuple(max(pe, (o - 1) * s + e - n - pb) for n, pb, pe, o, s, e in
                     zip(spatial, self.pads_begin, self.pads_end, self.out, self.strides, self.extents))


def int_list_attr(call: Call, name: str, length: int, default: int, minimum: int) -> tuple[int, ...]:
    """An ints attribute of one value per spatial axis (absent or empty: `default` everywhere), range-checked."""
    values = call.attrs.get(name)
    if not values:
        return (default,) * length
    values = tuple(int(v) for v in values)
    if len(values) != length:
        call.bad_attr(f"'{name}' has {len(values)} values but the input has {length} spatial axes",
                      hint=f"give one value per spatial axis ({length})")
    if min(values) < minimum:
        call.bad_attr(f"'{name}' = {list(values)} has a value below {minimum}", hint=f"use values >= {minimum}")
    return values


def kernel_from_weights(call: Call, weight_shape) -> tuple[int, ...]:
    """Kernel spatial shape from W (dims 2..), checked against an explicit `kernel_shape` attribute."""
    kernel = tuple(int(d) for d in weight_shape[2:])
    given = call.attrs.get("kernel_shape")
    if given and tuple(int(k) for k in given) != kernel:
        call.fail(f"kernel_shape {list(given)} does not match the weight's spatial shape {list(kernel)}",
                  hint="drop kernel_shape (it is inferred from W) or fix it")
    return kernel


def window_geometry(call: Call, spatial, kernel, *, ceil_mode: bool = False) -> Window:
    """Resolve strides, dilations, pads / auto_pad into a `Window` following the ONNX Conv/Pool rules.

    Explicit pads: out = floor((n + pb + pe - extent) / s) + 1 (ceil with `ceil_mode`, dropping a last window
    that would start in the end padding). SAME_UPPER/SAME_LOWER: out = ceil(n / s) with the total padding split
    evenly, the odd pixel at the end (UPPER) or beginning (LOWER). VALID: no padding, floor.
    """
    n = len(spatial)
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != n:
        call.bad_attr(f"kernel_shape has {len(kernel)} values but the input has {n} spatial axes",
                      hint=f"give one kernel size per spatial axis ({n})")
    if min(kernel, default=1) < 1:
        call.bad_attr(f"kernel_shape {list(kernel)} has a size below 1")
    strides = int_list_attr(call, "strides", n, 1, 1)
    dilations = int_list_attr(call, "dilations", n, 1, 1)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        call.bad_attr(f"auto_pad '{auto_pad}' is not one of {', '.join(AUTO_PADS)}")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-size // s) for size, s in zip(spatial, strides)]
        total = [max(0, (o - 1) * s + e - size) for o, s, e, size in zip(out, strides, extents, spatial)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        return Window(kernel, strides, dilations, tuple(begin), tuple(end), tuple(out))
    if auto_pad == "VALID":
        begin = end = (0,) * n
    else:
        pads = call.attrs.get("pads") or [0] * (2 * n)
        if len(pads) != 2 * n:
            call.bad_attr(f"'pads' has {len(pads)} values, expected {2 * n} (begin and end for each spatial axis)")
        if min(pads) < 0:
            call.bad_attr(f"'pads' = {list(pads)} has a negative value", hint="pads must be >= 0")
        begin, end = tuple(int(p) for p in pads[:n]), tuple(int(p) for p in pads[n:])
    out = []
    for size, pb, pe, s, e in zip(spatial, begin, end, strides, extents):
        span = size + pb + pe - e
        if span < 0:
            call.fail(f"the window (extent {e}) is larger than the padded input ({size + pb + pe}) "
                      f"for input spatial shape {list(spatial)}",
                      hint="check kernel_shape, dilations and pads against the input size")
        o = span // s + 1
        if ceil_mode and auto_pad == "NOTSET":
            o = -(-span // s) + 1
            if (o - 1) * s >= size + pb:  # the last window would start in the end padding: drop it
                o -= 1
        out.append(o)
    return Window(kernel, strides, dilations, tuple(begin), tuple(end), tuple(out))


def pad_spatial(x: np.ndarray, begin, end, value=0) -> np.ndarray:
    """Pad the spatial axes (2..) of an N x C x ... array with a constant; no copy when nothing is padded."""
    if not any(begin) and not any(end):
        return x
    return np.pad(x, [(0, 0), (0, 0), *zip(begin, end)], mode="constant", constant_values=value)


def window_slices(window: Window):
    """For each kernel position (row-major), the slices of the padded input that hold, for every output
    position, the input element under that kernel tap. Yields (kernel_index, slices)."""
    for tap in np.ndindex(*window.kernel):
        yield tap, (slice(None), slice(None), *(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, window.dilations, window.out, window.strides)))


# ----------------------------------------------------------------------------------------------------------------
# The convolution core
# ----------------------------------------------------------------------------------------------------------------


def conv_core(x: np.ndarray, w: np.ndarray, window: Window, group: int, acc_dtype) -> np.ndarray:
    """N-d grouped convolution (cross-correlation) of x (N, C, *S) with w (M, C/group, *K), zero padding.

    Returns (N, M, *window.out) in `acc_dtype`. Float: computed in acc_dtype (float32) with BLAS. Integer:
    exact integer result (float64 BLAS when every partial sum is below 2**53, else int64 matmul), then wrapped
    to acc_dtype like two's-complement accumulation.
    """
    acc_dtype = np.dtype(acc_dtype)
    integer = acc_dtype.kind in "iu"
    n_batch, channels = x.shape[:2]
    m_out = w.shape[0]
    nsp = x.ndim - 2
    cg, mg = channels // group, m_out // group
    taps = int(np.prod(window.kernel, dtype=np.int64))
    if integer:
        bound = float(np.abs(x).max(initial=0)) * float(np.abs(w).max(initial=0)) * cg * taps
        work = np.float64 if bound < 2.0 ** 53 else np.int64
    else:
        work = acc_dtype
    x = x.astype(work, copy=False)
    w = w.astype(work, copy=False)
    xp = pad_spatial(x, window.pads_begin, window.needed_end_pads(x.shape[2:]))
    if taps == 1 and xp.shape[2:] == tuple(window.out):
        cols = xp.reshape(n_batch, group, cg, -1)  # 1x1 convolution: the input already is the matrix
    else:
        # im2col, one strided-slice copy per kernel tap (much faster than copying a transposed window view)
        cols = np.empty((n_batch, channels, *window.kernel, *window.out), work)
        for tap, sl in window_slices(window):
            cols[(slice(None), slice(None), *tap)] = xp[sl]
        cols = cols.reshape(n_batch, group, cg * taps, -1)
    y = np.matmul(w.reshape(group, mg, cg * taps), cols)  # (N, group, M/group, P)
    y = y.reshape(n_batch, m_out, *window.out)
    if integer:
        return y.astype(np.int64).astype(acc_dtype)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Shared inference for Conv-like ops
# ----------------------------------------------------------------------------------------------------------------

CONV_ATTRS = {
    "auto_pad": AttrSpec("string", "NOTSET"),
    "dilations": AttrSpec("ints"),
    "group": AttrSpec("int", 1),
    "kernel_shape": AttrSpec("ints"),
    "pads": AttrSpec("ints"),
    "strides": AttrSpec("ints"),
}


def _check_conv_shapes(call: Call, x: TensorType, w: TensorType, *, transposed: bool = False) -> int:
    """Rank and channel checks shared by the Conv family; returns `group`."""
    if x.rank < 3:
        call.fail(f"input X has rank {x.rank}, needs N x C x D1 ... (rank >= 3)",
                  hint="add batch and channel axes with Unsqueeze")
    if w.rank != x.rank:
        call.fail(f"weight rank {w.rank} differs from input rank {x.rank}",
                  hint="W must be M x C/group x k1 x ... with one kernel axis per spatial axis of X")
    group = call.attrs["group"]
    if group < 1:
        call.bad_attr(f"group = {group} must be >= 1")
    channels = x.shape[1]
    if channels % group:
        call.fail(f"input channels {channels} are not divisible by group {group}")
    if transposed:
        if w.shape[0] != channels:
            call.fail(f"ConvTranspose weight has {w.shape[0]} input channels, X has {channels}",
                      hint="W must be C x M/group x k1 x ...")
    else:
        if w.shape[1] * group != channels:
            call.fail(f"weight expects {w.shape[1] * group} input channels ({w.shape[1]} x group {group}), "
                      f"X has {channels}", hint="W must be M x C/group x k1 x ...")
        if w.shape[0] % group:
            call.fail(f"output channels {w.shape[0]} are not divisible by group {group}")
    return group


def _check_per_channel(call: Call, t: TensorType | None, name: str, channels: int, *, allow_vector=True) -> None:
    if t is None:
        return
    if t.size == 1 and t.rank <= 1:
        return
    if not allow_vector or t.rank != 1 or t.shape[0] != channels:
        expect = f"a scalar or a 1-D tensor of {channels} (one per output channel)" if allow_vector else "a scalar"
        call.fail(f"{name} has shape {list(t.shape)}, expected {expect}")


def stored_weight_ok(data: DType, weight: DType) -> bool:
    """A weight (or bias) of `weight` dtype may go with data of `data` dtype: the same type, or float16 weights
    with float32 data ("fp16-stored weights", made by convert-fp16: half the bytes, the op still computes in
    float32 with the weights widened at load, which is exact)."""
    return weight == data or (data == DType.float32 and weight == DType.float16)


def _check_bias(call: Call, b: TensorType | None, channels: int, dtype: DType) -> None:
    if b is None:
        return
    if b.shape != (channels,):
        call.fail(f"bias B has shape {list(b.shape)}, expected [{channels}] (one per output channel)")
    if not stored_weight_ok(dtype, b.dtype):
        call.fail(f"bias B is {b.dtype.name}, expected {dtype.name}", hint="Cast the bias")


def _infer_conv(call: Call) -> list[TensorType]:
    x, w = call.inputs[0], call.inputs[1]
    if not x.dtype.is_float:
        call.fail(f"Conv needs float16 or float32 input, got {x.dtype.name}",
                  hint="use ConvInteger / QLinearConv for integer data")
    if not stored_weight_ok(x.dtype, w.dtype):
        call.fail(f"X is {x.dtype.name} but W is {w.dtype.name}", hint="Cast W to the input's dtype")
    _check_conv_shapes(call, x, w)
    _check_bias(call, call.input(2), w.shape[0], x.dtype)
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    return [tensor(x.dtype, (x.shape[0], w.shape[0], *window.out))]


@op("Conv", infer=_infer_conv, attrs=CONV_ATTRS, inputs=(2, 3), kind="conv")
def conv(call: Call):
    """N-d convolution (cross-correlation) Y = conv(X, W) + B with strides, dilations, pads/auto_pad and
    groups (depthwise when group = C). float16 is computed in float32 and rounded back."""
    x, w, b = call.inputs[0], call.inputs[1], call.input(2)
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    y = conv_core(x, w, window, call.attrs["group"], np.float32)
    if b is not None:
        y += b.astype(np.float32).reshape(-1, *(1,) * (y.ndim - 2))
    return [y.astype(x.dtype, copy=False)]


# ----------------------------------------------------------------------------------------------------------------
# ConvTranspose
# ----------------------------------------------------------------------------------------------------------------


def _transpose_geometry(call: Call, spatial, kernel):
    """(strides, dilations, pads_begin, out) of a ConvTranspose, following the ONNX formulas:
    out = s * (n - 1) + output_padding + extent - pb - pe, or pads derived from output_shape / auto_pad."""
    n = len(spatial)
    strides = int_list_attr(call, "strides", n, 1, 1)
    dilations = int_list_attr(call, "dilations", n, 1, 1)
    out_pad = int_list_attr(call, "output_padding", n, 0, 0)
    for op_, s, d in zip(out_pad, strides, dilations):
        if op_ >= max(s, d):
            call.bad_attr(f"output_padding {list(out_pad)} must be smaller than the stride or dilation "
                          f"({list(strides)}, {list(dilations)}) on each axis")
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [s * (size - 1) + p + e for s, size, p, e in zip(strides, spatial, out_pad, extents)]
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        call.bad_attr(f"auto_pad '{auto_pad}' is not one of {', '.join(AUTO_PADS)}")
    output_shape = call.attrs.get("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape:
            output_shape = [int(v) for v in output_shape]
            if len(output_shape) == n + 2:  # some exporters include N and C
                output_shape = output_shape[2:]
            if len(output_shape) != n:
                call.bad_attr(f"output_shape {output_shape} must have one value per spatial axis ({n})")
            out = output_shape
        else:
            out = [size * s for size, s in zip(spatial, strides)]
        total = [f - o for f, o in zip(full, out)]
        half = [t // 2 for t in total]  # floor division: a larger output_shape extends the end (NOTSET)
        begin = half if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, half)]
    elif auto_pad == "VALID":
        begin, out = [0] * n, full
    else:
        pads = call.attrs.get("pads") or [0] * (2 * n)
        if len(pads) != 2 * n:
            call.bad_attr(f"'pads' has {len(pads)} values, expected {2 * n} (begin and end for each spatial axis)")
        begin = [int(p) for p in pads[:n]]
        out = [f - pb - pe for f, pb, pe in zip(full, begin, pads[n:])]
    if min(out, default=1) < 1:
        call.fail(f"ConvTranspose output spatial shape {out} is empty", hint="check pads and output_shape")
    return strides, dilations, tuple(begin), tuple(out)


def _infer_conv_transpose(call: Call) -> list[TensorType]:
    x, w = call.inputs[0], call.inputs[1]
    if not x.dtype.is_float:
        call.fail(f"ConvTranspose needs float16 or float32 input, got {x.dtype.name}")
    if not stored_weight_ok(x.dtype, w.dtype):
        call.fail(f"X is {x.dtype.name} but W is {w.dtype.name}", hint="Cast W to the input's dtype")
    group = _check_conv_shapes(call, x, w, transposed=True)
    m_out = w.shape[1] * group
    _check_bias(call, call.input(2), m_out, x.dtype)
    _, _, _, out = _transpose_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    return [tensor(x.dtype, (x.shape[0], m_out, *out))]


@op("ConvTranspose", infer=_infer_conv_transpose, inputs=(2, 3), kind="conv",
    attrs={**CONV_ATTRS, "output_padding": AttrSpec("ints"), "output_shape": AttrSpec("ints")})
def conv_transpose(call: Call):
    """Transposed (fractionally strided) N-d convolution: X (N x C x ...) with W (C x M/group x k...), the
    gradient of Conv. Each input pixel scatters W into the output; pads crop the result; output_padding and
    output_shape extend the high end. Groups split C and M alike."""
    x, w, b = call.inputs[0], call.inputs[1], call.input(2)
    group = call.attrs["group"]
    kernel = kernel_from_weights(call, w.shape)
    strides, dilations, begin, out = _transpose_geometry(call, x.shape[2:], kernel)
    n_batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    cg, mg = channels // group, w.shape[1]
    taps = int(np.prod(kernel, dtype=np.int64))
    xf = x.astype(np.float32, copy=False).reshape(n_batch, group, cg, -1)
    wf = w.astype(np.float32, copy=False).reshape(group, cg, mg * taps).transpose(0, 2, 1)
    cols = np.matmul(wf, xf).reshape(n_batch, group * mg, *kernel, *spatial)  # (N, M, *K, *S)
    canvas_shape = [s * (size - 1) + (k - 1) * d + 1 for s, size, k, d in zip(strides, spatial, kernel, dilations)]
    canvas = np.zeros((n_batch, group * mg, *canvas_shape), np.float32)
    for tap in np.ndindex(*kernel):  # col2im: scatter-add each kernel tap
        dst = tuple(slice(t * d, t * d + (size - 1) * s + 1, s)
                    for t, d, size, s in zip(tap, dilations, spatial, strides))
        canvas[(slice(None), slice(None), *dst)] += cols[(slice(None), slice(None), *tap)]
    y = np.zeros((n_batch, group * mg, *out), np.float32)
    src, dst = [], []
    for pb, o, c in zip(begin, out, canvas_shape):  # crop (or zero-extend) canvas[pb : pb + out]
        lo, hi = max(pb, 0), min(pb + o, c)
        if hi <= lo:
            return [_add_bias(y, b).astype(x.dtype)]
        src.append(slice(lo, hi))
        dst.append(slice(lo - pb, hi - pb))
    y[(slice(None), slice(None), *dst)] = canvas[(slice(None), slice(None), *src)]
    return [_add_bias(y, b).astype(x.dtype, copy=False)]


def _add_bias(y: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if b is not None:
        y += b.astype(np.float32).reshape(-1, *(1,) * (y.ndim - 2))
    return y


# ----------------------------------------------------------------------------------------------------------------
# Integer convolutions
# ----------------------------------------------------------------------------------------------------------------

_QTYPES = (DType.int8, DType.uint8)


def _check_qtype(call: Call, t: TensorType, name: str) -> None:
    if t.dtype not in _QTYPES:
        call.fail(f"{name} is {t.dtype.name}, expected int8 or uint8")


def _check_zero_point(call: Call, zp: TensorType | None, of: TensorType, name: str, channels: int | None) -> None:
    if zp is None:
        return
    if zp.dtype != of.dtype:
        call.fail(f"{name} is {zp.dtype.name} but its tensor is {of.dtype.name}", hint="they must have the same dtype")
    _check_per_channel(call, zp, name, channels or 0, allow_vector=channels is not None)


def _per_channel(v: np.ndarray, rank: int, dtype) -> np.ndarray:
    """A scalar or per-output-channel vector, shaped to broadcast against an M x ... array of rank `rank`."""
    v = np.asarray(v).astype(dtype)
    return v.reshape(-1, *(1,) * (rank - 1)) if v.size > 1 else v.reshape(())


def _integer_conv(call: Call, x, x_zp, w, w_zp) -> np.ndarray:
    """conv(x - x_zp, w - w_zp) accumulated exactly in int32 (padding holds the zero point, i.e. real 0)."""
    xi = x.astype(np.int32)
    if x_zp is not None:
        xi -= np.asarray(x_zp).astype(np.int32).reshape(())
    wi = w.astype(np.int32)
    if w_zp is not None:
        wi -= _per_channel(w_zp, w.ndim, np.int32)
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    return conv_core(xi, wi, window, call.attrs["group"], np.int32)


def _infer_conv_integer(call: Call) -> list[TensorType]:
    x, w = call.inputs[0], call.inputs[1]
    _check_qtype(call, x, "x")
    _check_qtype(call, w, "w")
    _check_conv_shapes(call, x, w)
    _check_zero_point(call, call.input(2), x, "x_zero_point", None)
    _check_zero_point(call, call.input(3), w, "w_zero_point", w.shape[0])
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    return [tensor(DType.int32, (x.shape[0], w.shape[0], *window.out))]


@op("ConvInteger", infer=_infer_conv_integer, attrs=CONV_ATTRS, inputs=(2, 4), kind="conv")
def conv_integer(call: Call):
    """Integer convolution: int32 Y = conv(x - x_zero_point, w - w_zero_point) for (u)int8 x and w;
    w_zero_point may be per output channel. Padding is the zero point (real zero)."""
    x, w = call.inputs[0], call.inputs[1]
    return [_integer_conv(call, x, call.input(2), w, call.input(3))]


def _infer_qlinear_conv(call: Call) -> list[TensorType]:
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (call.input(i) for i in range(8))
    for t, name in ((x_scale, "x_scale"), (w_scale, "w_scale"), (y_scale, "y_scale"), (y_zp, "y_zero_point")):
        if t is None:
            call.fail(f"QLinearConv input {name} is missing", hint="it is required (it fixes the output scale/type)")
    _check_qtype(call, x, "x")
    _check_qtype(call, w, "w")
    _check_qtype(call, y_zp, "y_zero_point")
    _check_conv_shapes(call, x, w)
    m_out = w.shape[0]
    for t, name in ((x_scale, "x_scale"), (w_scale, "w_scale"), (y_scale, "y_scale")):
        if t.dtype != DType.float32:
            call.fail(f"{name} is {t.dtype.name}, expected float32")
    _check_per_channel(call, x_scale, "x_scale", 0, allow_vector=False)
    _check_per_channel(call, y_scale, "y_scale", 0, allow_vector=False)
    _check_per_channel(call, w_scale, "w_scale", m_out)
    _check_zero_point(call, x_zp, x, "x_zero_point", None)
    _check_zero_point(call, w_zp, w, "w_zero_point", m_out)
    _check_per_channel(call, y_zp, "y_zero_point", 0, allow_vector=False)
    _check_bias(call, call.input(8), m_out, DType.int32)
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    return [tensor(y_zp.dtype, (x.shape[0], m_out, *window.out))]


@op("QLinearConv", infer=_infer_qlinear_conv, attrs=CONV_ATTRS, inputs=(8, 9), kind="conv")
def qlinear_conv(call: Call):
    """Quantised convolution: acc = conv(x - x_zp, w - w_zp) + B in int32, then
    y = saturate(round_half_even(acc * x_scale * w_scale / y_scale) + y_zp) in y_zp's dtype. w_scale and
    w_zp may be per output channel. The requantisation multiplier and product are float32 (as runtimes do)."""
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (call.input(i) for i in range(8))
    b = call.input(8)
    acc = _integer_conv(call, x, x_zp, w, w_zp)
    if b is not None:
        acc += b.astype(np.int32).reshape(-1, *(1,) * (acc.ndim - 2))
    scale = (np.float32(np.asarray(x_scale).reshape(())) * np.asarray(w_scale, np.float32)
             / np.float32(np.asarray(y_scale).reshape(())))
    scale = _per_channel(scale, acc.ndim - 1, np.float32)
    y = np.rint(acc.astype(np.float32) * scale) + np.float32(np.asarray(y_zp).reshape(()))
    info = np.iinfo(y_zp.dtype)
    return [np.clip(y, info.min, info.max).astype(y_zp.dtype)]
