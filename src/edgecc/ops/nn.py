"""Pooling and normalisation ops (the convolutions live in `edgecc.ops.conv`; importing this module registers
both).

Pools share the window geometry of the convolutions (`window_geometry`) and iterate over kernel taps with
strided slices of the padded input, so each tap is one vectorised NumPy operation over the whole output.
Float16 inputs are averaged / normalised in float32 and rounded back to float16.
"""

from __future__ import annotations

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops import conv as _conv  # noqa: F401  (registers the convolutions)
from edgecc.ops.common import normalize_axis, tensor
from edgecc.ops.conv import Window, pad_spatial, window_geometry, window_slices
from edgecc.ops.registry import REQUIRED, AttrSpec, Call, op

# ----------------------------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------------------------

POOL_ATTRS = {
    "auto_pad": AttrSpec("string", "NOTSET"),
    "ceil_mode": AttrSpec("int", 0),
    "dilations": AttrSpec("ints"),
    "kernel_shape": AttrSpec("ints", REQUIRED),
    "pads": AttrSpec("ints"),
    "strides": AttrSpec("ints"),
}


def pool_window(call: Call, shape) -> Window:
    """Window of a pooling op on an input of `shape` (N x C x D1 ...), with its attributes checked."""
    if len(shape) < 3:
        call.fail(f"input has rank {len(shape)}, pooling needs N x C x D1 ... (rank >= 3)",
                  hint="add batch and channel axes with Unsqueeze")
    if call.attrs["ceil_mode"] not in (0, 1):
        call.bad_attr(f"ceil_mode = {call.attrs['ceil_mode']} must be 0 or 1")
    return window_geometry(call, shape[2:], call.attrs["kernel_shape"], ceil_mode=bool(call.attrs["ceil_mode"]))


def _tap_positions(window: Window, tap, axis: int) -> np.ndarray:
    """Input coordinate (unpadded; may be out of range) read by kernel tap `tap` at each output position."""
    return (np.arange(window.out[axis]) * window.strides[axis] + tap[axis] * window.dilations[axis]
            - window.pads_begin[axis])


def _along(v: np.ndarray, axis: int, nsp: int) -> np.ndarray:
    """Reshape a 1-D per-axis vector to broadcast along spatial `axis` of an N x C x ... array."""
    return v.reshape((1, 1) + tuple(-1 if a == axis else 1 for a in range(nsp)))


def _infer_max_pool(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    if x.dtype not in (DType.float32, DType.float16, DType.int8, DType.uint8):
        call.fail(f"MaxPool takes float16, float32, int8 or uint8, got {x.dtype.name}")
    if call.attrs["storage_order"] not in (0, 1):
        call.bad_attr(f"storage_order = {call.attrs['storage_order']} must be 0 (row major) or 1 (column major)")
    window = pool_window(call, x.shape)
    shape = (*x.shape[:2], *window.out)
    return [tensor(x.dtype, shape), tensor(DType.int64, shape)]


@op("MaxPool", infer=_infer_max_pool, inputs=(1, 1), outputs=(1, 2), kind="pool",
    attrs={**POOL_ATTRS, "storage_order": AttrSpec("int", 0)})
def max_pool(call: Call):
    """Maximum over each (dilated) window; padding never wins (it is -inf). Optional Indices: int64 flat index
    of the chosen element in the unpadded input, (n * C + c) * D1*...*Dk + spatial offset, the spatial offset
    row-major (storage_order 0) or column-major (1); ties keep the first element in row-major window order."""
    x = call.inputs[0]
    window = pool_window(call, x.shape)
    spatial = x.shape[2:]
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xp = pad_spatial(x, window.pads_begin, window.needed_end_pads(spatial), lowest)
    if call.num_outputs < 2:
        y = None
        for _, sl in window_slices(window):
            y = xp[sl].copy() if y is None else np.maximum(y, xp[sl], out=y)
        return [y]
    nsp = len(spatial)
    order = range(nsp) if call.attrs["storage_order"] else range(nsp - 1, -1, -1)
    axis_stride, step = [0] * nsp, 1
    for a in order:  # the fastest-varying spatial axis gets stride 1
        axis_stride[a], step = step, step * spatial[a]
    best = np.full((*x.shape[:2], *window.out), lowest, x.dtype)
    index = np.full(best.shape, -1, np.int64)
    for tap, sl in window_slices(window):
        valid, flat = True, 0
        for a in range(nsp):
            pos = _tap_positions(window, tap, a)
            valid = valid & _along((pos >= 0) & (pos < spatial[a]), a, nsp)
            flat = flat + _along(pos * axis_stride[a], a, nsp)
        v = xp[sl]
        better = valid & ((index < 0) | (v > best))
        best = np.where(better, v, best)
        index = np.where(better, flat, index)
    base = np.arange(x.shape[0] * x.shape[1], dtype=np.int64).reshape(x.shape[:2] + (1,) * nsp) * step
    return [best, np.where(index >= 0, index + base, -1)]


def _infer_average_pool(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    if not x.dtype.is_float:
        call.fail(f"AveragePool takes float16 or float32, got {x.dtype.name}")
    if call.attrs["count_include_pad"] not in (0, 1):
        call.bad_attr(f"count_include_pad = {call.attrs['count_include_pad']} must be 0 or 1")
    window = pool_window(call, x.shape)
    return [tensor(x.dtype, (*x.shape[:2], *window.out))]


@op("AveragePool", infer=_infer_average_pool, kind="pool",
    attrs={**POOL_ATTRS, "count_include_pad": AttrSpec("int", 0)})
def average_pool(call: Call):
    """Mean over each (dilated) window. The divisor counts the window's elements inside the input
    (count_include_pad=0) or inside the input plus its declared pads (=1); the part of a ceil_mode window
    beyond the end padding never counts. Windows starting in the end padding are dropped (ceil_mode)."""
    x = call.inputs[0]
    window = pool_window(call, x.shape)
    spatial, nsp = x.shape[2:], x.ndim - 2
    xp = pad_spatial(x.astype(np.float32, copy=False), window.pads_begin, window.needed_end_pads(spatial))
    total = None
    for _, sl in window_slices(window):
        total = xp[sl].copy() if total is None else np.add(total, xp[sl], out=total)
    include_pad = call.attrs["count_include_pad"] == 1
    count = np.ones((1, 1) + (1,) * nsp, np.float32)
    for a in range(nsp):  # the count is separable: product of per-axis counts
        lo = -window.pads_begin[a] if include_pad else 0
        hi = spatial[a] + window.pads_end[a] if include_pad else spatial[a]
        pos = np.stack([_tap_positions(window, (t,) * nsp, a) for t in range(window.kernel[a])])
        count = count * _along(((pos >= lo) & (pos < hi)).sum(axis=0).astype(np.float32), a, nsp)
    return [(total / np.maximum(count, 1)).astype(x.dtype, copy=False)]


def _infer_global_pool(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    if not x.dtype.is_float:
        call.fail(f"{call.op} takes float16 or float32, got {x.dtype.name}")
    if x.rank < 2:
        call.fail(f"input has rank {x.rank}, {call.op} needs N x C x D1 ...")
    return [tensor(x.dtype, (*x.shape[:2], *(1,) * (x.rank - 2)))]


@op("GlobalAveragePool", infer=_infer_global_pool, kind="pool", fp16_policy="fp32")
def global_average_pool(call: Call):
    """Mean over all spatial axes (2..), kept as size-1 axes."""
    x = call.inputs[0]
    axes = tuple(range(2, x.ndim))
    return [np.mean(x, axis=axes, keepdims=True, dtype=np.float32).astype(x.dtype, copy=False)]


@op("GlobalMaxPool", infer=_infer_global_pool, kind="pool")
def global_max_pool(call: Call):
    """Maximum over all spatial axes (2..), kept as size-1 axes."""
    x = call.inputs[0]
    return [np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)]


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------

F32_1E_5 = float(np.float32(1e-5))
"""ONNX stores float attribute defaults as float32: 1e-5 is 9.999999747378752e-06."""


def _require_float(call: Call, t: TensorType, name: str) -> None:
    if not t.dtype.is_float:
        call.fail(f"{name} of {call.op} must be float16 or float32, got {t.dtype.name}")


def _check_channel_vectors(call: Call, names, first: int, channels: int) -> None:
    for i, name in enumerate(names, start=first):
        t = call.inputs[i]
        _require_float(call, t, name)
        if t.shape != (channels,):
            call.fail(f"{name} has shape {list(t.shape)}, expected [{channels}] (one value per channel)")


def _per_channel(v: np.ndarray, rank: int) -> np.ndarray:
    """A length-C float32 vector shaped to broadcast along axis 1 of a rank-`rank` array."""
    return v.astype(np.float32, copy=False).reshape((1, -1) + (1,) * (rank - 2)) if rank >= 2 else \
        v.astype(np.float32, copy=False)


def _infer_batch_norm(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    if call.num_outputs > 1 and call.attrs["training_mode"] == 0:
        call.fail("BatchNormalization outputs running_mean / running_var exist only in training mode",
                  hint="export the model in eval/inference mode")
    _require_float(call, x, "X")
    if x.rank < 1:
        call.fail("X must have rank >= 1 (N x C x D1 ...)")
    channels = x.shape[1] if x.rank >= 2 else 1
    _check_channel_vectors(call, ("scale", "B", "input_mean", "input_var"), 1, channels)
    return [x, call.inputs[3], call.inputs[4]]


@op("BatchNormalization", infer=_infer_batch_norm, inputs=(5, 5), outputs=(1, 3), kind="norm", fp16_policy="fp32",
    attrs={"epsilon": AttrSpec("float", F32_1E_5), "momentum": AttrSpec("float", float(np.float32(0.9))),
           "training_mode": AttrSpec("int", 0)})
def batch_normalization(call: Call):
    """Batch normalisation per channel (axis 1): Y = (X - mean) / sqrt(var + epsilon) * scale + B.

    Inference (training_mode=0) uses the running statistics input_mean / input_var. Training mode uses the
    batch's own mean and population variance, and also returns the updated running statistics
    input * momentum + batch * (1 - momentum)."""
    x, scale, bias, mean, var = call.inputs
    rank = x.ndim
    xf = x.astype(np.float32, copy=False)
    extra = []
    if call.attrs["training_mode"]:
        axes = tuple(i for i in range(rank) if i != 1)
        batch_mean = xf.mean(axis=axes)
        batch_var = np.square(xf - _per_channel(batch_mean, rank)).mean(axis=axes)
        momentum = np.float32(call.attrs["momentum"])
        extra = [(mean.astype(np.float32) * momentum + batch_mean * (1 - momentum)).astype(mean.dtype),
                 (var.astype(np.float32) * momentum + batch_var * (1 - momentum)).astype(var.dtype)]
        mean, var = batch_mean, batch_var
    a = _per_channel(scale, rank) / np.sqrt(_per_channel(var, rank) + np.float32(call.attrs["epsilon"]))
    y = (xf - _per_channel(mean, rank)) * a + _per_channel(bias, rank)
    return [y.astype(x.dtype, copy=False), *extra]


def _infer_instance_norm(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    _require_float(call, x, "input")
    if x.rank < 3:
        call.fail(f"input has rank {x.rank}, InstanceNormalization needs N x C x D1 ... (rank >= 3)")
    _check_channel_vectors(call, ("scale", "B"), 1, x.shape[1])
    return [x]


@op("InstanceNormalization", infer=_infer_instance_norm, inputs=(3, 3), kind="norm", fp16_policy="fp32",
    attrs={"epsilon": AttrSpec("float", F32_1E_5)})
def instance_normalization(call: Call):
    """Normalise each (n, c) slice over its spatial axes: (x - mean) / sqrt(var + epsilon) * scale[c] + B[c]
    (population variance)."""
    x, scale, bias = call.inputs
    xf = x.astype(np.float32, copy=False)
    axes = tuple(range(2, x.ndim))
    mean = xf.mean(axis=axes, keepdims=True)
    centred = xf - mean
    var = np.mean(np.square(centred), axis=axes, keepdims=True)
    y = centred / np.sqrt(var + np.float32(call.attrs["epsilon"])) * _per_channel(scale, x.ndim)
    return [(y + _per_channel(bias, x.ndim)).astype(x.dtype, copy=False)]


def _layer_norm_axis(call: Call, rank: int) -> int:
    if call.attrs["stash_type"] != 1:
        call.bad_attr(f"stash_type = {call.attrs['stash_type']} is not supported; only 1 (float32) is",
                      hint="edgecc computes LayerNormalization statistics in float32")
    return normalize_axis(call, call.attrs["axis"], rank)


def _infer_layer_norm(call: Call) -> list[TensorType]:
    x, scale, bias = call.inputs[0], call.inputs[1], call.input(2)
    _require_float(call, x, "X")
    if x.rank < 1:
        call.fail("LayerNormalization needs X of rank >= 1")
    axis = _layer_norm_axis(call, x.rank)
    for t, name in ((scale, "Scale"), (bias, "B")):
        if t is None:
            continue
        if t.dtype != x.dtype:
            call.fail(f"{name} is {t.dtype.name} but X is {x.dtype.name}", hint=f"Cast {name} to X's dtype")
        try:
            ok = np.broadcast_shapes(t.shape, x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            call.fail(f"{name} shape {list(t.shape)} does not broadcast to X shape {list(x.shape)}",
                      hint=f"{name} is usually X.shape[axis:] = {list(x.shape[axis:])}")
    stats = tensor(DType.float32, (*x.shape[:axis], *(1,) * (x.rank - axis)))
    return [x, stats, stats]


@op("LayerNormalization", infer=_infer_layer_norm, inputs=(2, 3), outputs=(1, 3), kind="norm", fp16_policy="fp32",
    attrs={"axis": AttrSpec("int", -1), "epsilon": AttrSpec("float", F32_1E_5), "stash_type": AttrSpec("int", 1)})
def layer_normalization(call: Call):
    """Normalise over axes [axis, rank): Normalized = (X - Mean) * InvStdDev computed in float32 (stash_type 1)
    and cast to X's dtype, then Y = Normalized * Scale + B. Optional outputs Mean and InvStdDev = 1 /
    sqrt(Var + epsilon) are float32 with the normalised axes kept as size 1."""
    x, scale, bias = call.inputs[0], call.inputs[1], call.input(2)
    axis = _layer_norm_axis(call, x.ndim)
    axes = tuple(range(axis, x.ndim))
    xf = x.astype(np.float32, copy=False)
    mean = xf.mean(axis=axes, keepdims=True)
    centred = xf - mean
    inv_std = 1.0 / np.sqrt(np.mean(np.square(centred), axis=axes, keepdims=True) + np.float32(call.attrs["epsilon"]))
    y = (centred * inv_std).astype(x.dtype, copy=False) * scale
    if bias is not None:
        y = y + bias
    return [y.astype(x.dtype, copy=False), mean, inv_std.astype(np.float32)]


def _infer_lrn(call: Call) -> list[TensorType]:
    x = call.inputs[0]
    _require_float(call, x, "X")
    if x.rank < 2:
        call.fail(f"input has rank {x.rank}, LRN needs N x C x D1 ...")
    if call.attrs["size"] < 1:
        call.bad_attr(f"size = {call.attrs['size']} must be >= 1")
    return [x]


@op("LRN", infer=_infer_lrn, kind="norm", fp16_policy="fp32",
    attrs={"alpha": AttrSpec("float", float(np.float32(1e-4))), "beta": AttrSpec("float", 0.75),
           "bias": AttrSpec("float", 1.0), "size": AttrSpec("int", REQUIRED)})
def lrn(call: Call):
    """Local response normalisation across channels: y = x / (bias + alpha / size * square_sum) ** beta, where
    square_sum sums x**2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)] clipped to the tensor."""
    x = call.inputs[0]
    size = call.attrs["size"]
    before = (size - 1) // 2
    channels = x.shape[1]
    sq = np.square(x.astype(np.float32))
    padded = np.pad(sq, [(0, 0), (before, size - 1 - before)] + [(0, 0)] * (x.ndim - 2))
    square_sum = np.zeros_like(sq)
    for k in range(size):
        square_sum += padded[:, k:k + channels]
    scale = np.float32(call.attrs["bias"]) + np.float32(call.attrs["alpha"] / size) * square_sum
    y = x.astype(np.float32) / scale ** np.float32(call.attrs["beta"])
    return [y.astype(x.dtype, copy=False)]
