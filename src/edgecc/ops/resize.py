"""Resizing ops: Resize (output dims from scales or sizes, on all axes or those in `axes`; nearest, linear or
cubic sampling) and the deprecated Upsample, evaluated as the Resize it is.

Resize's scales and sizes decide the output shape, so inference reads them with `call.value(i)` and fails when
they are only known at run time. Inference and reference share one plan (`_resize_plan`), so inference always
predicts the shape the reference produces.
"""

from __future__ import annotations

import math

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ops.common import (attr_choice, checked_axes, dense, first_type, has_input, input_dtype, input_shape,
                               known_value, require_int)
from edgecc.ops.registry import AttrSpec, Call, op

_RESIZE_MODES = ("nearest", "linear", "cubic")
_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_ASPECT_POLICIES = ("stretch", "not_larger", "not_smaller")


class _AxisResize:
    """How one axis is resized: output length, scale, fractional output length, and ROI (start, end)."""

    def __init__(self, axis: int, out_len: int, scale: float, out_width: float, roi: tuple[float, float]):
        self.axis, self.out_len, self.scale, self.out_width, self.roi = axis, out_len, scale, out_width, roi


def _resize_plan(call: Call, *, scales_input: int, sizes_input: int | None, roi_input: int | None):
    """Validated attributes and the per-axis resize of Resize (and Upsample): output shape and, per resized
    axis, scale and fractional output length."""
    in_shape = input_shape(call, 0)
    rank = len(in_shape)
    attrs = call.attrs
    mode = attr_choice(call, "mode", _RESIZE_MODES)
    coord = attr_choice(call, "coordinate_transformation_mode", _COORD_MODES)
    attr_choice(call, "nearest_mode", _NEAREST_MODES)
    policy = attr_choice(call, "keep_aspect_ratio_policy", _ASPECT_POLICIES)
    if mode != "nearest" and input_dtype(call, 0) == DType.bool:
        call.fail(f"{call.op} mode {mode!r} cannot interpolate bool tensors", hint="use mode='nearest'")
    axes = attrs.get("axes")
    axes = list(range(rank)) if axes is None else checked_axes(call, list(axes), rank, "Resize axes")

    def optional_values(index, what):
        if index is None or not has_input(call, index):
            return None
        value = known_value(call, index, what)
        return None if value.size == 0 else value.reshape(-1)  # an empty tensor means "not given"

    for index, what in ((scales_input, "scales"), (roi_input, "roi")):
        if index is not None and has_input(call, index) and not input_dtype(call, index).is_float:
            call.fail(f"{call.op}'s {what} must be float, got {input_dtype(call, index).name}")
    if sizes_input is not None:
        require_int(call, sizes_input, "sizes")
    scales = optional_values(scales_input, "scales")
    sizes = optional_values(sizes_input, "sizes")
    roi = optional_values(roi_input, "roi")
    if (scales is None) == (sizes is None):
        call.fail(f"{call.op} needs exactly one of scales and sizes, got {'both' if scales is not None else 'neither'}",
                  hint="pass the other as an empty input name")
    given = scales if scales is not None else sizes
    if len(given) != len(axes):
        call.fail(f"{call.op} has {len(given)} {'scales' if scales is not None else 'sizes'} for {len(axes)} axes",
                  hint="give one value per input dim, or per entry of the axes attribute")
    if coord == "tf_crop_and_resize":
        if roi is None or len(roi) != 2 * len(axes):
            call.fail(f"tf_crop_and_resize needs an roi input of {2 * len(axes)} values "
                      f"(starts then ends), got {0 if roi is None else len(roi)}")
        rois = [(float(roi[i]), float(roi[len(axes) + i])) for i in range(len(axes))]
    else:
        rois = [(0.0, 1.0)] * len(axes)

    out_shape = list(in_shape)
    plans = []
    if scales is not None:
        if any(not s > 0 for s in scales):
            call.fail(f"{call.op} scales {scales.tolist()} must all be > 0")
        for axis, s, r in zip(axes, scales, rois):
            s = float(s)
            out_shape[axis] = int(math.floor(s * in_shape[axis]))
            plans.append(_AxisResize(axis, out_shape[axis], s, s * in_shape[axis], r))
    else:
        sizes = [int(v) for v in sizes]
        if any(v < 0 for v in sizes):
            call.fail(f"{call.op} sizes {sizes} must be >= 0")
        if any(in_shape[a] == 0 and v for a, v in zip(axes, sizes)):
            call.fail(f"{call.op} cannot resize an empty axis to a non-zero size")
        if policy == "stretch":
            for axis, v, r in zip(axes, sizes, rois):
                out_shape[axis] = v
                plans.append(_AxisResize(axis, v, v / in_shape[axis] if in_shape[axis] else 1.0, float(v), r))
        else:
            ratios = [v / in_shape[a] for a, v in zip(axes, sizes) if in_shape[a]]
            s = (min if policy == "not_larger" else max)(ratios) if ratios else 1.0
            for axis, r in zip(axes, rois):
                out_shape[axis] = int(math.floor(s * in_shape[axis] + 0.5))  # round half up
                plans.append(_AxisResize(axis, out_shape[axis], s, s * in_shape[axis], r))
    return mode, coord, tuple(out_shape), plans


def _source_coords(coord: str, p: _AxisResize, in_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x_original for every output index along one axis (float64), and for tf_crop_and_resize the mask of
    outputs that fall outside the input (they get extrapolation_value)."""
    x = np.arange(p.out_len, dtype=np.float64)
    # length_resized is scale * length_original, fractional when it comes from a scale (as in the ONNX
    # conformance data; onnxruntime uses the integer output length instead).
    s, width = p.scale, p.out_width
    if coord == "half_pixel":
        return (x + 0.5) / s - 0.5, None
    if coord == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - p.out_len / width)
        return offset + (x + 0.5) / s - 0.5, None
    if coord == "pytorch_half_pixel":  # the spec gives 0 for a length-1 output (onnx.reference uses -0.5)
        return ((x + 0.5) / s - 0.5) if width > 1 else np.zeros_like(x), None
    if coord == "align_corners":
        return (x * (in_len - 1) / (width - 1)) if width != 1 else np.zeros_like(x), None
    if coord == "asymmetric":
        return x / s, None
    start, end = p.roi  # tf_crop_and_resize
    if width != 1:
        src = start * (in_len - 1) + x * (end - start) * (in_len - 1) / (width - 1)
    else:
        src = np.full_like(x, 0.5 * (start + end) * (in_len - 1))
    return src, (src < 0) | (src > in_len - 1)


def _nearest_index(src: np.ndarray, nearest_mode: str, in_len: int) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        idx = np.ceil(src - 0.5)
    elif nearest_mode == "round_prefer_ceil":
        idx = np.floor(src + 0.5)
    elif nearest_mode == "floor":
        idx = np.floor(src)
    else:
        idx = np.ceil(src)
    return np.clip(idx, 0, in_len - 1).astype(np.intp)


def _cubic_kernel(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient a."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _interpolation_matrix(src: np.ndarray, in_len: int, mode: str, scale: float, attrs) -> np.ndarray:
    """The (out_len, in_len) matrix whose row i holds the weights output i gives each input element along
    one axis. Taps outside the input are clamped to the edge (or dropped and the row renormalised with
    exclude_outside); antialias stretches the kernel by 1/scale when downsampling."""
    radius = 1 if mode == "linear" else 2
    stretch = min(scale, 1.0) if attrs["antialias"] else 1.0
    reach = int(math.ceil(radius / stretch))
    taps = np.floor(src)[:, None].astype(np.int64) + np.arange(-reach, reach + 2)[None, :]
    t = (taps - src[:, None]) * stretch
    if mode == "linear":
        weights = np.clip(1 - np.abs(t), 0, 1)
    else:
        weights = _cubic_kernel(t, attrs["cubic_coeff_a"])
    if attrs["antialias"]:
        weights = weights / weights.sum(axis=1, keepdims=True)
    if attrs["exclude_outside"]:
        weights = np.where((taps < 0) | (taps >= in_len), 0.0, weights)
        total = weights.sum(axis=1, keepdims=True)
        weights = weights / np.where(total == 0, 1.0, total)
    matrix = np.zeros((len(src), in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(len(src))[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, in_len - 1)), weights)
    return matrix


def _is_identity(coord: str, p: _AxisResize, in_len: int) -> bool:
    return (math.isclose(p.scale, 1.0) and p.out_len == in_len
            and (coord != "tf_crop_and_resize" or (math.isclose(p.roi[0], 0.0) and math.isclose(p.roi[1], 1.0))))


def _resample(x: np.ndarray, mode: str, coord: str, plans, attrs) -> np.ndarray:
    """Separable resize: one 1-D resampling per axis (a gather for nearest, a matrix product otherwise)."""
    out_dtype = x.dtype
    y = x if mode == "nearest" else x.astype(np.float64)
    outside = np.zeros((), dtype=bool)
    for p in plans:
        in_len = y.shape[p.axis]
        if _is_identity(coord, p, in_len):
            continue
        if p.out_len == 0 or in_len == 0:
            shape = list(y.shape)
            shape[p.axis] = p.out_len
            y = np.zeros(shape, dtype=y.dtype)
            continue
        src, extrapolated = _source_coords(coord, p, in_len)
        if mode == "nearest":  # exclude_outside cannot apply: the nearest element is clamped into the input
            y = np.take(y, _nearest_index(src, attrs["nearest_mode"], in_len), axis=p.axis)
        else:
            matrix = _interpolation_matrix(src, in_len, mode, p.scale, attrs)
            y = np.moveaxis(np.tensordot(matrix, y, axes=([1], [p.axis])), 0, p.axis)
        if extrapolated is not None:
            shape = [1] * y.ndim
            shape[p.axis] = p.out_len
            outside = outside | extrapolated.reshape(shape)
    if outside.any():
        y = np.where(outside, np.asarray(attrs["extrapolation_value"]).astype(y.dtype), y)
    if np.issubdtype(out_dtype, np.integer) and y.dtype != out_dtype:
        info = np.iinfo(out_dtype)
        y = np.clip(np.round(y), info.min, info.max)
    return dense(y.astype(out_dtype, copy=False))


_RESIZE_ATTRS = {
    "mode": AttrSpec("string", "nearest"),
    "coordinate_transformation_mode": AttrSpec("string", "half_pixel"),
    "nearest_mode": AttrSpec("string", "round_prefer_floor"),
    "cubic_coeff_a": AttrSpec("float", -0.75),
    "exclude_outside": AttrSpec("int", 0),
    "extrapolation_value": AttrSpec("float", 0.0),
    "antialias": AttrSpec("int", 0),
    "axes": AttrSpec("ints"),
    "keep_aspect_ratio_policy": AttrSpec("string", "stretch"),
}


def _infer_resize(call: Call):
    return first_type(call, _resize_plan(call, scales_input=2, sizes_input=3, roi_input=1)[2])


@op("Resize", infer=_infer_resize, inputs=(1, 4), attrs=_RESIZE_ATTRS)
def resize(call: Call):
    """Resamples the input to new dims given by `scales` (out = floor(in * scale)) or `sizes` (kept to the
    input's aspect ratio with keep_aspect_ratio_policy not_larger / not_smaller), on all axes or those in
    `axes`. Each output coordinate maps back to the input by coordinate_transformation_mode, then takes the
    nearest element (nearest_mode), or interpolates (bi)linearly or (bi)cubically (Keys, cubic_coeff_a),
    optionally antialiased when downsampling and excluding taps outside the input. tf_crop_and_resize
    samples the `roi` window and writes extrapolation_value outside the input."""
    mode, coord, _, plans = _resize_plan(call, scales_input=2, sizes_input=3, roi_input=1)
    return [_resample(call.inputs[0], mode, coord, plans, call.attrs)]


def _upsample_call(call: Call) -> Call:
    """Upsample as the Resize it is: asymmetric coordinates, nearest rounds down (floor)."""
    mode = call.attrs["mode"]
    if mode not in ("nearest", "linear", "bilinear"):
        call.bad_attr(f"Upsample mode {mode!r} is not supported", hint="use 'nearest' or 'linear'")
    attrs = {name: spec.default for name, spec in _RESIZE_ATTRS.items() if spec.default is not None}
    attrs.update(mode="linear" if mode == "bilinear" else mode, coordinate_transformation_mode="asymmetric",
                 nearest_mode="floor")
    return Call("Upsample", call.inputs, attrs, call.num_outputs, values=call.values, where=call.where)


def _infer_upsample(call: Call):
    return first_type(call, _resize_plan(_upsample_call(call), scales_input=1, sizes_input=None,
                                          roi_input=None)[2])


@op("Upsample", infer=_infer_upsample, inputs=(2, 2), attrs={"mode": AttrSpec("string", "nearest")})
def upsample(call: Call):
    """Deprecated Resize: out = floor(in * scales) per axis, x_original = x / scale; `nearest` takes
    floor(x_original), `linear` interpolates (bi)linearly."""
    call = _upsample_call(call)
    mode, coord, _, plans = _resize_plan(call, scales_input=1, sizes_input=None, roi_input=None)
    return [_resample(call.inputs[0], mode, coord, plans, call.attrs)]
