"""Tensor and shape-manipulation ops: constants, shape queries, reshapes, slicing and gathering, padding,
tiling, splitting, triangular masks and cumulative sums (resizing, Resize and Upsample, is in resize.py).

Ops whose output shape depends on an input's *value* (Reshape's shape, Slice's starts, Pad's pads, ...) read it
with `call.value(i)` during inference and fail when it is only known at run time. Each op's inference and
reference share one "plan" function, so inference always predicts the shape the reference produces.
"""

from __future__ import annotations

import math

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import (attr_choice, checked_axes, dense, first_type, has_input, input_dtype,
                               input_shape, known_ints, known_value, normalize_axis, require_int, tensor)
from edgecc.ops.registry import REQUIRED, AttrSpec, Call, op

# ----------------------------------------------------------------------------------------------------------
# Helpers of this file (the shared ones, in edgecc.ops.common, see TensorTypes and arrays alike)
# ----------------------------------------------------------------------------------------------------------

def _same_dtype(call: Call, indices, what: str = "inputs") -> DType:
    dtypes = [input_dtype(call, i) for i in indices if has_input(call, i)]
    if len(set(dtypes)) > 1:
        call.fail(f"{call.op}'s {what} have different dtypes: {', '.join(d.name for d in dtypes)}",
                  hint="insert a Cast so they agree")
    return dtypes[0]


# ----------------------------------------------------------------------------------------------------------
# Constants and shape queries
# ----------------------------------------------------------------------------------------------------------

_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints", "value_string",
                   "value_strings", "sparse_value")


def _constant_value(call: Call) -> np.ndarray:
    given = [name for name in _CONSTANT_ATTRS if name in call.attrs]
    if len(given) != 1:
        call.bad_attr(f"Constant needs exactly one value attribute, got {len(given)}"
                      + (f" ({', '.join(given)})" if given else ""),
                      hint=f"set one of {', '.join(_CONSTANT_ATTRS)}")
    name = given[0]
    raw = call.attrs[name]
    if name in ("value_string", "value_strings"):
        call.bad_attr(f"Constant with {name} makes a string tensor, which edgecc does not support",
                      hint="edgecc supports numeric and bool tensors only")
    if name == "sparse_value":
        call.bad_attr("Constant with sparse_value is not supported", hint="store the constant as a dense tensor")
    if name == "value_float":
        return np.array(raw, dtype=np.float32)
    if name == "value_floats":
        return np.array(raw, dtype=np.float32).reshape(-1)
    if name == "value_int":
        return np.array(raw, dtype=np.int64)
    if name == "value_ints":
        return np.array(raw, dtype=np.int64).reshape(-1)
    value = np.asarray(raw)
    try:
        DType.from_numpy(value.dtype)
    except KeyError as e:
        call.bad_attr(f"Constant value has dtype {value.dtype}, which edgecc does not support",
                      hint=str(e.args[0]))
    return value


def _infer_constant(call: Call):
    value = _constant_value(call)
    return [tensor(DType.from_numpy(value.dtype), value.shape)]


@op("Constant", infer=_infer_constant, inputs=(0, 0),
    attrs={"value": AttrSpec("tensor"), "value_float": AttrSpec("float"), "value_floats": AttrSpec("floats"),
           "value_int": AttrSpec("int"), "value_ints": AttrSpec("ints"), "value_string": AttrSpec("string"),
           "value_strings": AttrSpec("strings"), "sparse_value": AttrSpec("tensor")})
def constant(call: Call):
    """The tensor held by its one value attribute: `value` (any supported dtype), `value_float(s)` (float32
    scalar / 1-D) or `value_int(s)` (int64 scalar / 1-D). String and sparse constants are rejected."""
    return [_constant_value(call).copy()]


def _constant_of_shape_plan(call: Call):
    require_int(call, 0, "shape", rank1=True)
    dims = known_ints(call, 0, "shape")
    if any(d < 0 for d in dims):
        call.fail(f"ConstantOfShape's shape {dims} has a negative dimension", hint="all dims must be >= 0")
    value = call.attrs.get("value")
    if value is None:
        value = np.zeros(1, dtype=np.float32)
    value = np.asarray(value)
    if value.size != 1:
        call.bad_attr(f"ConstantOfShape's value must hold one element, got shape {list(value.shape)}")
    try:
        dtype = DType.from_numpy(value.dtype)
    except KeyError as e:
        call.bad_attr(f"ConstantOfShape's value has dtype {value.dtype}", hint=str(e.args[0]))
    return tuple(dims), value.reshape(-1)[0], dtype


def _infer_constant_of_shape(call: Call):
    dims, _, dtype = _constant_of_shape_plan(call)
    return [tensor(dtype, dims)]


@op("ConstantOfShape", infer=_infer_constant_of_shape, attrs={"value": AttrSpec("tensor")})
def constant_of_shape(call: Call):
    """A tensor of the shape given by the int64 input, filled with the one-element `value` attribute
    (default float32 0); its dtype is `value`'s dtype."""
    dims, value, dtype = _constant_of_shape_plan(call)
    return [np.full(dims, value, dtype=dtype.numpy)]


def _shape_range(call: Call) -> tuple[int, int]:
    rank = len(input_shape(call, 0))

    def clamp(axis: int) -> int:
        return min(max(axis + rank if axis < 0 else axis, 0), rank)

    start = clamp(call.attrs["start"])
    end = clamp(call.attrs["end"]) if "end" in call.attrs else rank
    return start, max(end, start)


def _infer_shape(call: Call):
    start, end = _shape_range(call)
    return [tensor(DType.int64, (end - start,))]


@op("Shape", infer=_infer_shape, attrs={"start": AttrSpec("int", 0), "end": AttrSpec("int")}, shape_only=True)
def shape(call: Call):
    """The input's dims as a 1-D int64 tensor, optionally only axes start..end (negative counts from the back;
    both clamped to [0, rank]; empty when start >= end)."""
    start, end = _shape_range(call)
    return [np.array(input_shape(call, 0)[start:end], dtype=np.int64)]


@op("Size", infer=lambda call: [tensor(DType.int64, ())], shape_only=True)
def size(call: Call):
    """The number of elements of the input, as an int64 scalar."""
    return [np.array(np.asarray(call.inputs[0]).size, dtype=np.int64)]


# ----------------------------------------------------------------------------------------------------------
# Reshapes and transposes (pure data movement: kind "layout")
# ----------------------------------------------------------------------------------------------------------

def _reshape_plan(call: Call) -> tuple[int, ...]:
    in_shape = input_shape(call, 0)
    require_int(call, 1, "shape", rank1=True)
    requested = known_ints(call, 1, "shape")
    allowzero = call.attrs["allowzero"]
    if requested.count(-1) > 1:
        call.fail(f"Reshape's shape {requested} has more than one -1", hint="at most one dim may be inferred")
    if any(d < -1 for d in requested):
        call.fail(f"Reshape's shape {requested} has a dim below -1")
    if allowzero and -1 in requested and 0 in requested:
        call.fail(f"Reshape's shape {requested} has both 0 and -1 with allowzero=1",
                  hint="the -1 dim cannot be determined; give it explicitly")
    out = []
    for i, d in enumerate(requested):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                call.fail(f"Reshape's shape {requested} copies dim {i} (0), but the input has rank {len(in_shape)}",
                          hint="use allowzero=1 for a real zero-sized dim, or give the dim explicitly")
            d = in_shape[i]
        out.append(d)
    total = int(np.prod(in_shape, dtype=np.int64))
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            call.fail(f"cannot reshape {list(in_shape)} ({total} elements) to {requested}",
                      hint="the -1 dim must divide the element count evenly")
        out[out.index(-1)] = total // known
    if int(np.prod(out, dtype=np.int64)) != total:
        call.fail(f"cannot reshape {list(in_shape)} ({total} elements) to {requested} "
                  f"({int(np.prod(out, dtype=np.int64))} elements)", hint="the element counts must match")
    return tuple(out)


@op("Reshape", infer=lambda call: first_type(call, _reshape_plan(call)), inputs=(2, 2),
    attrs={"allowzero": AttrSpec("int", 0)}, kind="layout", aliases_input=True)
def reshape(call: Call):
    """The data with a new shape from the int64 `shape` input: one dim may be -1 (inferred), a 0 copies the
    input's dim at that position unless allowzero=1 (then it is a real 0)."""
    return [np.reshape(call.inputs[0], _reshape_plan(call))]


def _flatten_plan(call: Call) -> tuple[int, int]:
    in_shape = input_shape(call, 0)
    rank, axis = len(in_shape), call.attrs["axis"]
    if not -rank <= axis <= rank:
        call.bad_attr(f"Flatten axis {axis} is out of range for a rank-{rank} tensor", hint=f"use -{rank}..{rank}")
    axis = axis + rank if axis < 0 else axis
    return (int(np.prod(in_shape[:axis], dtype=np.int64)), int(np.prod(in_shape[axis:], dtype=np.int64)))


@op("Flatten", infer=lambda call: first_type(call, _flatten_plan(call)), attrs={"axis": AttrSpec("int", 1)},
    kind="layout", aliases_input=True)
def flatten(call: Call):
    """2-D view of the input: dims before `axis` multiply into rows, the rest into columns."""
    return [np.reshape(call.inputs[0], _flatten_plan(call))]


def _squeeze_plan(call: Call) -> tuple[int, ...]:
    in_shape = input_shape(call, 0)
    axes = known_ints(call, 1, "axes")
    if not axes:  # omitted (or empty, as onnxruntime reads it): drop every 1-dim
        return tuple(d for d in in_shape if d != 1)
    axes = checked_axes(call, axes, len(in_shape))
    for a in axes:
        if in_shape[a] != 1:
            call.fail(f"Squeeze axis {a} has size {in_shape[a]}, not 1 (input shape {list(in_shape)})",
                      hint="only 1-sized dims can be squeezed")
    return tuple(d for i, d in enumerate(in_shape) if i not in axes)


@op("Squeeze", infer=lambda call: first_type(call, _squeeze_plan(call)), inputs=(1, 2), kind="layout", aliases_input=True)
def squeeze(call: Call):
    """Removes the 1-sized dims listed in the `axes` input (all 1-sized dims when axes is omitted)."""
    return [np.reshape(call.inputs[0], _squeeze_plan(call))]


def _unsqueeze_plan(call: Call) -> tuple[int, ...]:
    in_shape = input_shape(call, 0)
    axes = known_ints(call, 1, "axes")
    out_rank = len(in_shape) + len(axes)
    axes = set(checked_axes(call, axes, out_rank))
    rest = iter(in_shape)
    return tuple(1 if i in axes else next(rest) for i in range(out_rank))


@op("Unsqueeze", infer=lambda call: first_type(call, _unsqueeze_plan(call)), inputs=(2, 2), kind="layout", aliases_input=True)
def unsqueeze(call: Call):
    """Inserts 1-sized dims at the positions in `axes` (indices into the output, negative from the back)."""
    return [np.reshape(call.inputs[0], _unsqueeze_plan(call))]


def _perm(call: Call) -> list[int]:
    rank = len(input_shape(call, 0))
    perm = call.attrs.get("perm")
    if perm is None:
        return list(range(rank))[::-1]
    if sorted(perm) != list(range(rank)):
        call.bad_attr(f"Transpose perm {list(perm)} is not a permutation of 0..{rank - 1}",
                      hint=f"give each of the {rank} axes exactly once")
    return list(perm)


def _infer_transpose(call: Call):
    in_shape = input_shape(call, 0)
    return first_type(call, [in_shape[p] for p in _perm(call)])


@op("Transpose", infer=_infer_transpose, attrs={"perm": AttrSpec("ints")}, kind="layout")
def transpose(call: Call):
    """Permutes the axes: output axis i is input axis perm[i] (default: reversed order)."""
    return [dense(np.transpose(call.inputs[0], _perm(call)))]


def _depth_space_plan(call: Call, to_space: bool):
    in_shape = input_shape(call, 0)
    if len(in_shape) != 4:
        call.fail(f"{call.op} needs a rank-4 NCHW input, got shape {list(in_shape)}")
    b = call.attrs["blocksize"]
    if b < 1:
        call.bad_attr(f"blocksize must be >= 1, got {b}")
    mode = attr_choice(call, "mode", ("DCR", "CRD"))
    n, c, h, w = in_shape
    if to_space:
        if c % (b * b):
            call.fail(f"DepthToSpace: channels {c} are not divisible by blocksize^2 = {b * b}")
        return mode, b, (n, c // (b * b), h * b, w * b)
    if h % b or w % b:
        call.fail(f"SpaceToDepth: height {h} and width {w} must be divisible by blocksize {b}")
    return mode, b, (n, c * b * b, h // b, w // b)


@op("DepthToSpace", infer=lambda call: first_type(call, _depth_space_plan(call, True)[2]),
    attrs={"blocksize": AttrSpec("int", REQUIRED), "mode": AttrSpec("string", "DCR")})
def depth_to_space(call: Call):
    """Moves channel blocks into blocksize x blocksize spatial tiles (NCHW). DCR: channels are ordered
    (block row, block column, depth); CRD: (depth, block row, block column)."""
    x = call.inputs[0]
    mode, b, out_shape = _depth_space_plan(call, True)
    n, c, h, w = x.shape
    if mode == "DCR":
        t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return [t.reshape(out_shape)]


@op("SpaceToDepth", infer=lambda call: first_type(call, _depth_space_plan(call, False)[2]),
    attrs={"blocksize": AttrSpec("int", REQUIRED), "mode": AttrSpec("string", "DCR")})
def space_to_depth(call: Call):
    """Moves blocksize x blocksize spatial tiles into channels (NCHW), the inverse of DepthToSpace with the
    same `mode` (DCR: output channels ordered block row, block column, depth; CRD: depth first)."""
    x = call.inputs[0]
    mode, b, out_shape = _depth_space_plan(call, False)
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // b, b, w // b, b)
    t = t.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else t.transpose(0, 1, 3, 5, 2, 4)
    return [t.reshape(out_shape)]


# ----------------------------------------------------------------------------------------------------------
# Joining, splitting, slicing, gathering
# ----------------------------------------------------------------------------------------------------------

def _concat_plan(call: Call) -> tuple[int, tuple[int, ...]]:
    shapes = [input_shape(call, i) for i in range(len(call.inputs))]
    _same_dtype(call, range(len(call.inputs)))
    rank = len(shapes[0])
    if rank == 0:
        call.fail("Concat cannot join scalars", hint="Unsqueeze them to 1-D first")
    axis = normalize_axis(call, call.attrs["axis"], rank)
    for s in shapes[1:]:
        if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
            call.fail(f"Concat inputs {' and '.join(str(list(x)) for x in (shapes[0], s))} differ outside "
                      f"axis {axis}", hint="all inputs need the same rank and the same dims except on axis")
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return axis, tuple(out)


@op("Concat", infer=lambda call: first_type(call, _concat_plan(call)[1]), inputs=(1, -1),
    attrs={"axis": AttrSpec("int", REQUIRED)})
def concat(call: Call):
    """Joins the inputs along `axis` (they agree on every other dim)."""
    axis, _ = _concat_plan(call)
    return [np.concatenate(call.inputs, axis=axis)]


def _split_plan(call: Call) -> tuple[int, list[int]]:
    in_shape = input_shape(call, 0)
    axis = normalize_axis(call, call.attrs["axis"], len(in_shape))
    dim = in_shape[axis]
    n = call.num_outputs
    split = known_ints(call, 1, "split")
    num_outputs = call.attrs.get("num_outputs")
    if split is not None and num_outputs is not None:
        call.bad_attr("Split takes either the split input or the num_outputs attribute, not both")
    if split is not None:
        if len(split) != n or any(s < 0 for s in split) or sum(split) != dim:
            call.fail(f"Split sizes {split} do not split a dim of {dim} into {n} outputs",
                      hint="give one non-negative size per output, adding up to the dim")
        return axis, split
    if num_outputs is not None:
        if num_outputs < 1:
            call.bad_attr(f"num_outputs must be >= 1, got {num_outputs}")
        if num_outputs != n:
            call.bad_attr(f"Split has num_outputs={num_outputs} but {n} outputs",
                          hint="make the node's output count equal num_outputs")
    chunk = -(-dim // n)  # ceil: equal parts, the last one smaller when the dim does not divide evenly
    sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    if sizes[-1] < 0:
        call.fail(f"Split cannot cut a dim of {dim} into {n} parts of {chunk} (last part would be {sizes[-1]})",
                  hint="give explicit sizes with the split input")
    return axis, sizes


def _infer_split(call: Call):
    axis, sizes = _split_plan(call)
    in_shape = list(input_shape(call, 0))
    dtype = input_dtype(call, 0)
    return [tensor(dtype, in_shape[:axis] + [s] + in_shape[axis + 1:]) for s in sizes]


@op("Split", infer=_infer_split, inputs=(1, 2), outputs=(1, -1),
    attrs={"axis": AttrSpec("int", 0), "num_outputs": AttrSpec("int")})
def split(call: Call):
    """Cuts the input along `axis` into consecutive parts: sizes from the `split` input, else equal parts
    (ceil(dim / n) each, the last one smaller) for n = `num_outputs` or the node's output count."""
    axis, sizes = _split_plan(call)
    bounds = np.cumsum(sizes)[:-1]
    return [dense(p) for p in np.split(call.inputs[0], bounds, axis=axis)]


def _slice_plan(call: Call) -> tuple[slice, ...]:
    in_shape = input_shape(call, 0)
    rank = len(in_shape)
    starts = known_ints(call, 1, "starts")
    ends = known_ints(call, 2, "ends")
    axes = known_ints(call, 3, "axes")
    steps = known_ints(call, 4, "steps")
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        call.fail(f"Slice's starts, ends, axes and steps have different lengths "
                  f"({len(starts)}, {len(ends)}, {len(axes)}, {len(steps)})")
    axes = checked_axes(call, axes, rank)
    slices = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = in_shape[axis]
        if step == 0:
            call.fail(f"Slice step on axis {axis} is 0", hint="steps must be non-zero")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            if dim == 0:
                start, end = 0, 0
        # -1 as a Python slice end means "last element"; for backward slicing it means "before index 0".
        slices[axis] = slice(start, None if end < 0 else end, step)
    return tuple(slices)


def _infer_slice(call: Call):
    in_shape = input_shape(call, 0)
    return first_type(call, [len(range(d)[s]) for d, s in zip(in_shape, _slice_plan(call))])


@op("Slice", infer=_infer_slice, inputs=(3, 5))
def slice_(call: Call):
    """NumPy-style strided slice: per listed axis (default all, in order) from starts to ends (exclusive) by
    steps (default 1, negative walks backwards). Negative starts/ends count from the back; both are clamped
    to the dim ([0, dim] forwards, [0, dim-1] and [-1, dim-1] backwards)."""
    return [dense(call.inputs[0][_slice_plan(call)])]


def _gather_plan(call: Call) -> int:
    in_shape = input_shape(call, 0)
    if not in_shape:
        call.fail(f"{call.op} needs data of rank >= 1, got a scalar")
    require_int(call, 1, "indices")
    return normalize_axis(call, call.attrs["axis"], len(in_shape))


def _checked_indices(call: Call, indices: np.ndarray, dim: int) -> np.ndarray:
    indices = np.asarray(indices).astype(np.int64)
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        bad = indices[(indices < -dim) | (indices >= dim)].reshape(-1)[0]
        call.fail(f"{call.op} index {bad} is out of bounds for an axis of size {dim}", hint=f"use -{dim}..{dim - 1}")
    return np.where(indices < 0, indices + dim, indices)


def _infer_gather(call: Call):
    axis = _gather_plan(call)
    in_shape = input_shape(call, 0)
    indices = call.value(1)
    if indices is not None:
        _checked_indices(call, indices, in_shape[axis])
    return first_type(call, in_shape[:axis] + input_shape(call, 1) + in_shape[axis + 1:])


@op("Gather", infer=_infer_gather, inputs=(2, 2), attrs={"axis": AttrSpec("int", 0)})
def gather(call: Call):
    """Picks slices of `data` along `axis` at `indices` (negative indices count from the back); the output
    has data's dims with `axis` replaced by indices' dims."""
    axis = _gather_plan(call)
    data = call.inputs[0]
    return [np.take(data, _checked_indices(call, call.inputs[1], data.shape[axis]), axis=axis)]


def _gather_elements_plan(call: Call) -> int:
    axis = _gather_plan(call)
    data_shape, idx_shape = input_shape(call, 0), input_shape(call, 1)
    if len(idx_shape) != len(data_shape) or any(
            i > d for k, (i, d) in enumerate(zip(idx_shape, data_shape)) if k != axis):
        call.fail(f"GatherElements indices {list(idx_shape)} do not fit data {list(data_shape)}",
                  hint="indices need data's rank and no larger dims except on axis")
    return axis


def _infer_gather_elements(call: Call):
    axis = _gather_elements_plan(call)
    indices = call.value(1)
    if indices is not None:
        _checked_indices(call, indices, input_shape(call, 0)[axis])
    return first_type(call, input_shape(call, 1))


@op("GatherElements", infer=_infer_gather_elements, inputs=(2, 2), attrs={"axis": AttrSpec("int", 0)})
def gather_elements(call: Call):
    """out[i..., j, k...] = data[i..., indices[i..., j, k...], k...] along `axis` (output has indices' shape;
    negative indices count from the back)."""
    axis = _gather_elements_plan(call)
    data, indices = call.inputs
    indices = _checked_indices(call, indices, data.shape[axis])
    window = tuple(slice(None) if k == axis else slice(0, n) for k, n in enumerate(indices.shape))
    return [np.take_along_axis(data[window], indices, axis=axis)]


# ----------------------------------------------------------------------------------------------------------
# Broadcasting, tiling, padding
# ----------------------------------------------------------------------------------------------------------

def _expand_plan(call: Call) -> tuple[int, ...]:
    target = known_ints(call, 1, "shape")
    in_shape = input_shape(call, 0)
    try:
        return tuple(np.broadcast_shapes(in_shape, tuple(target)))
    except ValueError:
        call.fail(f"Expand cannot broadcast {list(in_shape)} to {target}",
                  hint="aligned from the right, each pair of dims must be equal or one of them 1")


@op("Expand", infer=lambda call: first_type(call, _expand_plan(call)), inputs=(2, 2))
def expand(call: Call):
    """Broadcasts the input against the `shape` input (NumPy rules; the result may be larger than shape)."""
    return [dense(np.broadcast_to(call.inputs[0], _expand_plan(call)))]


def _tile_plan(call: Call) -> list[int]:
    repeats = known_ints(call, 1, "repeats")
    in_shape = input_shape(call, 0)
    if len(repeats) != len(in_shape) or any(r < 0 for r in repeats):
        call.fail(f"Tile repeats {repeats} do not match a rank-{len(in_shape)} input",
                  hint="give one non-negative repeat count per input dim")
    return repeats


@op("Tile", infer=lambda call: first_type(call, [d * r for d, r in zip(input_shape(call, 0), _tile_plan(call))]),
    inputs=(2, 2))
def tile(call: Call):
    """Repeats the input repeats[i] times along each axis i (like numpy.tile, without broadcasting)."""
    return [np.tile(call.inputs[0], _tile_plan(call))]


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_plan(call: Call):
    """Mode, per-axis (begin, end) pads (negative = crop) and the output shape."""
    in_shape = input_shape(call, 0)
    rank = len(in_shape)
    mode = attr_choice(call, "mode", _PAD_MODES)
    pads = known_ints(call, 1, "pads")
    axes = known_ints(call, 3, "axes")
    axes = list(range(rank)) if axes is None else checked_axes(call, axes, rank)
    if len(pads) != 2 * len(axes):
        call.fail(f"Pad has {len(pads)} pads for {len(axes)} axes", hint="give a begin and an end pad per axis")
    if has_input(call, 2):
        if input_dtype(call, 2) != input_dtype(call, 0):
            call.fail(f"Pad constant_value is {input_dtype(call, 2).name} but data is {input_dtype(call, 0).name}",
                      hint="give constant_value the data's dtype")
        if int(np.prod(input_shape(call, 2), dtype=np.int64)) > 1:
            call.fail(f"Pad constant_value must be a scalar, got shape {list(input_shape(call, 2))}")
    plan = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        begin, end = pads[i], pads[len(axes) + i]
        dim = in_shape[axis]
        if dim + begin + end < 0:
            call.fail(f"Pad pads ({begin}, {end}) remove more than the {dim} elements of axis {axis}")
        kept = dim + min(begin, 0) + min(end, 0)
        if mode != "constant" and kept <= 0 and (begin > 0 or end > 0):
            call.fail(f"Pad mode {mode!r} has no elements left to pad axis {axis} from (size {dim}, "
                      f"pads {begin}, {end})", hint="use mode='constant', or crop less")
        plan[axis] = (begin, end)
    out = tuple(d + b + e for d, (b, e) in zip(in_shape, plan))
    return mode, plan, out


@op("Pad", infer=lambda call: first_type(call, _pad_plan(call)[2]), inputs=(2, 4),
    attrs={"mode": AttrSpec("string", "constant")})
def pad(call: Call):
    """Pads (or, for negative pads, crops) each listed axis (default all) at its beginning and end. pads =
    [x1_begin, x2_begin, ..., x1_end, x2_end, ...]. Crops apply first, then the padding of the cropped data:
    `constant` with constant_value (default 0/False; the output is then the window of the data extended with
    constants, so a crop may even reach past the data), `reflect` (mirror without repeating the edge,
    repeatedly like numpy.pad when a pad exceeds the dim), `edge` (repeat the edge), `wrap` (periodic)."""
    mode, plan, out_shape = _pad_plan(call)
    x = call.inputs[0]
    if mode == "constant":  # output[i] = x[i - begin] where that is inside x, else constant_value
        value = call.input(2)
        value = x.dtype.type(0) if value is None or np.asarray(value).size == 0 else np.asarray(value).reshape(-1)[0]
        y = np.full(out_shape, value, dtype=x.dtype)
        src = tuple(slice(max(-b, 0), max(d + min(e, 0), 0)) for d, (b, e) in zip(x.shape, plan))
        dst = tuple(slice(max(b, 0), max(b, 0) + max(s.stop - s.start, 0)) for (b, _), s in zip(plan, src))
        y[dst] = x[src]
        return [y]
    x = x[tuple(slice(max(-b, 0), d - max(-e, 0)) for d, (b, e) in zip(x.shape, plan))]
    return [np.pad(x, [(max(b, 0), max(e, 0)) for b, e in plan], mode=mode)]


# ----------------------------------------------------------------------------------------------------------
# Range, Trilu, CumSum
# ----------------------------------------------------------------------------------------------------------

_RANGE_DTYPES = (DType.float32, DType.float16, DType.int16, DType.int32, DType.int64)


def _range_plan(call: Call):
    dtype = _same_dtype(call, range(3), "start, limit and delta")
    if dtype not in _RANGE_DTYPES:
        call.fail(f"Range does not take {dtype.name}", hint="use float32, float16, int16, int32 or int64")
    for i, name in enumerate(("start", "limit", "delta")):
        if int(np.prod(input_shape(call, i), dtype=np.int64)) != 1:
            call.fail(f"Range's {name} must be a scalar, got shape {list(input_shape(call, i))}")
    start, limit, delta = (known_value(call, i, name).reshape(-1)[0]
                           for i, name in enumerate(("start", "limit", "delta")))
    if dtype.is_float:
        stash = call.attrs["stash_type"]
        if dtype == DType.float16 and stash not in (1, 11):
            call.bad_attr(f"Range stash_type={stash} is not supported", hint="use 1 (float) or 11 (double)")
        compute = np.float32 if dtype == DType.float16 and stash == 1 else np.float64
        start, limit, delta = (compute(v) for v in (start, limit, delta))
        if delta == 0 or not np.isfinite([start, limit, delta]).all():
            call.fail("Range needs a finite start and limit and a non-zero finite delta")
        count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    else:
        compute = np.int64
        start, limit, delta = int(start), int(limit), int(delta)
        if delta == 0:
            call.fail("Range delta is 0", hint="delta must be non-zero")
        count = max(-((start - limit) // delta), 0)
    return dtype, compute, start, delta, count


def _infer_range(call: Call):
    dtype, _, _, _, count = _range_plan(call)
    return [tensor(dtype, (count,))]


@op("Range", infer=_infer_range, inputs=(3, 3), attrs={"stash_type": AttrSpec("int", 1)})
def range_(call: Call):
    """[start + i * delta for i in 0..n-1] with n = max(ceil((limit - start) / delta), 0). float16 is computed
    in float32 (stash_type=1, default) or float64 (stash_type=11) and rounded once."""
    dtype, compute, start, delta, count = _range_plan(call)
    if compute is np.int64:
        values = start + np.arange(count, dtype=np.int64) * delta
    else:
        values = compute(start) + np.arange(count).astype(compute) * compute(delta)
    return [values.astype(dtype.numpy)]


def _trilu_plan(call: Call) -> int | None:
    if len(input_shape(call, 0)) < 2:
        call.fail(f"Trilu needs a rank >= 2 input, got shape {list(input_shape(call, 0))}")
    require_int(call, 1, "k", scalar=True)
    if isinstance(call.inputs[0], TensorType):
        return None  # k does not change the shape; the reference reads it
    k = call.input(1)
    return 0 if k is None else int(np.asarray(k).reshape(-1)[0])


def _infer_trilu(call: Call):
    _trilu_plan(call)
    return [call.inputs[0]]


@op("Trilu", infer=_infer_trilu, inputs=(1, 2),
    attrs={"upper": AttrSpec("int", 1)})
def trilu(call: Call):
    """Keeps the upper (upper=1: on and above diagonal k) or lower (upper=0: on and below diagonal k)
    triangle of each matrix in the last two dims and zeroes the rest; k (input, default 0) shifts the
    diagonal up (positive) or down (negative)."""
    k = _trilu_plan(call)
    x = call.inputs[0]
    rows, cols = np.indices(x.shape[-2:], sparse=True)
    keep = (cols - rows >= k) if call.attrs["upper"] else (cols - rows <= k)
    return [np.where(keep, x, np.zeros((), dtype=x.dtype))]


_CUMSUM_DTYPES = (DType.float32, DType.float16, DType.int32, DType.int64)


def _cumsum_plan(call: Call) -> int | None:
    dtype = input_dtype(call, 0)
    if dtype not in _CUMSUM_DTYPES:
        call.fail(f"CumSum does not take {dtype.name}", hint="Cast to float32, float16, int32 or int64")
    rank = len(input_shape(call, 0))
    if rank == 0:
        call.fail("CumSum needs an input of rank >= 1")
    require_int(call, 1, "axis", scalar=True)
    if isinstance(call.inputs[0], TensorType) and call.value(1) is None:
        return None  # the axis does not change the shape; the reference reads it
    return normalize_axis(call, int(known_value(call, 1, "axis").reshape(-1)[0]), rank)


def _infer_cumsum(call: Call):
    _cumsum_plan(call)
    return [call.inputs[0]]


@op("CumSum", infer=_infer_cumsum, inputs=(2, 2), fp16_policy="fp32",
    attrs={"exclusive": AttrSpec("int", 0), "reverse": AttrSpec("int", 0)})
def cumsum(call: Call):
    """Running sum along the `axis` input: exclusive=1 leaves out the element itself (starts at 0),
    reverse=1 sums from the end. float16 accumulates in float32; integers wrap."""
    axis = _cumsum_plan(call)
    x = call.inputs[0]
    acc = np.float32 if x.dtype == np.float16 else x.dtype
    if call.attrs["reverse"]:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=acc)
    if call.attrs["exclusive"] and y.shape[axis]:
        y = np.roll(y, 1, axis=axis)
        y[(slice(None),) * axis + (0,)] = 0
    if call.attrs["reverse"]:
        y = np.flip(y, axis)
    return [dense(y.astype(call.inputs[0].dtype, copy=False))]
