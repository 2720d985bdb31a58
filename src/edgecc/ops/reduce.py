"""Reductions: Reduce{L2,Max,Mean,Min,Prod,Sum,SumSquare} (opset 18 form, axes as an optional input),
ArgMax/ArgMin and TopK.

Reducing over an empty set of values gives the reduction's identity: 0 for sums (and L2), 1 for products,
-inf/+inf for float max/min (the dtype's min/max for integers, False/True for bool); ReduceMean gives NaN.
"""

from __future__ import annotations

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import normalize_axis, normalize_axes, tensor, widen
from edgecc.ops.registry import AttrSpec, Call, op

_REDUCE_ATTRS = {"keepdims": AttrSpec("int", 1), "noop_with_empty_axes": AttrSpec("int", 0)}

_NUMERIC = (DType.float32, DType.float16, DType.int32, DType.int64)
_MINMAX = _NUMERIC + (DType.int8, DType.uint8, DType.bool)


def _reduce_axes(call: Call, rank: int, axes_value) -> tuple[int, ...] | None:
    """The normalised axes to reduce, or None for 'no-op' (empty axes with noop_with_empty_axes)."""
    if axes_value is None or np.asarray(axes_value).size == 0:
        if call.attrs["noop_with_empty_axes"]:
            return None
        return tuple(range(rank))
    axes = np.asarray(axes_value).reshape(-1)
    return tuple(sorted(normalize_axes(call, axes.tolist(), rank)))


def _check_flags(call: Call) -> None:
    for name in ("keepdims", "noop_with_empty_axes"):
        if call.attrs[name] not in (0, 1):
            call.bad_attr(f"{name} must be 0 or 1, got {call.attrs[name]}")


def _reduce_infer(allowed: tuple[DType, ...]):
    def infer(call: Call) -> list[TensorType]:
        _check_flags(call)
        data = call.inputs[0]
        if data.dtype not in allowed:
            call.fail(f"{call.op} does not take {data.dtype.name}",
                      hint="supported: " + ", ".join(d.name for d in allowed) + "; insert a Cast")
        axes_type = call.input(1)
        axes_value = None
        if axes_type is not None:
            if axes_type.dtype != DType.int64 or axes_type.rank > 1:
                call.fail(f"axes must be a 1-D int64 tensor, got {axes_type}")
            axes_value = call.value(1)
            if axes_value is None:
                call.fail(f"{call.op} axes must be known at compile time",
                          hint="make `axes` a constant or initializer")
        axes = _reduce_axes(call, data.rank, axes_value)
        if axes is None:
            return [data]
        if call.attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(data.shape))
        else:
            shape = tuple(d for i, d in enumerate(data.shape) if i not in axes)
        return [tensor(data.dtype, shape)]

    return infer


def _reduction(name: str, allowed: tuple[DType, ...] = _NUMERIC, fp16_policy: str = "fp32"):
    """Register Reduce<name>: the decorated fn(x, axes, keepdims) reduces `x` (axes a non-empty tuple) and is
    also applied with axes=None for the no-op case (so composite reductions still square/sqrt). Sums keep
    float32 under convert-fp16 (fp16_policy); the extrema are exact in half."""

    def wrap(fn):
        def reference(call: Call):
            x = call.inputs[0]
            axes = _reduce_axes(call, x.ndim, call.input(1))
            y = fn(x, axes, bool(call.attrs["keepdims"]))
            return [np.asarray(y).astype(x.dtype, copy=False)]

        reference.__doc__ = fn.__doc__
        op(name, infer=_reduce_infer(allowed), attrs=dict(_REDUCE_ATTRS), inputs=(1, 2),
           kind="reduction", fp16_policy=fp16_policy)(reference)
        return fn

    return wrap


def _sum(x, axes, keepdims):
    if axes is None:
        return x
    return np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


@_reduction("ReduceSum")
def reduce_sum(x, axes, keepdims):
    """Sum over `axes` (all axes when absent; identity with noop_with_empty_axes). Integers wrap."""
    return _sum(widen(x), axes, keepdims)


@_reduction("ReduceSumSquare")
def reduce_sum_square(x, axes, keepdims):
    """Sum of squares over `axes` (squares only, with noop_with_empty_axes and no axes)."""
    w = widen(x)
    return _sum(w * w, axes, keepdims)


@_reduction("ReduceL2")
def reduce_l2(x, axes, keepdims):
    """sqrt(sum(x^2)) over `axes` (|x| with noop_with_empty_axes and no axes). Integer inputs are reduced in
    float64 and the result truncated to the input type."""
    w = x.astype(np.float64) if x.dtype.kind in "iu" else widen(x)
    return np.sqrt(_sum(w * w, axes, keepdims))


@_reduction("ReduceMean")
def reduce_mean(x, axes, keepdims):
    """Arithmetic mean over `axes` (NaN for an empty set). Integer means are computed in float64 and truncated."""
    if axes is None:
        return x
    w = x.astype(np.float64) if x.dtype.kind in "iu" else widen(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.mean(w, axis=axes, keepdims=keepdims, dtype=w.dtype)


@_reduction("ReduceProd")
def reduce_prod(x, axes, keepdims):
    """Product over `axes` (1 for an empty set). Integers wrap."""
    if axes is None:
        return x
    w = widen(x)
    return np.prod(w, axis=axes, keepdims=keepdims, dtype=w.dtype)


def _lowest(dtype: np.dtype):
    if dtype == np.bool_:
        return False
    return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min


def _highest(dtype: np.dtype):
    if dtype == np.bool_:
        return True
    return np.inf if dtype.kind == "f" else np.iinfo(dtype).max


def _extremum(ufunc: np.ufunc, identity, x, axes, keepdims):
    """`ufunc` (np.maximum or np.minimum) reduced over `axes` from `identity(x.dtype)`, which an empty set gives."""
    if axes is None:
        return x
    return ufunc.reduce(x, axis=axes, keepdims=keepdims, initial=identity(x.dtype))


@_reduction("ReduceMax", _MINMAX, fp16_policy="fp16")
def reduce_max(x, axes, keepdims):
    """Maximum over `axes`; -inf (floats), the type's minimum (integers) or False for an empty set.
    NaN propagates."""
    return _extremum(np.maximum, _lowest, x, axes, keepdims)


@_reduction("ReduceMin", _MINMAX, fp16_policy="fp16")
def reduce_min(x, axes, keepdims):
    """Minimum over `axes`; +inf (floats), the type's maximum (integers) or True for an empty set.
    NaN propagates."""
    return _extremum(np.minimum, _highest, x, axes, keepdims)


# ---------------------------------------------------------------------------------------------------------------
# ArgMax / ArgMin

_ARG_ATTRS = {"axis": AttrSpec("int", 0), "keepdims": AttrSpec("int", 1), "select_last_index": AttrSpec("int", 0)}
_ARG_TYPES = (DType.float32, DType.float16, DType.int8, DType.uint8, DType.int16, DType.int32, DType.int64)


def _infer_arg(call: Call):
    data = call.inputs[0]
    if data.dtype not in _ARG_TYPES:
        call.fail(f"{call.op} does not take {data.dtype.name}", hint="insert a Cast to a numeric type")
    for name in ("keepdims", "select_last_index"):
        if call.attrs[name] not in (0, 1):
            call.bad_attr(f"{name} must be 0 or 1, got {call.attrs[name]}")
    axis = normalize_axis(call, call.attrs["axis"], data.rank)
    if data.shape[axis] == 0:
        call.fail(f"{call.op} over axis {axis}, which has no elements", hint="the reduced axis must be non-empty")
    if call.attrs["keepdims"]:
        shape = data.shape[:axis] + (1,) + data.shape[axis + 1:]
    else:
        shape = data.shape[:axis] + data.shape[axis + 1:]
    return [tensor(DType.int64, shape)]


def _arg(call: Call, fn) -> list[np.ndarray]:
    x = call.inputs[0]
    axis = call.attrs["axis"] + x.ndim if call.attrs["axis"] < 0 else call.attrs["axis"]
    if call.attrs["select_last_index"]:
        idx = x.shape[axis] - 1 - fn(np.flip(x, axis=axis), axis=axis, keepdims=True)
    else:
        idx = fn(x, axis=axis, keepdims=True)
    if not call.attrs["keepdims"]:
        idx = np.squeeze(idx, axis=axis)
    return [idx.astype(np.int64)]


@op("ArgMax", infer=_infer_arg, attrs=_ARG_ATTRS, kind="reduction")
def arg_max(call: Call):
    """Index (int64) of the largest element along `axis`; ties give the first index, or the last with
    select_last_index."""
    return _arg(call, np.argmax)


@op("ArgMin", infer=_infer_arg, attrs=dict(_ARG_ATTRS), kind="reduction")
def arg_min(call: Call):
    """Index (int64) of the smallest element along `axis`; ties give the first index, or the last with
    select_last_index."""
    return _arg(call, np.argmin)


# ---------------------------------------------------------------------------------------------------------------
# TopK


def _infer_topk(call: Call):
    x, k_type = call.inputs
    if x.dtype not in _ARG_TYPES:
        call.fail(f"TopK does not take {x.dtype.name}", hint="insert a Cast to a numeric type")
    if k_type.dtype != DType.int64 or k_type.size != 1 or k_type.rank > 1:
        call.fail(f"K must be a 1-element int64 tensor, got {k_type}")
    for name in ("largest", "sorted"):
        if call.attrs[name] not in (0, 1):
            call.bad_attr(f"{name} must be 0 or 1, got {call.attrs[name]}")
    axis = normalize_axis(call, call.attrs["axis"], x.rank)
    k_value = call.value(1)
    if k_value is None:
        call.fail("TopK K must be known at compile time", hint="make K a constant or initializer")
    k = int(np.asarray(k_value).reshape(-1)[0])
    if not 0 <= k <= x.shape[axis]:
        call.fail(f"TopK K={k} is out of range for axis {axis} of length {x.shape[axis]}",
                  hint=f"use 0 <= K <= {x.shape[axis]}")
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    return [tensor(x.dtype, shape), tensor(DType.int64, shape)]


@op("TopK", infer=_infer_topk, inputs=(2, 2), outputs=(2, 2),
    attrs={"axis": AttrSpec("int", -1), "largest": AttrSpec("int", 1), "sorted": AttrSpec("int", 1)})
def top_k(call: Call):
    """The K largest (or smallest, largest=0) elements along `axis` and their int64 indices, sorted
    (always, even with sorted=0); equal values keep the lower index first. NaN counts as largest."""
    x, k = call.inputs
    k = int(np.asarray(k).reshape(-1)[0])
    axis = call.attrs["axis"] + x.ndim if call.attrs["axis"] < 0 else call.attrs["axis"]
    n = x.shape[axis]
    if call.attrs["largest"]:
        # A stable ascending sort of the reversed array, read backwards: descending values, and among equal
        # values the original lower index first.
        order = np.argsort(np.flip(x, axis=axis), axis=axis, kind="stable")
        order = n - 1 - np.flip(order, axis=axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]
