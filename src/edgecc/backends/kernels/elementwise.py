"""Elementwise ops: one generic broadcasting loop, and per op a scalar function in the compute type.

The loop nests over the output's dims with broadcast strides (0 along broadcast axes), after merging adjacent
dims that every operand walks contiguously (or not at all), so an elementwise op over same-shape tensors, or
a tensor and a scalar, is one flat vectorisable loop, and `[N, C, H, W] + [1, C, 1, 1]` is two loops with a
contiguous inner one.

Scalar functions get `(kb, dtype, values)`: `dtype` is the first present input's dtype, the values are loaded
in each operand's own compute type (see codegen), and the returned value must be in the output's compute type
(it is stored through the output buffer's dtype: comparisons return i1, Cast the target's type).

Float semantics follow the NumPy references in `edgecc.ops.elementwise`: float16 computes in float32 and
rounds once on store; NaN propagates where NumPy propagates it (Max, Min, Clip, Relu); transcendentals come
from `edgecc.backends.mathlib` (no libm). Integer arithmetic wraps; integer division and modulo by zero give
0 like the reference, and never execute a trapping `sdiv`/`srem` (x86 idiv traps on 0 and on MIN / -1).
Float-to-integer conversions never produce LLVM poison: see `float_to_int` for the (reference-undefined)
NaN and out-of-range cases. On 32-bit targets int64 <-> float conversions are emulated with integer
operations, so no runtime-library call is emitted (int64 Div/Mod still call libgcc's __aeabi_ldivmod there).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from llvmlite import ir

from edgecc.backends import mathlib
from edgecc.backends.codegen import COMPUTE, F32, I1, I32, I64, UNSIGNED, KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.conversions import float_to_int
from edgecc.backends.kernels import epilogue, lowering
from edgecc.errors import OpAttributeError, ShapeError, UnsupportedOpError
from edgecc.ir.dtypes import DType

ScalarFn = Callable[[KernelBuilder, DType, list], ir.Value]

_FLAGS = ()
"""Flags on the float arithmetic of this file: none. Elementwise loops vectorise without fast-math; nnan/ninf
would let LLVM assume away the NaN and infinity handling the references require, and without `contract` the
arithmetic activations (HardSigmoid, HardSwish, LeakyRelu, ...) round exactly like the float32 reference."""


# --------------------------------------------------------------------------------------------------------------
# The generic loop
# --------------------------------------------------------------------------------------------------------------


def _coalesce(shape: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge dim k into k+1 when every operand steps over them as one dim."""
    dims = [(d, [s[k] for s in strides]) for k, d in enumerate(shape) if d != 1]
    merged: list[tuple[int, list[int]]] = []
    for d, st in dims:
        if merged:
            pd, pst = merged[-1]
            if all(p == s * d for p, s in zip(pst, st)):
                merged[-1] = (pd * d, st)
                continue
        merged.append((d, st))
    if not merged:
        merged = [(1, [0] * len(strides))]
    return [d for d, _ in merged], [[st[j] for _, st in merged] for j in range(len(strides))]


def emit_elementwise(kb: KernelBuilder, scalar: ScalarFn, input_dtype: DType | None = None) -> None:
    """out[i] = scalar(kb, dtype, [in_k[broadcast(i)] ...]) for every output element."""
    out = kb.outputs[0]
    ins = [buf for buf in kb.inputs if buf is not None]
    dtype = input_dtype or (ins[0].dtype if ins else out.dtype)
    if out.size == 0:
        return
    all_strides = [broadcast_strides(buf.shape, out.shape) for buf in ins] + [strides_of(out.shape)]
    shape, all_strides = _coalesce(list(out.shape), all_strides)
    with kb.loop_nest(shape) as idx:
        values = [kb.load(buf, kb.linear(idx, strides)) for buf, strides in zip(ins, all_strides)]
        kb.store(out, kb.linear(idx, all_strides[-1]), scalar(kb, dtype, values))


def elementwise(*ops: str):
    """Register `fn(kb, dtype, values)` as the scalar function of elementwise ops."""

    def wrap(fn: ScalarFn) -> ScalarFn:
        @lowering(*ops)
        def lower(kb: KernelBuilder) -> None:
            emit_elementwise(kb, fn)

        return fn

    return wrap


# --------------------------------------------------------------------------------------------------------------
# Small helpers on compute-type values
# --------------------------------------------------------------------------------------------------------------


def _fc(value) -> ir.Constant:
    """A float32 constant rounded like the reference's np.float32(value)."""
    return ir.Constant(F32, float(np.float32(value)))


def _fadd(kb, a, c):
    return kb.b.fadd(a, c, flags=_FLAGS)


def _fmul(kb, a, c):
    return kb.b.fmul(a, c, flags=_FLAGS)


def _fdiv(kb, a, c):
    return kb.b.fdiv(a, c)


def _intrinsic(kb, name: str, nargs: int) -> ir.Function:
    """An llvm.* float intrinsic on f32 (declared once per module)."""
    full = f"{name}.f32"
    fn = kb.module.globals.get(full)
    if fn is None:
        fn = ir.Function(kb.module, ir.FunctionType(F32, [F32] * nargs), name=full)
    return fn


def _fabs(kb, x):
    return kb.b.call(_intrinsic(kb, "llvm.fabs", 1), [x])


def _isnan(kb, x):
    return kb.b.fcmp_unordered("uno", x, x)


def _max(kb, dtype: DType, a, c):
    """numpy.maximum: for floats NaN in either operand gives NaN."""
    if dtype.is_float:
        pick_a = kb.b.or_(kb.b.fcmp_ordered(">", a, c), _isnan(kb, a))
        return kb.b.select(pick_a, a, c)
    return kb.select_max(dtype, a, c)


def _min(kb, dtype: DType, a, c):
    """numpy.minimum: for floats NaN in either operand gives NaN."""
    if dtype.is_float:
        pick_a = kb.b.or_(kb.b.fcmp_ordered("<", a, c), _isnan(kb, a))
        return kb.b.select(pick_a, a, c)
    return kb.select_min(dtype, a, c)


def _int_width(dtype: DType) -> int:
    return COMPUTE[dtype].width


def _int_limits(dtype: DType) -> tuple[int, int]:
    info = np.iinfo(dtype.numpy)
    return int(info.min), int(info.max)


# --------------------------------------------------------------------------------------------------------------
# Unary math
# --------------------------------------------------------------------------------------------------------------


def _math(fn):
    def scalar(kb, dtype, values):
        return fn(kb, values[0])

    return scalar


for _name, _fn in (("Exp", mathlib.exp), ("Log", mathlib.log), ("Tanh", mathlib.tanh), ("Erf", mathlib.erf),
                   ("Floor", mathlib.floor), ("Ceil", mathlib.ceil),
                   ("Round", mathlib.round_half_even), ("Sigmoid", mathlib.sigmoid),
                   ("Softplus", mathlib.softplus)):
    elementwise(_name)(_math(_fn))


@lowering("Sin", "Cos")
def lower_trig(kb: KernelBuilder) -> None:
    """Sin and Cos: one pass finds max |x| over the tensor (an integer max of the float bits, vectorised);
    when every |x| < 2^16 the loop uses the cheap Cody-Waite reduction (mathlib.sin_small), otherwise the
    full-range Payne-Hanek one. Same results to within the functions' stated accuracy either way."""
    full, small = (mathlib.sin, mathlib.sin_small) if kb.node.op == "Sin" else (mathlib.cos, mathlib.cos_small)
    x, out = kb.inputs[0], kb.outputs[0]
    if out.size < 64:
        emit_elementwise(kb, _math(full))
        return
    b = kb.b
    widest = b.alloca(I32, name="max_abs_bits")
    b.store(ir.Constant(I32, 0), widest)
    with kb.loop(x.size) as i:
        bits = b.and_(b.bitcast(kb.load(x, i), I32), ir.Constant(I32, 0x7FFFFFFF))
        current = b.load(widest)
        b.store(b.select(b.icmp_unsigned(">", bits, current), bits, current), widest)
    limit = int(np.float32(mathlib.SMALL_TRIG_LIMIT).view(np.int32))
    with b.if_else(b.icmp_unsigned("<", b.load(widest), ir.Constant(I32, limit))) as (then, otherwise):
        with then:
            emit_elementwise(kb, _math(small))
        with otherwise:
            emit_elementwise(kb, _math(full))


@elementwise("Abs")
def abs_(kb, dtype, values):
    (x,) = values
    if dtype.is_float:
        return _fabs(kb, x)
    if dtype in UNSIGNED:
        return x
    return kb.b.select(kb.compare(dtype, "<", x, kb.const(dtype, 0)), kb.b.sub(kb.const(dtype, 0), x), x)


@elementwise("Neg")
def neg(kb, dtype, values):
    (x,) = values
    return kb.b.fneg(x) if dtype.is_float else kb.b.sub(kb.const(dtype, 0), x)


@elementwise("Sign")
def sign(kb, dtype, values):
    (x,) = values
    b = kb.b
    if dtype.is_float:  # 0, -0 and NaN map to themselves
        return b.select(b.fcmp_ordered(">", x, _fc(0)), _fc(1),
                        b.select(b.fcmp_ordered("<", x, _fc(0)), _fc(-1), x))
    ty = COMPUTE[dtype]
    pos = b.zext(kb.compare(dtype, ">", x, kb.const(dtype, 0)), ty)
    if dtype in UNSIGNED:
        return pos
    return b.sub(pos, b.zext(kb.compare(dtype, "<", x, kb.const(dtype, 0)), ty))


@elementwise("Sqrt")
def sqrt(kb, dtype, values):
    return kb.b.call(_intrinsic(kb, "llvm.sqrt", 1), [values[0]])


@elementwise("Reciprocal")
def reciprocal(kb, dtype, values):
    return _fdiv(kb, _fc(1), values[0])


@elementwise("Not")
def not_(kb, dtype, values):
    return kb.b.xor(values[0], ir.Constant(I1, 1))


# --------------------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------------------


@elementwise("Relu")
def relu(kb, dtype, values):
    (x,) = values
    zero = kb.const(dtype, 0)
    return kb.b.select(kb.compare(dtype, "<", x, zero), zero, x)  # NaN stays NaN, like np.maximum


@elementwise("LeakyRelu")
def leaky_relu(kb, dtype, values):
    return epilogue.leaky_relu(kb, values[0], kb.attrs["alpha"])


@elementwise("ThresholdedRelu")
def thresholded_relu(kb, dtype, values):
    (x,) = values
    return kb.b.select(kb.b.fcmp_ordered(">", x, _fc(kb.attrs["alpha"])), x, _fc(0))


@elementwise("Elu")
def elu(kb, dtype, values):
    (x,) = values
    b = kb.b
    return b.select(b.fcmp_ordered(">=", x, _fc(0)), x, _fmul(kb, _fc(kb.attrs["alpha"]), mathlib.expm1(kb, x)))


@elementwise("Selu")
def selu(kb, dtype, values):
    (x,) = values
    b = kb.b
    inner = b.select(b.fcmp_ordered(">", x, _fc(0)), x, _fmul(kb, _fc(kb.attrs["alpha"]), mathlib.expm1(kb, x)))
    return _fmul(kb, _fc(kb.attrs["gamma"]), inner)


@elementwise("HardSigmoid")
def hard_sigmoid(kb, dtype, values):
    return epilogue.hard_sigmoid(kb, values[0], kb.attrs["alpha"], kb.attrs["beta"])


@elementwise("HardSwish")
def hard_swish(kb, dtype, values):
    return epilogue.hard_swish(kb, values[0])


@elementwise("Softsign")
def softsign(kb, dtype, values):
    (x,) = values
    return _fdiv(kb, x, _fadd(kb, _fc(1), _fabs(kb, x)))


@elementwise("Mish")
def mish(kb, dtype, values):
    (x,) = values
    return _fmul(kb, x, mathlib.tanh(kb, mathlib.softplus(kb, x)))


@elementwise("Gelu")
def gelu(kb, dtype, values):
    (x,) = values
    if kb.attrs["approximate"] == "tanh":
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u): the same value without 1 + tanh's cancellation for x << 0
        cube = _fmul(kb, _fmul(kb, _fmul(kb, _fc(0.044715), x), x), x)
        u = _fmul(kb, _fc(math.sqrt(2 / math.pi)), _fadd(kb, x, cube))
        return _fmul(kb, x, mathlib.sigmoid(kb, _fmul(kb, u, _fc(2))))
    if kb.attrs["approximate"] != "none":
        raise OpAttributeError(f"Gelu approximate={kb.attrs['approximate']!r} is not defined",
                               hint="use 'none' (exact, erf) or 'tanh'")
    return mathlib.gelu(kb, x)


@lowering("PRelu")
def lower_prelu(kb: KernelBuilder) -> None:
    def scalar(kb, dtype, values):
        x, slope = values
        neg_part = _fmul(kb, x, slope) if dtype.is_float else kb.b.mul(x, slope)
        return kb.b.select(kb.compare(dtype, ">=", x, kb.const(dtype, 0)), x, neg_part)

    emit_elementwise(kb, scalar)


@lowering("Clip")
def lower_clip(kb: KernelBuilder) -> None:
    has_lo = len(kb.inputs) > 1 and kb.inputs[1] is not None
    has_hi = len(kb.inputs) > 2 and kb.inputs[2] is not None

    def scalar(kb, dtype, values):
        y = values[0]
        rest = iter(values[1:])
        if has_lo:
            y = _max(kb, dtype, y, next(rest))
        if has_hi:
            y = _min(kb, dtype, y, next(rest))
        return y

    emit_elementwise(kb, scalar)


# --------------------------------------------------------------------------------------------------------------
# Binary arithmetic
# --------------------------------------------------------------------------------------------------------------


@elementwise("Add")
def add(kb, dtype, values):
    return kb.add(dtype, *values)


@elementwise("Sub")
def sub(kb, dtype, values):
    return kb.sub(dtype, *values)


@elementwise("Mul")
def mul(kb, dtype, values):
    return kb.mul(dtype, *values)


def _safe_divisor(kb, dtype, d):
    """(divisor with 0 and -1 replaced by 1, is_zero, is_minus_one): sdiv/srem never trap or make poison."""
    b = kb.b
    zero = b.icmp_unsigned("==", d, kb.const(dtype, 0))
    if dtype in UNSIGNED:
        return b.select(zero, kb.const(dtype, 1), d), zero, None
    minus1 = b.icmp_signed("==", d, ir.Constant(d.type, -1))
    return b.select(b.or_(zero, minus1), kb.const(dtype, 1), d), zero, minus1


@elementwise("Div")
def div(kb, dtype, values):
    a, d = values
    b = kb.b
    if dtype.is_float:
        return _fdiv(kb, a, d)
    safe, zero, minus1 = _safe_divisor(kb, dtype, d)
    if dtype in UNSIGNED:
        return b.select(zero, kb.const(dtype, 0), b.udiv(a, safe))
    q = b.sdiv(a, safe)  # truncates toward zero, like the reference
    q = b.select(minus1, b.sub(kb.const(dtype, 0), a), q)  # a / -1 = -a (MIN / -1 wraps to MIN)
    return b.select(zero, kb.const(dtype, 0), q)


@elementwise("Mod")
def mod(kb, dtype, values):
    a, d = values
    b = kb.b
    fmod = kb.attrs["fmod"]
    if fmod not in (0, 1):
        raise OpAttributeError(f"Mod fmod={fmod} is not defined", hint="use 0 (sign of divisor) or 1 (C fmod)")
    if dtype.is_float:
        return mathlib.fmod(kb, a, d) if fmod == 1 else mathlib.mod_floor(kb, a, d)
    safe, zero, minus1 = _safe_divisor(kb, dtype, d)
    zero_c = kb.const(dtype, 0)
    if dtype in UNSIGNED:
        return b.select(zero, zero_c, b.urem(a, safe))
    r = b.srem(a, safe)  # sign of the dividend (C fmod); x % -1 = 0 through the safe divisor
    if fmod == 0:  # Python/NumPy %: a non-zero remainder takes the divisor's sign
        differ = b.xor(b.icmp_signed("<", r, zero_c), b.icmp_signed("<", d, zero_c))
        r = b.select(b.and_(b.icmp_signed("!=", r, zero_c), differ), b.add(r, d), r)
    return b.select(zero, zero_c, r)


# Pow ----------------------------------------------------------------------------------------------------------


def _ipow(kb, base, exponent, bits: int):
    """base ** exponent by repeated squaring over the low `bits` bits of exponent (wrapping)."""
    b = kb.b
    ty = base.type
    one = ir.Constant(ty, 1)
    result = one
    e = exponent
    for k in range(bits):
        bit = b.trunc(b.lshr(e, ir.Constant(e.type, k)), I1) if k else b.trunc(e, I1)
        result = b.select(bit, b.mul(result, base), result)
        if k + 1 < bits:
            base = b.mul(base, base)
    return result


def _ipow_float(kb, base, n: int):
    """base ** n (n >= 1) for a float by repeated squaring (plain IEEE multiplies)."""
    b = kb.b
    result = None
    while n:
        if n & 1:
            result = base if result is None else b.fmul(result, base)
        n >>= 1
        if n:
            base = b.fmul(base, base)
    return result


def _int_pow_negative(kb, dtype: DType, x, odd):
    """trunc(x ** y) for y < 0 computed like the reference (float64 power, cast): 1 for x = 1, +-1 for x = -1,
    0 for |x| >= 2, and 1/0 = inf cast to int for x = 0 (INT_MIN, what NumPy gives on x86)."""
    b = kb.b
    ty = x.type
    minus_one_result = b.select(odd, ir.Constant(ty, -1), ir.Constant(ty, 1))
    r = ir.Constant(ty, 0)
    r = b.select(b.icmp_signed("==", x, ir.Constant(ty, 1)), ir.Constant(ty, 1), r)
    r = b.select(b.icmp_signed("==", x, ir.Constant(ty, -1)), minus_one_result, r)
    return b.select(b.icmp_signed("==", x, ir.Constant(ty, 0)), ir.Constant(ty, _int_limits(dtype)[0]), r)


@lowering("Pow")
def lower_pow(kb: KernelBuilder) -> None:
    xdt, ydt = kb.inputs[0].dtype, kb.inputs[1].dtype
    yconst = kb.const_input(1)
    const_exp = None
    # (only constants small enough to be part of the emitter's kernel key may specialise the kernel)
    if yconst is not None and 1 <= yconst.size <= 4096 and np.all(yconst == yconst.reshape(-1)[0]):
        const_exp = yconst.reshape(-1)[0]

    def scalar(kb, dtype, values):
        x, y = values
        b = kb.b
        if xdt.is_float:
            if const_exp is not None and float(const_exp) == 0.5 and yconst.size == 1:
                # NumPy (hence the reference) computes a scalar exponent 0.5 as sqrt: pow(-inf, .5) = NaN
                return kb.b.call(_intrinsic(kb, "llvm.sqrt", 1), [x])
            if const_exp is not None and float(const_exp) in (1.0, 2.0, 3.0, 4.0, -1.0):
                # small integer powers by multiplication: within 1.5 ulp of the correctly rounded power
                n = int(const_exp)
                p = _ipow_float(kb, x, abs(n))
                return p if n > 0 else _fdiv(kb, _fc(1), p)
            yf = kb.convert(ydt, DType.float32, y) if not ydt.is_float else y
            return mathlib.pow(kb, x, yf)
        # integer base
        width = _int_width(xdt)
        if ydt.is_float:
            ay = _fabs(kb, y)
            in_range = b.fcmp_ordered("<", ay, _fc(2.0 ** 31))
            yc = b.select(in_range, y, _fc(0))
            yi = b.fptosi(yc, I32)
            integral = b.and_(in_range, b.fcmp_ordered("==", b.sitofp(yi, F32), yc))
            exact = _int_pow_any(kb, xdt, x, DType.int32, yi)
            xf = kb.convert(xdt, DType.float32, x)
            inexact = float_to_int(kb, mathlib.pow(kb, xf, y), xdt)
            return b.select(integral, exact, inexact)
        return _int_pow_any(kb, xdt, x, ydt, y)

    emit_elementwise(kb, scalar)


def _int_pow_any(kb, xdt: DType, x, ydt: DType, y):
    """Integer base ** integer exponent like the reference: exact (wrapping) for y >= 0, else through
    _int_pow_negative."""
    b = kb.b
    zero = kb.const(ydt, 0)
    negative = kb.compare(ydt, "<", y, zero) if ydt not in UNSIGNED else ir.Constant(I1, 0)
    ynn = b.select(negative, zero, y)
    e = kb.convert(ydt, xdt, ynn)  # the reference casts max(y, 0) to the base's dtype
    exact = _ipow(kb, x, e, _int_width(xdt))
    odd = b.trunc(y, I1) if y.type != I1 else y
    return b.select(negative, _int_pow_negative(kb, xdt, x, odd), exact)


# --------------------------------------------------------------------------------------------------------------
# Comparisons and logic
# --------------------------------------------------------------------------------------------------------------


def _comparison(op: str):
    def scalar(kb, dtype, values):
        a, c = values
        if dtype is DType.bool:
            return kb.b.icmp_unsigned(op, a, c)
        return kb.compare(dtype, op, a, c)

    return scalar


for _name, _op in (("Equal", "=="), ("Greater", ">"), ("GreaterOrEqual", ">="), ("Less", "<"),
                   ("LessOrEqual", "<=")):
    elementwise(_name)(_comparison(_op))


@elementwise("And")
def and_(kb, dtype, values):
    return kb.b.and_(*values)


@elementwise("Or")
def or_(kb, dtype, values):
    return kb.b.or_(*values)


@elementwise("Xor")
def xor(kb, dtype, values):
    return kb.b.xor(*values)


# --------------------------------------------------------------------------------------------------------------
# Variadic
# --------------------------------------------------------------------------------------------------------------


@elementwise("Max")
def max_(kb, dtype, values):
    return functools.reduce(lambda acc, v: _max(kb, dtype, acc, v), values)


@elementwise("Min")
def min_(kb, dtype, values):
    return functools.reduce(lambda acc, v: _min(kb, dtype, acc, v), values)


@elementwise("Sum")
def sum_(kb, dtype, values):
    return functools.reduce(kb.b.fadd, values)


@elementwise("Mean")
def mean(kb, dtype, values):
    return _fdiv(kb, sum_(kb, dtype, values), _fc(len(values)))


# --------------------------------------------------------------------------------------------------------------
# Where, Cast, Dropout
# --------------------------------------------------------------------------------------------------------------


@elementwise("Where")
def where(kb, dtype, values):
    cond, x, y = values
    return kb.b.select(cond, x, y)


@lowering("Cast")
def lower_cast(kb: KernelBuilder) -> None:
    src, dst = kb.inputs[0].dtype, kb.outputs[0].dtype

    def scalar(kb, dtype, values):
        return kb.convert(src, dst, values[0])

    emit_elementwise(kb, scalar)


@lowering("Dropout")
def lower_dropout(kb: KernelBuilder) -> None:
    """Inference-mode Dropout: the output is a copy of the data, the optional mask all true. Training mode with
    a ratio > 0 is random: rejected like the reference; its flag and ratio must be known at compile time."""
    from edgecc.backends.kernels.movement import copy_bytes

    inputs = list(kb.inputs) + [None] * (3 - len(kb.inputs))
    data, ratio_buf, training_buf = inputs[:3]
    training = False
    if training_buf is not None:
        value = kb.const_input(2)
        if value is None:
            raise ShapeError("Dropout input 2 (training_mode) must be known at compile time for this kernel",
                             hint="make it an initializer (false for inference)")
        training = bool(np.asarray(value).reshape(-1)[0])
    if training:
        ratio = 0.5
        if ratio_buf is not None:
            value = kb.const_input(1)
            if value is None:
                raise ShapeError("Dropout input 1 (ratio) must be known at compile time when training_mode is "
                                 "true", hint="make it an initializer")
            ratio = float(np.asarray(value).reshape(-1)[0])
        if ratio > 0:
            raise UnsupportedOpError(f"Dropout in training mode (training_mode true, ratio {ratio}) is random and "
                                     "not supported", hint="export the model in inference mode (training_mode "
                                     "false), or set ratio to 0")
    out = kb.outputs[0]
    if out.type.nbytes:
        copy_bytes(kb, out.ptr, data.ptr, out.type.nbytes)
    if len(kb.outputs) > 1 and kb.outputs[1] is not None and kb.outputs[1].size:
        mask = kb.outputs[1]
        memset = kb.module.declare_intrinsic("llvm.memset", [mask.ptr.type, I64])
        kb.b.call(memset, [mask.ptr, ir.Constant(ir.IntType(8), 1), kb.i64(mask.size), ir.Constant(I1, 0)])


__all__ = ["emit_elementwise", "elementwise"]
