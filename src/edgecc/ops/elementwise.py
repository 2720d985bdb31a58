"""Elementwise ops: unary math, activations, binary arithmetic, comparisons, logic, Where, Cast, Identity, Dropout.

Every op here maps each output element to the elements at the same (broadcast) position of its inputs.
Binary and variadic ops use ONNX multidirectional (NumPy-style) broadcasting. Float16 inputs are computed
in float32 and rounded to float16 once, at the end. Integer arithmetic wraps (two's complement), as in ONNX.
Only the dtypes the ONNX schema allows for an op (among those edgecc supports) pass inference.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from edgecc.errors import UnsupportedOpError
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import (ANY, BOOL, FLOAT, NUMERIC, SIGNED, broadcast_shapes, check_dtype, check_same_dtype,
                               compute_dtype, widen)
from edgecc.ops.registry import REQUIRED, AttrSpec, Call, op

# --------------------------------------------------------------------------------------------------------------
# Shared helpers (the dtype groups and checks are in edgecc.ops.common)
# --------------------------------------------------------------------------------------------------------------


def broadcast_infer(allowed, result: DType | None = None):
    """Inference for ops whose operands share a dtype in `allowed` and broadcast together.

    The result has the operands' dtype, or `result` if given (bool for comparisons)."""

    def infer(call: Call) -> list[TensorType]:
        present = [i for i, t in enumerate(call.inputs) if t is not None]
        for i in present:
            check_dtype(call, i, allowed)
        check_same_dtype(call, present)
        shape = broadcast_shapes(call, *(call.inputs[i].shape for i in present))
        return [TensorType(result or call.inputs[present[0]].dtype, shape)]

    return infer


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, vectorised, accurate to ~1e-14 relative (computed in float64).

    |x| < 2.5: Maclaurin series; |x| >= 2.5: Laplace continued fraction for erfc. Returns float64."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    small = a < 2.5
    s = np.where(small, a, 0.0)
    s2 = s * s
    term = s.copy()
    total = s.copy()
    for n in range(1, 46):  # the 46th term is below 1e-17 for |x| < 2.5
        term = term * (-s2) / n
        total += term / (2 * n + 1)
    series = total * (2.0 / np.sqrt(np.pi))
    b = np.where(small, 2.5, a)
    f = b.copy()
    for k in range(20, 0, -1):  # erfc(x) = exp(-x^2)/sqrt(pi) / (x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        f = b + (k / 2) / f
    with np.errstate(over="ignore", invalid="ignore"):
        large = 1.0 - np.exp(-b * b) / (np.sqrt(np.pi) * f)
    return np.copysign(np.where(small, series, large), x)


# --------------------------------------------------------------------------------------------------------------
# Unary ops
# --------------------------------------------------------------------------------------------------------------


def _unary(name: str, allowed, attrs: dict[str, AttrSpec] | None = None, check: Callable | None = None,
           fp16_policy: str = "fp16"):
    """Register the decorated `fn(x, attrs)` as a unary elementwise op on dtypes `allowed`.

    `x` arrives widened (float16 -> float32); the result is cast back to the input's dtype.
    `check(call)` validates attributes during inference."""

    def infer(call: Call) -> list[TensorType]:
        check_dtype(call, 0, allowed)
        if check is not None:
            check(call)
        return [call.inputs[0]]

    def wrap(fn):
        def reference(call: Call):
            x = call.inputs[0]
            with np.errstate(all="ignore"):
                return [np.asarray(fn(widen(x), call.attrs)).astype(x.dtype, copy=False)]

        reference.__doc__ = fn.__doc__
        reference.__name__ = fn.__name__
        op(name, infer=infer, attrs=attrs, kind="elementwise", fp16_policy=fp16_policy)(reference)
        return fn

    return wrap


@_unary("Abs", NUMERIC)
def _abs(x, attrs):
    """|x|. For signed integers the most negative value maps to itself (two's complement)."""
    return np.abs(x)


@_unary("Neg", FLOAT | SIGNED)
def _neg(x, attrs):
    """-x (signed integers wrap)."""
    return np.negative(x)


@_unary("Sign", NUMERIC)
def _sign(x, attrs):
    """-1, 0 or 1 according to the sign of x."""
    return np.sign(x)


@_unary("Ceil", FLOAT)
def _ceil(x, attrs):
    """Smallest integer value >= x."""
    return np.ceil(x)


@_unary("Floor", FLOAT)
def _floor(x, attrs):
    """Largest integer value <= x."""
    return np.floor(x)


@_unary("Round", FLOAT)
def _round(x, attrs):
    """x rounded to the nearest integer value, halves to even (2.5 -> 2, -1.5 -> -2)."""
    return np.round(x)


@_unary("Exp", FLOAT, fp16_policy="fp32")
def _exp(x, attrs):
    """e ** x."""
    return np.exp(x)


@_unary("Log", FLOAT)
def _log(x, attrs):
    """Natural logarithm (log 0 = -inf, log of a negative number = NaN)."""
    return np.log(x)


@_unary("Sqrt", FLOAT)
def _sqrt(x, attrs):
    """Square root (NaN for negative x)."""
    return np.sqrt(x)


@_unary("Reciprocal", FLOAT)
def _reciprocal(x, attrs):
    """1 / x."""
    return np.reciprocal(x)


@_unary("Sin", FLOAT)
def _sin(x, attrs):
    """Sine of x (radians)."""
    return np.sin(x)


@_unary("Cos", FLOAT)
def _cos(x, attrs):
    """Cosine of x (radians)."""
    return np.cos(x)


@_unary("Tanh", FLOAT)
def _tanh(x, attrs):
    """Hyperbolic tangent."""
    return np.tanh(x)


@_unary("Erf", FLOAT)
def _erf(x, attrs):
    """Gauss error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt."""
    return erf(x)


@_unary("Not", BOOL)
def _not(x, attrs):
    """Logical negation of a bool tensor."""
    return np.logical_not(x)


# Activations ---------------------------------------------------------------------------------------------------


@_unary("Relu", FLOAT | SIGNED)
def _relu(x, attrs):
    """max(x, 0)."""
    return np.maximum(x, np.zeros((), x.dtype))


@_unary("LeakyRelu", FLOAT, {"alpha": AttrSpec("float", 0.01)})
def _leaky_relu(x, attrs):
    """x if x >= 0 else alpha * x (alpha default 0.01)."""
    return np.where(x >= 0, x, x * np.float32(attrs["alpha"]))


@_unary("ThresholdedRelu", FLOAT, {"alpha": AttrSpec("float", 1.0)})
def _thresholded_relu(x, attrs):
    """x if x > alpha else 0 (alpha default 1)."""
    return np.where(x > np.float32(attrs["alpha"]), x, 0)


@_unary("Elu", FLOAT, {"alpha": AttrSpec("float", 1.0)})
def _elu(x, attrs):
    """x if x >= 0 else alpha * (exp(x) - 1) (alpha default 1)."""
    return np.where(x >= 0, x, np.float32(attrs["alpha"]) * np.expm1(x))


@_unary("Selu", FLOAT, {"alpha": AttrSpec("float", 1.67326319217681884765625),
                        "gamma": AttrSpec("float", 1.05070102214813232421875)})
def _selu(x, attrs):
    """gamma * (x if x > 0 else alpha * (exp(x) - 1)), with the self-normalising alpha and gamma by default."""
    alpha, gamma = np.float32(attrs["alpha"]), np.float32(attrs["gamma"])
    return gamma * np.where(x > 0, x, alpha * np.expm1(x))


@_unary("Sigmoid", FLOAT)
def _sigmoid(x, attrs):
    """1 / (1 + exp(-x)), evaluated without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@_unary("HardSigmoid", FLOAT, {"alpha": AttrSpec("float", 0.2), "beta": AttrSpec("float", 0.5)})
def _hard_sigmoid(x, attrs):
    """max(0, min(1, alpha * x + beta)) (alpha default 0.2, beta default 0.5)."""
    return np.clip(np.float32(attrs["alpha"]) * x + np.float32(attrs["beta"]), 0, 1)


@_unary("HardSwish", FLOAT)
def _hard_swish(x, attrs):
    """x * max(0, min(1, x / 6 + 1 / 2))."""
    return x * np.clip(x * np.float32(1 / 6) + np.float32(0.5), 0, 1)


@_unary("Softplus", FLOAT)
def _softplus(x, attrs):
    """ln(exp(x) + 1), evaluated without overflow for large x."""
    return np.logaddexp(np.zeros((), x.dtype), x)


@_unary("Softsign", FLOAT)
def _softsign(x, attrs):
    """x / (1 + |x|)."""
    return x / (1 + np.abs(x))


@_unary("Mish", FLOAT)
def _mish(x, attrs):
    """x * tanh(softplus(x))."""
    return x * np.tanh(np.logaddexp(np.zeros((), x.dtype), x))


def _check_gelu(call: Call):
    if call.attrs["approximate"] not in ("none", "tanh"):
        call.bad_attr(f"Gelu approximate={call.attrs['approximate']!r} is not defined",
                      hint="use 'none' (exact, erf) or 'tanh'")


@_unary("Gelu", FLOAT, {"approximate": AttrSpec("string", "none")}, check=_check_gelu)
def _gelu(x, attrs):
    """Gaussian error linear unit: 0.5 * x * (1 + erf(x / sqrt(2))); with approximate="tanh",
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))."""
    if attrs["approximate"] == "tanh":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (1 + np.tanh(inner))
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) / np.sqrt(2.0)))).astype(x.dtype)


# PRelu and Clip ------------------------------------------------------------------------------------------------


def _infer_prelu(call: Call) -> list[TensorType]:
    x, slope = call.inputs
    check_dtype(call, 0, FLOAT | {DType.int32, DType.int64}, "X")
    check_same_dtype(call, (0, 1))
    if broadcast_shapes(call, x.shape, slope.shape) != x.shape:
        call.fail(f"PRelu slope of shape {list(slope.shape)} does not broadcast to X's shape {list(x.shape)}",
                  hint="slope must be unidirectionally broadcastable to X, e.g. [C, 1, 1] for NCHW input")
    return [x]


@op("PRelu", infer=_infer_prelu, inputs=(2, 2), kind="elementwise")
def prelu(call: Call):
    """x if x >= 0 else slope * x, with slope broadcast to x's shape."""
    x, slope = call.inputs
    with np.errstate(all="ignore"):
        return [np.where(x >= 0, widen(x), widen(x) * widen(slope)).astype(x.dtype, copy=False)]


def _infer_clip(call: Call) -> list[TensorType]:
    check_dtype(call, 0, NUMERIC)
    check_same_dtype(call, (0, 1, 2))
    for i, role in ((1, "min"), (2, "max")):
        bound = call.input(i)
        if bound is not None and bound.size != 1:
            call.fail(f"Clip {role} must be a scalar, got shape {list(bound.shape)}",
                      hint="pass a 0-d tensor (or leave the input empty for no bound)")
    return [call.inputs[0]]


@op("Clip", infer=_infer_clip, inputs=(1, 3), kind="elementwise")
def clip(call: Call):
    """min(max(x, min), max); an omitted min or max is no bound. If min > max every element becomes max."""
    x = call.inputs[0]
    lo, hi = call.input(1), call.input(2)
    y = x
    if lo is not None:
        y = np.maximum(y, np.asarray(lo, x.dtype).reshape(()))
    if hi is not None:
        y = np.minimum(y, np.asarray(hi, x.dtype).reshape(()))
    return [np.asarray(y, dtype=x.dtype)]


# --------------------------------------------------------------------------------------------------------------
# Binary and variadic ops
# --------------------------------------------------------------------------------------------------------------


def _binary(name: str, allowed, *, result: DType | None = None, attrs: dict[str, AttrSpec] | None = None,
            check: Callable | None = None, commutative: bool = False, widen_floats: bool = True):
    """Register the decorated `fn(a, b, attrs)` as a broadcasting binary op on operands of one dtype in `allowed`.

    Floats arrive widened (float16 -> float32) when `widen_floats`; the result is cast to the operands' dtype,
    or to `result` (bool for comparisons and logic)."""
    base_infer = broadcast_infer(allowed, result)

    def infer(call: Call) -> list[TensorType]:
        if check is not None:
            check(call)
        return base_infer(call)

    def wrap(fn):
        def reference(call: Call):
            a, b = call.inputs
            if widen_floats:
                a, b = widen(a), widen(b)
            dtype = result.numpy if result else call.inputs[0].dtype
            with np.errstate(all="ignore"):
                return [np.asarray(fn(a, b, call.attrs)).astype(dtype, copy=False)]

        reference.__doc__ = fn.__doc__
        reference.__name__ = fn.__name__
        op(name, infer=infer, attrs=attrs, inputs=(2, 2), kind="elementwise", commutative=commutative)(reference)
        return fn

    return wrap


@_binary("Add", NUMERIC, commutative=True)
def _add(a, b, attrs):
    """A + B with multidirectional broadcasting; integers wrap (two's complement)."""
    return np.add(a, b)


@_binary("Sub", NUMERIC)
def _sub(a, b, attrs):
    """A - B with multidirectional broadcasting; integers wrap."""
    return np.subtract(a, b)


@_binary("Mul", NUMERIC, commutative=True)
def _mul(a, b, attrs):
    """A * B with multidirectional broadcasting; integers wrap."""
    return np.multiply(a, b)


@_binary("Div", NUMERIC)
def _div(a, b, attrs):
    """A / B with multidirectional broadcasting. Integer division truncates toward zero (-7 / 2 = -3);
    integer division by zero is undefined (gives 0 here)."""
    if a.dtype.kind == "f":
        return np.divide(a, b)
    q = np.floor_divide(a, b)  # rounds toward -inf: step back up when inexact with operands of opposite sign
    inexact = ((a - q * b) != 0) & (b != 0)
    return q + (inexact & ((a < 0) != (b < 0))).astype(q.dtype)


def _check_mod(call: Call):
    if call.attrs["fmod"] not in (0, 1):
        call.bad_attr(f"Mod fmod={call.attrs['fmod']} is not defined", hint="use 0 (sign of divisor) or 1 (sign of "
                      "dividend, C fmod)")


@_binary("Mod", NUMERIC, attrs={"fmod": AttrSpec("int", 0)}, check=_check_mod)
def _mod(a, b, attrs):
    """Remainder of A / B. fmod=0 (default): A - floor(A / B) * B, the sign of the divisor (Python %);
    fmod=1: A - trunc(A / B) * B, the sign of the dividend (C fmod). Integer modulo by zero gives 0 here."""
    return np.fmod(a, b) if attrs["fmod"] == 1 else np.mod(a, b)


def _bool_binary(name: str, allowed, ufunc: np.ufunc, doc: str, *, commutative: bool = False) -> None:
    """Register `name` as the broadcasting `ufunc(a, b)` with a bool result (logic and comparisons), applied to
    the operands at their own dtype."""

    def fn(a, b, attrs):
        return ufunc(a, b)

    fn.__name__, fn.__doc__ = "_" + ufunc.__name__.removeprefix("logical_"), doc
    _binary(name, allowed, result=DType.bool, commutative=commutative, widen_floats=False)(fn)


_bool_binary("And", BOOL, np.logical_and, "Logical A and B (bool tensors, broadcast).", commutative=True)
_bool_binary("Or", BOOL, np.logical_or, "Logical A or B (bool tensors, broadcast).", commutative=True)
_bool_binary("Xor", BOOL, np.logical_xor, "Logical A xor B (bool tensors, broadcast).", commutative=True)
_bool_binary("Equal", ANY, np.equal, "A == B elementwise (bool result, broadcast).", commutative=True)
_bool_binary("Greater", NUMERIC, np.greater, "A > B elementwise (bool result, broadcast).")
_bool_binary("GreaterOrEqual", NUMERIC, np.greater_equal, "A >= B elementwise (bool result, broadcast).")
_bool_binary("Less", NUMERIC, np.less, "A < B elementwise (bool result, broadcast).")
_bool_binary("LessOrEqual", NUMERIC, np.less_equal, "A <= B elementwise (bool result, broadcast).")


# Pow: base and exponent may differ in dtype -------------------------------------------------------------------

POW_BASE = FLOAT | {DType.int32, DType.int64}


def _infer_pow(call: Call) -> list[TensorType]:
    x, y = call.inputs
    check_dtype(call, 0, POW_BASE, "base X")
    check_dtype(call, 1, NUMERIC, "exponent Y")
    return [TensorType(x.dtype, broadcast_shapes(call, x.shape, y.shape))]


@op("Pow", infer=_infer_pow, inputs=(2, 2), kind="elementwise")
def pow_(call: Call):
    """X ** Y with broadcasting; the result has X's dtype, whatever Y's dtype. Float bases are computed in
    floating point; an integer base with an integer exponent >= 0 is exact (wrapping on overflow), and with a
    negative or float exponent the float result is truncated toward zero (2 ** -1 = 0)."""
    x, y = call.inputs
    with np.errstate(all="ignore"):
        if x.dtype.kind == "f":
            wide = compute_dtype(x.dtype)
            out = np.power(x.astype(wide), y.astype(wide))
        elif y.dtype.kind in "iu":
            exact = np.power(x, np.maximum(y, 0).astype(x.dtype))
            inexact = np.power(x.astype(np.float64), y.astype(np.float64))
            out = np.where(y >= 0, exact, inexact.astype(x.dtype))
        else:
            out = np.power(x.astype(np.float64), y.astype(np.float64))
        return [np.asarray(out).astype(x.dtype)]


# Variadic ops --------------------------------------------------------------------------------------------------


def _fold(call: Call, combine: Callable, mean: bool = False) -> list[np.ndarray]:
    """Combine all inputs pairwise with `combine` (computed widened), optionally dividing by their count."""
    dtype = call.inputs[0].dtype
    shape = broadcast_shapes(call, *(t.shape for t in call.inputs))
    with np.errstate(all="ignore"):
        y = functools.reduce(combine, [widen(t) for t in call.inputs])
        if mean:
            y = y / np.asarray(len(call.inputs), y.dtype)
        return [np.broadcast_to(y, shape).astype(dtype)]


@op("Max", infer=broadcast_infer(NUMERIC), inputs=(1, -1), kind="elementwise", commutative=True)
def max_(call: Call):
    """Elementwise maximum of one or more tensors (broadcast); NaN propagates."""
    return _fold(call, np.maximum)


@op("Min", infer=broadcast_infer(NUMERIC), inputs=(1, -1), kind="elementwise", commutative=True)
def min_(call: Call):
    """Elementwise minimum of one or more tensors (broadcast); NaN propagates."""
    return _fold(call, np.minimum)


@op("Sum", infer=broadcast_infer(FLOAT), inputs=(1, -1), kind="elementwise", commutative=True)
def sum_(call: Call):
    """Elementwise sum of one or more tensors (broadcast)."""
    return _fold(call, np.add)


@op("Mean", infer=broadcast_infer(FLOAT), inputs=(1, -1), kind="elementwise", commutative=True)
def mean(call: Call):
    """Elementwise mean of one or more tensors (broadcast): their sum divided by their count."""
    return _fold(call, np.add, mean=True)


# --------------------------------------------------------------------------------------------------------------
# Where, Cast, Identity, Dropout
# --------------------------------------------------------------------------------------------------------------


def _infer_where(call: Call) -> list[TensorType]:
    check_dtype(call, 0, BOOL, "condition")
    check_dtype(call, 1, ANY, "X")
    check_same_dtype(call, (1, 2))
    shape = broadcast_shapes(call, *(t.shape for t in call.inputs))
    return [TensorType(call.inputs[1].dtype, shape)]


@op("Where", infer=_infer_where, inputs=(3, 3), kind="elementwise")
def where(call: Call):
    """X where condition is true, else Y; all three broadcast together."""
    cond, x, y = call.inputs
    return [np.where(cond, x, y).astype(x.dtype, copy=False)]


_CAST_ROUND_MODES = ("up", "down", "nearest")


def _cast_target(call: Call) -> DType:
    to = call.attrs["to"]
    try:
        return DType.from_onnx(int(to))
    except KeyError as err:
        call.bad_attr(f"Cast to={to}: {err.args[0]}", hint="cast to a supported dtype, or run the model in a "
                      "runtime that supports it")


def _infer_cast(call: Call) -> list[TensorType]:
    target = _cast_target(call)
    if call.attrs["saturate"] not in (0, 1):
        call.bad_attr(f"Cast saturate={call.attrs['saturate']} is not 0 or 1")
    if call.attrs["round_mode"] not in _CAST_ROUND_MODES:
        call.bad_attr(f"Cast round_mode={call.attrs['round_mode']!r} is not defined",
                      hint=f"use one of {', '.join(_CAST_ROUND_MODES)}")
    return [call.inputs[0].with_dtype(target)]


@op("Cast", infer=_infer_cast, attrs={"to": AttrSpec("int", REQUIRED), "saturate": AttrSpec("int", 1),
                                      "round_mode": AttrSpec("string", "up")}, kind="elementwise")
def cast(call: Call):
    """Convert each element to the dtype `to` (an ONNX TensorProto code). Float to integer truncates toward
    zero (out-of-range values are undefined); integer to narrower integer keeps the low bits; to bool is
    x != 0; from bool gives 0/1. Float to float16 overflows to +-inf. `saturate` and `round_mode` only
    affect float8 targets, which edgecc does not support, so they are accepted and ignored."""
    target = _cast_target(call)
    with np.errstate(all="ignore"):
        return [call.inputs[0].astype(target.numpy)]


@op("Identity", infer=lambda call: [call.inputs[0]], kind="elementwise", aliases_input=True)
def identity(call: Call):
    """A copy of the input."""
    return [call.inputs[0]]


def _check_dropout(call: Call, ratio_given: bool, ratio, training) -> None:
    """Reject a ratio outside [0, 1) and training-mode dropout that drops elements. `ratio`/`training` are
    values, or None when unknown (at compile time) or omitted; an omitted ratio is 0.5, omitted training false."""
    r = 0.5 if not ratio_given else None if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
    if r is not None and not 0 <= r < 1:
        call.bad_attr(f"Dropout ratio {r} is outside [0, 1)")
    if training is not None and bool(np.asarray(training).reshape(-1)[0]) and r is not None and r > 0:
        raise UnsupportedOpError(f"Dropout in training mode (training_mode true, ratio {r}) is random and not "
                                 "supported", hint="export the model in inference mode (training_mode false), "
                                 "or set ratio to 0", where=call.where or "op Dropout")


def _infer_dropout(call: Call) -> list[TensorType]:
    data = call.inputs[0]
    check_dtype(call, 0, FLOAT, "data")
    for i, role, allowed in ((1, "ratio", FLOAT), (2, "training_mode", BOOL)):
        t = call.input(i)
        if t is not None:
            check_dtype(call, i, allowed, role)
            if t.size != 1:
                call.fail(f"Dropout {role} must be a scalar, got shape {list(t.shape)}")
    _check_dropout(call, call.input(1) is not None, call.value(1), call.value(2))
    return [data, TensorType(DType.bool, data.shape)]


@op("Dropout", infer=_infer_dropout, attrs={"seed": AttrSpec("int", None)}, inputs=(1, 3), outputs=(1, 2),
    kind="elementwise")
def dropout(call: Call):
    """Inference-mode dropout: output = data, mask (optional second output) all true. Training mode
    (training_mode true) with ratio > 0 is random and rejected; with ratio 0 it is also the identity."""
    data, ratio, training = (call.input(i) for i in range(3))
    _check_dropout(call, ratio is not None, ratio, training)
    return [data, np.ones(data.shape, dtype=bool)]
