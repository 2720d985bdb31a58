"""Helpers shared by op definitions: dtype groups and checks, broadcasting, axis normalisation, compile-time
input values, common inference rules.

The input helpers work in inference (inputs are TensorTypes) and in the reference (inputs are arrays) alike."""

from __future__ import annotations

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.registry import Call

# --------------------------------------------------------------------------------------------------------------
# dtype groups (restricted to the dtypes edgecc supports) and dtype checks
# --------------------------------------------------------------------------------------------------------------

FLOAT = frozenset({DType.float32, DType.float16})
SIGNED = frozenset({DType.int8, DType.int16, DType.int32, DType.int64})
INTEGER = SIGNED | {DType.uint8}
NUMERIC = FLOAT | INTEGER
BOOL = frozenset({DType.bool})
ANY = NUMERIC | BOOL

_ORDER = list(DType)


def _names(dtypes) -> str:
    return ", ".join(d.name for d in sorted(dtypes, key=_ORDER.index))


def check_dtype(call: Call, index: int, allowed, role: str | None = None) -> DType:
    """Fail unless input `index` has one of the `allowed` dtypes; return its dtype."""
    dtype = call.inputs[index].dtype
    if dtype not in allowed:
        if allowed <= FLOAT:
            hint = "insert a Cast to float32 before it"
        elif allowed == BOOL:
            hint = "compare with zero (Equal/Not) or Cast to bool first"
        else:
            hint = f"insert a Cast to one of: {_names(allowed)}"
        call.fail(f"{call.op} {role or f'input {index}'} has dtype {dtype.name}; it accepts {_names(allowed)}",
                  hint=hint)
    return dtype


def check_same_dtype(call: Call, indices) -> None:
    """Fail unless the present inputs at `indices` share one dtype."""
    present = [(i, call.inputs[i]) for i in indices if i < len(call.inputs) and call.inputs[i] is not None]
    dtypes = {t.dtype for _, t in present}
    if len(dtypes) > 1:
        listed = ", ".join(f"input {i} is {t.dtype.name}" for i, t in present)
        call.fail(f"{call.op} needs operands of one dtype ({listed})", hint="insert a Cast so the operands agree")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype references compute in: float16 is widened to float32, everything else is kept."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def widen(x: np.ndarray) -> np.ndarray:
    """`x` in its compute dtype (float16 as float32; other dtypes unchanged, without a copy)."""
    return x.astype(compute_dtype(x.dtype), copy=False)


# --------------------------------------------------------------------------------------------------------------
# Broadcasting, axes, common inference rules
# --------------------------------------------------------------------------------------------------------------


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










def tensor(dtype: DType, shape) -> TensorType:
    return TensorType(dtype, tuple(int(d) for d in shape))


def require_float(call: Call, index: int = 0) -> None:
    if not call.inputs[index].dtype.is_float:
        call.fail(f"{call.op} needs a float input, got {call.inputs[index].dtype.name}")


# --------------------------------------------------------------------------------------------------------------
# Inputs, in inference (TensorTypes) and in the reference (arrays) alike; compile-time input values
# --------------------------------------------------------------------------------------------------------------

_CONSTANT_HINT = "make it a constant (initializer), or bind the model's dynamic dims so it can be folded"


def dense(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable array (views are copied); unlike np.ascontiguousarray it keeps 0-d arrays 0-d."""
    return np.array(array, order="C", copy=None)


def input_shape(call: Call, index: int) -> tuple[int, ...]:
    """Shape of input `index`, in inference (TensorType) and in the reference (array) alike."""
    x = call.inputs[index]
    return tuple(x.shape)


def input_dtype(call: Call, index: int) -> DType:
    """DType of input `index`, in inference (TensorType) and in the reference (array) alike."""
    x = call.inputs[index]
    return x.dtype if isinstance(x, TensorType) else DType.from_numpy(np.asarray(x).dtype)


def has_input(call: Call, index: int) -> bool:
    """Whether optional input `index` is given (present and not an empty name)."""
    return call.input(index) is not None


def known_value(call: Call, index: int, what: str) -> np.ndarray | None:
    """Input `index`'s value (None if omitted); in inference, fails if it is present but known only at run time."""
    x = call.input(index)
    if x is None:
        return None
    if isinstance(x, TensorType):
        value = call.value(index)
        if value is None:
            call.fail(f"{call.op}'s {what} (input {index}) must be known at compile time", hint=_CONSTANT_HINT)
        return np.asarray(value)
    return np.asarray(x)


def require_int(call: Call, index: int, what: str, *, rank1: bool = False, scalar: bool = False) -> None:
    """Index-like inputs must be int32/int64 (1-D or a scalar where the schema says so)."""
    if not has_input(call, index):
        return
    dtype = input_dtype(call, index)
    if dtype not in (DType.int32, DType.int64):
        call.fail(f"{call.op}'s {what} (input {index}) must be int64 (or int32), got {dtype.name}",
                  hint="insert a Cast to int64")
    shape = input_shape(call, index)
    if rank1 and len(shape) != 1:
        call.fail(f"{call.op}'s {what} (input {index}) must be a 1-D tensor, got shape {list(shape)}")
    if scalar and int(np.prod(shape, dtype=np.int64)) != 1:
        call.fail(f"{call.op}'s {what} (input {index}) must hold a single value, got shape {list(shape)}")


def known_ints(call: Call, index: int, what: str, *, rank1: bool = True) -> list[int] | None:
    """A known index-like input as a list of ints (None if omitted)."""
    require_int(call, index, what, rank1=rank1)
    value = known_value(call, index, what)
    return None if value is None else [int(v) for v in value.reshape(-1)]


def checked_axes(call: Call, axes, rank: int, what: str = "axes") -> list[int]:
    """Normalise possibly negative axes against `rank`, rejecting out-of-range and repeated ones (named `what`)."""
    result = []
    for a in axes:
        if not -rank <= a < rank:
            call.bad_attr(f"{what} value {a} is out of range for a rank-{rank} tensor",
                          hint=f"use -{rank}..{rank - 1}")
        result.append(a + rank if a < 0 else a)
    if len(set(result)) != len(result):
        call.bad_attr(f"{what} {list(axes)} repeat an axis")
    return result


def first_type(call: Call, shape) -> list[TensorType]:
    """Output types: one tensor of `shape` with input 0's dtype."""
    return [tensor(input_dtype(call, 0), shape)]


def attr_choice(call: Call, name: str, allowed) -> str:
    """The string attribute `name`, failing unless it is one of `allowed`."""
    value = call.attrs[name]
    if value not in allowed:
        call.bad_attr(f"{name}={value!r} is not supported", hint=f"use one of {', '.join(map(repr, allowed))}")
    return value
