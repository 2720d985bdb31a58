"""Helpers shared by op definitions: broadcasting, axis normalisation, common inference rules."""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.registry import AttrSpec, Call, op


def broadcast_shapes(call: Call, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """NumPy-style multidirectional broadcasting, failing with the node's name."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        call.fail(f"shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")


def normalize_axis(call: Call, axis: int, rank: int, *, allow_end: bool = False) -> int:
    """Turn a possibly negative axis into 0..rank-1 (0..rank with allow_end), or fail naming the range."""
    limit = rank + 1 if allow_end else rank
    if not -limit <= axis < limit:
        call.bad_attr(f"axis {axis} is out of range for a rank-{rank} tensor", hint=f"use -{limit}..{limit - 1}")
    return axis + limit if axis < 0 else axis


def normalize_axes(call: Call, axes, rank: int) -> list[int]:
    result = [normalize_axis(call, int(a), rank) for a in axes]
    if len(set(result)) != len(result):
        call.bad_attr(f"axes {list(axes)} repeat an axis")
    return result


def first_input(call: Call) -> TensorType:
    return call.inputs[0]


def same_as_input(call: Call) -> list[TensorType]:
    """Output has the first input's type (unary elementwise ops)."""
    return [call.inputs[0]]


def broadcast_same_dtype(call: Call) -> list[TensorType]:
    """Output dtype of the first input, shape broadcast over all present inputs."""
    present = [t for t in call.inputs if t is not None]
    dtypes = {t.dtype for t in present}
    if len(dtypes) > 1:
        call.fail(f"inputs have different dtypes: {', '.join(sorted(d.name for d in dtypes))}",
                  hint="insert a Cast so the operands agree")
    return [TensorType(present[0].dtype, broadcast_shapes(call, *(t.shape for t in present)))]


def broadcast_to_bool(call: Call) -> list[TensorType]:
    """Comparison/logic ops: broadcast shape, bool result."""
    shape = broadcast_shapes(call, *(t.shape for t in call.inputs if t is not None))
    return [TensorType(DType.bool, shape)]


def tensor(dtype: DType, shape) -> TensorType:
    return TensorType(dtype, tuple(int(d) for d in shape))


def require_float(call: Call, index: int = 0) -> None:
    if not call.inputs[index].dtype.is_float:
        call.fail(f"{call.op} needs a float input, got {call.inputs[index].dtype.name}")


def unary_elementwise(name: str, fn: Callable, attrs: dict[str, AttrSpec] | None = None, *,
                      keep_dtype: bool = True) -> None:
    """Register a unary elementwise op whose reference is `fn(x, attrs)` computed at the input's dtype."""

    def reference(call: Call):
        x = call.inputs[0]
        y = fn(x, call.attrs)
        return [np.asarray(y).astype(x.dtype, copy=False) if keep_dtype else np.asarray(y)]

    reference.__doc__ = fn.__doc__
    op(name, infer=same_as_input, attrs=attrs, kind="elementwise")(reference)
