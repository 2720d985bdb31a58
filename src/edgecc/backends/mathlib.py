"""edgecc's own float32 math: vectorisable approximations emitted as straight-line LLVM IR.

Generated code never calls libm: every function here takes a builder (a `KernelBuilder` or a plain llvmlite
`ir.IRBuilder`) and a float32 value (a scalar `float` or a `<N x float>` vector) and emits branch-free IR
(selects, not branches) that LLVM's loop and SLP vectorisers turn into SIMD code. The only intrinsics used
are llvm.fabs and llvm.copysign, which every backend lowers inline; sin and cos also read a small constant
table (the bits of 2/pi, a private global added to the module once).

Floating-point flags: the tricks below (Cody-Waite range reduction, the 1.5 * 2^23 rounding constant, Dekker's
exact products) rely on IEEE semantics, so no fast-math flags are set except `contract` on polynomial
evaluation, which lets targets with FMA fuse a multiply and an add (more accurate, never less). NaN and
infinities are handled explicitly with selects, and every float -> int conversion is guarded so that no
out-of-range `fptosi` (poison in LLVM) can reach a result.

Accuracy (measured against NumPy / float64 references by tests/backends/test_native_elementwise.py, in float32
units in the last place of the correctly rounded result) is stated in each function's docstring; "ulp" below
always means float32 ulp.
"""

from __future__ import annotations

import math

from llvmlite import ir

F32 = ir.FloatType()
I32 = ir.IntType(32)
_POLY = ("contract",)
"""Flags for polynomial evaluation: allow FMA formation, nothing else."""

_PI = "3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863"


def _builder(kb_or_builder) -> ir.IRBuilder:
    return getattr(kb_or_builder, "b", kb_or_builder)


class _Emitter:
    """Typed helpers for one value type (float or <N x float>) and its integer twin."""

    def __init__(self, kb_or_builder, x: ir.Value):
        self.b = _builder(kb_or_builder)
        self.ty = x.type
        if isinstance(self.ty, ir.VectorType):
            if self.ty.element != F32:
                raise TypeError(f"mathlib works on float32 values, got {self.ty}")
            self.ity = ir.VectorType(I32, self.ty.count)
            self.mangle = f"v{self.ty.count}f32"
        else:
            if self.ty != F32:
                raise TypeError(f"mathlib works on float32 values, got {self.ty}")
            self.ity = I32
            self.mangle = "f32"

    # constants
    def f(self, value: float) -> ir.Constant:
        value = float(value)
        if isinstance(self.ty, ir.VectorType):
            return ir.Constant(self.ty, [ir.Constant(F32, value)] * self.ty.count)
        return ir.Constant(F32, value)

    def i(self, value: int) -> ir.Constant:
        if isinstance(self.ity, ir.VectorType):
            return ir.Constant(self.ity, [ir.Constant(I32, int(value))] * self.ity.count)
        return ir.Constant(I32, int(value))

    # exact IEEE arithmetic (no flags)
    def add(self, a, c):
        return self.b.fadd(a, c)

    def sub(self, a, c):
        return self.b.fsub(a, c)

    def mul(self, a, c):
        return self.b.fmul(a, c)

    def div(self, a, c):
        return self.b.fdiv(a, c)

    def neg(self, a):
        return self.b.fneg(a)

    # polynomial arithmetic (contract: FMA allowed)
    def padd(self, a, c):
        return self.b.fadd(a, c, flags=_POLY)

    def pmul(self, a, c):
        return self.b.fmul(a, c, flags=_POLY)

    def horner(self, z, coeffs) -> ir.Value:
        """c0 + z * (c1 + z * (c2 + ...))."""
        acc = self.f(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            acc = self.padd(self.pmul(acc, z), self.f(c))
        return acc

    # comparisons and selects
    def lt(self, a, c):
        return self.b.fcmp_ordered("<", a, c)

    def le(self, a, c):
        return self.b.fcmp_ordered("<=", a, c)

    def gt(self, a, c):
        return self.b.fcmp_ordered(">", a, c)

    def ge(self, a, c):
        return self.b.fcmp_ordered(">=", a, c)

    def eq(self, a, c):
        return self.b.fcmp_ordered("==", a, c)

    def isnan(self, a):
        return self.b.fcmp_unordered("uno", a, a)

    def sel(self, cond, a, c):
        return self.b.select(cond, a, c)

    # intrinsics
    def _intrinsic(self, name: str, nargs: int):
        module = self.b.module
        full = f"{name}.{self.mangle}"
        fn = module.globals.get(full)
        if fn is None:
            fn = ir.Function(module, ir.FunctionType(self.ty, [self.ty] * nargs), name=full)
        return fn

    def fabs(self, a):
        return self.b.call(self._intrinsic("llvm.fabs", 1), [a])

    def copysign(self, magnitude, sign):
        return self.b.call(self._intrinsic("llvm.copysign", 2), [magnitude, sign])

    # bits
    def as_int(self, a):
        return self.b.bitcast(a, self.ity)

    def as_float(self, a):
        return self.b.bitcast(a, self.ty)

    def to_int(self, a):
        """fptosi; the caller guarantees |a| < 2^31 (no poison)."""
        return self.b.fptosi(a, self.ity)

    def to_float(self, a):
        return self.b.sitofp(a, self.ty)

    def pow2i(self, n):
        """2^n as a float for an integer n in [-126, 127] (built from the exponent bits)."""
        return self.as_float(self.b.shl(self.b.add(n, self.i(127)), self.i(23)))

    def split(self, a):
        """Dekker's split: a = hi + lo with hi holding the top 12 significant bits (exact for |a| < 2^115)."""
        c = self.mul(a, self.f(4097.0))
        hi = self.sub(c, self.sub(c, a))
        return hi, self.sub(a, hi)

    def two_prod(self, a, c):
        """(p, e) with p = fl(a * c) and p + e = a * c exactly (Dekker; no FMA needed)."""
        p = self.mul(a, c)
        ah, al = self.split(a)
        ch, cl = self.split(c)
        e = self.add(self.add(self.add(self.sub(self.mul(ah, ch), p), self.mul(ah, cl)), self.mul(al, ch)),
                     self.mul(al, cl))
        return p, e

    def two_sum(self, a, c):
        """(s, e) with s = fl(a + c) and s + e = a + c exactly (Knuth; any magnitudes)."""
        s = self.add(a, c)
        cc = self.sub(s, a)
        return s, self.add(self.sub(a, self.sub(s, cc)), self.sub(c, cc))

    def fast_two_sum(self, a, c):
        """(s, e) with s = fl(a + c) and s + e = a + c exactly, provided |a| >= |c| or a == 0."""
        s = self.add(a, c)
        return s, self.sub(c, self.sub(s, a))


def _f32(value: float) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<f", value))[0]


_TWO23 = 8388608.0  # 2^23: every float32 at or above it is an integer
_INF = float("inf")
_NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------
# Rounding
# ----------------------------------------------------------------------------------------------------------


def _trunc_core(m: _Emitter, x):
    """(small, t): small = |x| < 2^23 (false for NaN); t = x truncated toward zero where small, else 0."""
    small = m.lt(m.fabs(x), m.f(_TWO23))
    safe = m.sel(small, x, m.f(0.0))
    return small, m.to_float(m.to_int(safe))


def trunc(kb_or_builder, x: ir.Value) -> ir.Value:
    """x rounded toward zero. Exact for every float32 (NaN, infinities and -0.0 included)."""
    m = _Emitter(kb_or_builder, x)
    small, t = _trunc_core(m, x)
    return m.copysign(m.sel(small, t, x), x)


def floor(kb_or_builder, x: ir.Value) -> ir.Value:
    """The largest integer value <= x. Exact for every float32 (NaN, infinities and -0.0 included)."""
    m = _Emitter(kb_or_builder, x)
    small, t = _trunc_core(m, x)
    t = m.sel(m.gt(t, x), m.sub(t, m.f(1.0)), t)
    return m.copysign(m.sel(small, t, x), x)


def ceil(kb_or_builder, x: ir.Value) -> ir.Value:
    """The smallest integer value >= x (ceil(-0.5) = -0.0 like NumPy). Exact for every float32."""
    m = _Emitter(kb_or_builder, x)
    small, t = _trunc_core(m, x)
    t = m.sel(m.lt(t, x), m.add(t, m.f(1.0)), t)
    return m.copysign(m.sel(small, t, x), x)


def _rint_abs(m: _Emitter, ax):
    """round-half-to-even of ax >= 0 with ax < 2^23 (adding and subtracting 2^23 rounds in the FPU's mode,
    which is round-to-nearest-even; no fast-math flags, so LLVM keeps both operations)."""
    return m.sub(m.add(ax, m.f(_TWO23)), m.f(_TWO23))


def round_half_even(kb_or_builder, x: ir.Value) -> ir.Value:
    """x rounded to the nearest integer value, halves to even (numpy.round / ONNX Round). Exact for every
    float32 (NaN, infinities and signed zeros included)."""
    m = _Emitter(kb_or_builder, x)
    ax = m.fabs(x)
    small = m.lt(ax, m.f(_TWO23))
    r = _rint_abs(m, m.sel(small, ax, m.f(0.0)))
    return m.copysign(m.sel(small, r, ax), x)


rint = round_half_even


# ----------------------------------------------------------------------------------------------------------
# exp and log
# ----------------------------------------------------------------------------------------------------------

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375  # 355/512: n * _LN2_HI is exact for |n| < 2^15
_LN2_LO = -2.12194440e-4
_EXP_P = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3,
          1.9875691500e-4)  # Cephes expf: e^r = 1 + r + r^2 * P(r), |r| <= ln2/2


def _exp_core(m: _Emitter, x, lo=None):
    """e^(x + lo) for finite x already clamped to [-104, 89]; lo (optional) is a tiny correction |lo| < 2^-20.

    n = round(x / ln2), r = x - n ln2 (Cody-Waite, exact first step), e^r by a degree-7 polynomial, then the
    scale 2^n applied as two factors 2^(n>>1) * 2^(n - (n>>1)) so gradual underflow and 2^128 work."""
    t = m.mul(x, m.f(_LOG2E))
    magic = 12582912.0  # 1.5 * 2^23: t + magic - magic rounds t to an integer (|t| < 2^22)
    nf = m.sub(m.add(t, m.f(magic)), m.f(magic))
    n = m.to_int(nf)
    r = m.sub(x, m.mul(nf, m.f(_LN2_HI)))  # exact: nf * LN2_HI has <= 24 bits, Sterbenz
    r = m.sub(r, m.mul(nf, m.f(_LN2_LO)))
    if lo is not None:
        r = m.add(r, lo)
    z = m.mul(r, r)
    p = m.padd(m.padd(m.pmul(z, m.horner(r, _EXP_P)), r), m.f(1.0))
    n1 = m.b.ashr(n, m.i(1))
    n2 = m.b.sub(n, n1)
    return m.mul(m.mul(p, m.pow2i(n1)), m.pow2i(n2))


def _clamp_exp_arg(m: _Emitter, x):
    """x clamped to [-104, 89] (beyond, e^x is 0 or inf in float32 anyway); NaN becomes 0 (patched later)."""
    c = m.sel(m.gt(x, m.f(89.0)), m.f(89.0), x)
    c = m.sel(m.lt(c, m.f(-104.0)), m.f(-104.0), c)
    return m.sel(m.isnan(x), m.f(0.0), c)


def exp(kb_or_builder, x: ir.Value) -> ir.Value:
    """e^x. Max error 1.01 ulp over the whole float32 range where the result is normal (measured on 10^7
    points including the overflow and underflow edges); subnormal results within about 1 subnormal ulp;
    overflow to +inf above ln(FLT_MAX), 0 below -103.98, NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    y = _exp_core(m, _clamp_exp_arg(m, x))
    return m.sel(m.isnan(x), x, y)


_EXPM1_P = tuple(1.0 / math.factorial(k) for k in range(2, 10))  # 1/2!, 1/3!, ... 1/9!


def expm1(kb_or_builder, x: ir.Value) -> ir.Value:
    """e^x - 1, accurate near 0: Taylor series (to x^9) for |x| < 0.5, e^x - 1 beyond. Max error 1.8 ulp."""
    m = _Emitter(kb_or_builder, x)
    e = m.sub(exp(m.b, x), m.f(1.0))
    ax = m.fabs(x)
    small = m.lt(ax, m.f(0.5))
    xs = m.sel(small, x, m.f(0.0))
    p = m.padd(m.pmul(m.pmul(xs, xs), m.horner(xs, _EXPM1_P)), xs)
    return m.sel(small, p, e)


_SQRT2 = 1.41421356237309505
_LOG_P = (3.3333331174e-1, -2.4999993993e-1, 2.0000714765e-1, -1.6668057665e-1, 1.4249322787e-1,
          -1.2420140846e-1, 1.1676998740e-1, -1.1514610310e-1, 7.0376836292e-2)  # Cephes logf


def _log_parts(m: _Emitter, x):
    """For finite x > 0: (e, f) with x = 2^e * (1 + f), 1 + f in [sqrt(1/2), sqrt(2)); e as float, f exact."""
    sub = m.lt(x, m.f(1.1754943508222875e-38))  # subnormal (or <= 0: patched by the caller)
    xs = m.sel(sub, m.mul(x, m.f(_TWO23)), x)
    bits = m.as_int(xs)
    e = m.b.sub(m.b.and_(m.b.lshr(bits, m.i(23)), m.i(0xFF)), m.i(127))
    e = m.b.sub(e, m.b.select(sub, m.i(23), m.i(0)))
    mant = m.as_float(m.b.or_(m.b.and_(bits, m.i(0x007FFFFF)), m.i(0x3F800000)))  # [1, 2)
    big = m.gt(mant, m.f(_SQRT2))
    mant = m.sel(big, m.mul(mant, m.f(0.5)), mant)
    e = m.b.add(e, m.b.zext(big, m.ity))
    return m.to_float(e), m.sub(mant, m.f(1.0))


def _log_specials(m: _Emitter, x, y):
    """Patch log's special cases: log(+inf) = inf, log(+-0) = -inf, log(x < 0) = NaN, NaN stays NaN."""
    y = m.sel(m.eq(x, m.f(_INF)), m.f(_INF), y)
    y = m.sel(m.eq(x, m.f(0.0)), m.f(-_INF), y)
    y = m.sel(m.lt(x, m.f(0.0)), m.f(_NAN), y)
    return m.sel(m.isnan(x), x, y)


def log(kb_or_builder, x: ir.Value) -> ir.Value:
    """Natural logarithm (Cephes logf polynomial). Max error 0.85 ulp over all positive float32 (subnormals
    included); log(0) = -inf, log(x < 0) = NaN, log(inf) = inf."""
    m = _Emitter(kb_or_builder, x)
    e, f = _log_parts(m, x)
    z = m.mul(f, f)
    y = m.pmul(m.pmul(f, z), m.horner(f, _LOG_P))
    y = m.padd(y, m.mul(e, m.f(_LN2_LO)))
    y = m.sub(y, m.mul(z, m.f(0.5)))
    y = m.add(f, y)
    y = m.add(y, m.mul(e, m.f(_LN2_HI)))
    return _log_specials(m, x, y)


def log1p(kb_or_builder, x: ir.Value) -> ir.Value:
    """log(1 + x), accurate near 0 (log(w) * x / (w - 1) with w = 1 + x). Max error 2.4 ulp for x >= -1."""
    m = _Emitter(kb_or_builder, x)
    w = m.add(x, m.f(1.0))
    d = m.sub(w, m.f(1.0))
    lw = log(m.b, w)
    exact = m.eq(d, m.f(0.0))
    safe_d = m.sel(exact, m.f(1.0), d)
    y = m.mul(lw, m.div(x, safe_d))
    y = m.sel(exact, x, y)
    return m.sel(m.eq(w, m.f(_INF)), w, m.sel(m.eq(w, m.f(0.0)), lw, y))


# ----------------------------------------------------------------------------------------------------------
# Hyperbolic and sigmoid
# ----------------------------------------------------------------------------------------------------------

_TANH_P = (-3.33332819422e-1, 1.33314422036e-1, -5.37397155531e-2, 2.06390887954e-2, -5.70498872745e-3)  # Cephes


def tanh(kb_or_builder, x: ir.Value) -> ir.Value:
    """Hyperbolic tangent: odd polynomial for |x| < 0.625, 1 - 2 / (e^(2|x|) + 1) beyond (sign restored).
    Max error 1.3 ulp; +-1 for |x| > 9.01; NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    ax = m.fabs(x)
    small = m.lt(ax, m.f(0.625))
    xs = m.sel(small, x, m.f(0.0))
    z = m.mul(xs, xs)
    p = m.padd(m.pmul(m.pmul(z, xs), m.horner(z, _TANH_P)), xs)
    e = exp(m.b, m.mul(ax, m.f(2.0)))
    big = m.copysign(m.sub(m.f(1.0), m.div(m.f(2.0), m.add(e, m.f(1.0)))), x)
    return m.sel(small, p, big)


def sigmoid(kb_or_builder, x: ir.Value) -> ir.Value:
    """1 / (1 + e^-x) without overflow: e = e^-|x|, then 1 / (1 + e) for x >= 0 and e / (1 + e) below.
    Max error 2.3 ulp (relative, also in the tail toward 0); NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    e = exp(m.b, m.neg(m.fabs(x)))
    d = m.add(m.f(1.0), e)
    return m.sel(m.ge(x, m.f(0.0)), m.div(m.f(1.0), d), m.div(e, d))


def softplus(kb_or_builder, x: ir.Value) -> ir.Value:
    """log(1 + e^x) without overflow, like numpy.logaddexp(0, x): max(x, 0) + log1p(e^-|x|).
    Max error 2.7 ulp; softplus(inf) = inf, softplus(-inf) = 0, NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    e = exp(m.b, m.neg(m.fabs(x)))
    pos = m.sel(m.gt(x, m.f(0.0)), x, m.f(0.0))
    y = m.add(pos, log1p(m.b, e))
    return m.sel(m.isnan(x), x, y)


# ----------------------------------------------------------------------------------------------------------
# erf and erfc
# ----------------------------------------------------------------------------------------------------------

_ERF_T = 0.75
_ERF_Q = (0.12837916612625122, -0.3761261999607086, 0.11283376812934875, -0.026834622025489807,
          0.005114339757710695, -0.0006749466410838068)
"""erf(x) = x + x * Q(x^2) on |x| <= 0.75 (near-minimax fit, relative error 1.4e-9)."""
_ERFC_SPLIT = 2.0
_ERFC_MID = 1.375
_ERFC_A = (0.3432959020137787, -0.18431547284126282, 0.08986203372478485, -0.04050339385867119,
           0.01708674244582653, -0.006804710254073143, 0.0025636886712163687, -0.0009296833886764944,
           0.00035980305983684957, -0.00011779503984143957)
"""erfc(a) e^(a^2) = A(a - 1.375) on 0.75 <= a <= 2 (fit, relative error 1.9e-9; a - 1.375 is exact)."""
_ERFC_B = (-0.5723633766174316, -6.490135274361819e-05, -0.4989108443260193, -0.009333085268735886,
           0.6622961163520813, 0.021125923842191696, -2.506336212158203, 4.592235088348389, -3.768901824951172,
           1.2540498971939087)
"""ln(a erfc(a) e^(a^2)) = B(1 / a) on 2 <= a <= 10.1 (fit, absolute error 3.1e-10): erfc(a) =
e^(-a^2 + B(1/a)) / a, so B's error is a relative error of the result and 1/a's rounding barely matters."""


def _erf_small(m: _Emitter, x):
    """erf(x) for |x| <= 0.75 (garbage-free elsewhere, never NaN for finite x)."""
    z = m.mul(x, x)
    return m.padd(m.pmul(x, m.horner(z, _ERF_Q)), x)


def _erfc_large_parts(m: _Emitter, a, lo=None):
    """(E, F) with erfc(a) = E * F for a >= 0.75 (a is clamped to 10.1, where erfc is 0 in float32).

    a < 2: E = e^(-a^2) and F = A(a - 1.375); a >= 2: E = e^(-a^2 + B(1/a)) and F = 1 / a. a^2 is split
    exactly (Dekker) and the exponent summed exactly (two-sum) so E keeps its relative accuracy for large a.
    `lo` (optional, tiny) is a correction to the exponent -a^2 (gelu uses it for the rounding of x/sqrt2)."""
    a = m.sel(m.lt(a, m.f(10.1)), a, m.f(10.1))
    near = m.lt(a, m.f(_ERFC_SPLIT))
    inv = m.div(m.f(1.0), a)
    v = m.sel(near, m.sub(a, m.f(_ERFC_MID)), inv)
    acc = m.sel(near, m.f(_ERFC_A[-1]), m.f(_ERFC_B[-1]))
    for ca, cb in zip(reversed(_ERFC_A[:-1]), reversed(_ERFC_B[:-1])):
        acc = m.padd(m.pmul(acc, v), m.sel(near, m.f(ca), m.f(cb)))
    hi, sq_lo = m.two_prod(a, a)
    g = m.sel(near, m.f(0.0), acc)
    s, s_err = m.two_sum(m.neg(hi), g)
    small = m.sub(s_err, sq_lo)
    if lo is not None:
        small = m.add(small, lo)
    e = _exp_core(m, s, small)
    return e, m.sel(near, acc, inv)


def _erfc_large(m: _Emitter, a):
    e, r = _erfc_large_parts(m, a)
    return m.mul(e, r)


def erf(kb_or_builder, x: ir.Value) -> ir.Value:
    """The Gauss error function. Max error 1.5 ulp over all float32; +-1 beyond |x| > 3.92; NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    ax = m.fabs(x)
    small = m.le(ax, m.f(_ERF_T))
    xs = m.sel(small, x, m.f(0.0))
    big = m.copysign(m.sub(m.f(1.0), _erfc_large(m, m.sel(small, m.f(1.0), ax))), x)
    y = m.sel(small, _erf_small(m, xs), big)
    return m.sel(m.isnan(x), x, y)


def erfc(kb_or_builder, x: ir.Value) -> ir.Value:
    """1 - erf(x), accurate in relative terms in the tail (x > 0.75: see _erfc_large_parts).
    Max error 3 ulp relative where the result is a normal float32; NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    ax = m.fabs(x)
    small = m.le(ax, m.f(_ERF_T))
    xs = m.sel(small, x, m.f(0.0))
    tail = _erfc_large(m, m.sel(small, m.f(1.0), ax))
    big = m.sel(m.lt(x, m.f(0.0)), m.sub(m.f(2.0), tail), tail)
    y = m.sel(small, m.sub(m.f(1.0), _erf_small(m, xs)), big)
    return m.sel(m.isnan(x), x, y)


# ----------------------------------------------------------------------------------------------------------
# sin and cos
# ----------------------------------------------------------------------------------------------------------


_PH_EMIN = -26
"""The reduction table covers float32 exponents (of x = M * 2^E, M a 24-bit integer) from E = -26 (x >= 2^-3)."""
_PIO4 = 0.785398163397448
_SIN_P = (1.0, -0.1666666716337204, 0.008333333767950535, -0.00019841268658638, 2.755712330326787e-06,
          -2.503766438621824e-08)
_COS_P = (1.0, -0.5, 0.0416666679084301, -0.0013888890389353037, 2.4801694962661713e-05, -2.756277694970777e-07,
          2.101313123503701e-09)
"""sin(r) / r and cos(r) as polynomials in r^2, near-minimax on |r| <= 1.45 (relative error < 1e-12)."""


def _two_over_pi_table() -> list[int]:
    """For each exponent E = -26 .. 104 of a float32 written M * 2^E (M a 24-bit integer), the 96 bits of 2/pi
    from bit E-1 after the binary point on (bit k has weight 2^-k; earlier bits only add multiples of 4 to
    x * 2/pi), as three 32-bit words, most significant first."""
    from decimal import Decimal, getcontext
    from fractions import Fraction

    getcontext().prec = 90
    two_over_pi = 2 / Fraction(Decimal(_PI))
    nbits = 104 + 95 + 8
    bits = int(two_over_pi * 2 ** nbits)  # b_1 .. b_nbits
    words = []
    for e in range(_PH_EMIN, 105):
        first = e - 1  # window covers bits first .. first + 95
        window = 0
        for k in range(first, first + 96):
            window = (window << 1) | ((bits >> (nbits - k)) & 1 if k >= 1 else 0)
        words += [(window >> 64) & 0xFFFFFFFF, (window >> 32) & 0xFFFFFFFF, window & 0xFFFFFFFF]
    return words


def _table(m: _Emitter, name: str, words: list[int]) -> ir.GlobalVariable:
    """A private constant i32 array in the builder's module (created once)."""
    module = m.b.module
    found = module.globals.get(name)
    if found is not None:
        return found
    ty = ir.ArrayType(I32, len(words))
    var = ir.GlobalVariable(module, ty, name=name)
    var.global_constant = True
    var.linkage = "private"
    var.unnamed_addr = True
    var.align = 16
    var.initializer = ir.Constant(ty, [ir.Constant(I32, w - (1 << 32) if w >= 1 << 31 else w) for w in words])
    return var


def _payne_hanek(m: _Emitter, ax):
    """(q, r) with ax = q * pi/2 + r, |r| <= pi/4 (plus rounding), for finite ax >= 2^-3; lanes with a
    smaller ax get a harmless value (the table index is clamped).

    ax = M * 2^E; the bits of 2/pi that matter (those giving x * 2/pi mod 4) are a 96-bit window W(E) from a
    table; M * W is computed in 32-bit limbs (32 x 32 -> 64-bit products), its top 2 bits of 96 are q mod 4 and
    the next 62 bits the fraction, which is centred, turned into a float double-float and multiplied by pi/2."""
    b = m.b
    vec = isinstance(m.ity, ir.VectorType)
    i64 = ir.VectorType(ir.IntType(64), m.ity.count) if vec else ir.IntType(64)

    def k64(v):
        c = ir.Constant(ir.IntType(64), v)
        return ir.Constant(i64, [c] * i64.count) if vec else c

    bits = m.as_int(ax)
    e = m.b.sub(b.lshr(bits, m.i(23)), m.i(150))
    mant = b.or_(b.and_(bits, m.i(0x7FFFFF)), m.i(0x800000))
    idx = b.sub(e, m.i(_PH_EMIN))
    idx = b.select(b.icmp_signed("<", idx, m.i(0)), m.i(0), idx)
    idx = b.select(b.icmp_signed(">", idx, m.i(104 - _PH_EMIN)), m.i(104 - _PH_EMIN), idx)
    table = _table(m, "edgecc.mathlib.two_over_pi", _two_over_pi_table())
    base = b.mul(idx, m.i(3))

    def word(j):
        index = b.add(base, m.i(j))
        if not vec:
            return b.load(b.gep(table, [ir.Constant(I32, 0), index], inbounds=True, source_etype=table.value_type),
                          typ=I32)
        result = ir.Constant(m.ity, ir.Undefined)  # lane by lane (LLVM forms a gather where it has one)
        for k in range(m.ity.count):
            lane = ir.Constant(I32, k)
            ptr = b.gep(table, [ir.Constant(I32, 0), b.extract_element(index, lane)], inbounds=True,
                        source_etype=table.value_type)
            result = b.insert_element(result, b.load(ptr, typ=I32), lane)
        return result

    w2, w1, w0 = word(0), word(1), word(2)
    mz = b.zext(mant, i64)
    p0 = b.mul(mz, b.zext(w0, i64))
    p1 = b.add(b.mul(mz, b.zext(w1, i64)), b.lshr(p0, k64(32)))
    mid = b.and_(p1, k64(0xFFFFFFFF))
    hi = b.trunc(b.add(b.mul(mz, b.zext(w2, i64)), b.lshr(p1, k64(32))), m.ity)  # bits 64..95
    q = b.lshr(hi, m.i(30))
    frac = b.or_(b.shl(b.zext(b.and_(hi, m.i(0x3FFFFFFF)), i64), k64(32)), mid)  # 62-bit fraction
    up = b.icmp_unsigned(">=", frac, k64(1 << 61))
    q = b.add(q, b.zext(up, m.ity))
    frac = b.select(up, b.sub(frac, k64(1 << 62)), frac)  # signed, in [-2^61, 2^61)
    # frac = a 2^42 + c 2^21 + d, each piece exact in float32
    a = b.trunc(b.ashr(frac, k64(42)), m.ity)
    c = b.trunc(b.and_(b.lshr(frac, k64(21)), k64(0x1FFFFF)), m.ity)
    d = b.trunc(b.and_(frac, k64(0x1FFFFF)), m.ity)
    fa = m.mul(m.to_float(a), m.f(2.0 ** -20))
    fc = m.mul(m.to_float(c), m.f(2.0 ** -41))
    fd = m.mul(m.to_float(d), m.f(2.0 ** -62))
    h, low = m.fast_two_sum(fa, fc)
    low = m.add(low, fd)
    rh, rl = m.two_prod(h, m.f(_PIO2_HI))
    rl = m.add(rl, m.add(m.mul(h, m.f(_PIO2_LO)), m.mul(low, m.f(_PIO2_HI))))
    return q, m.add(rh, rl)


_PIO2_HI = _f32(math.pi / 2)
_PIO2_LO = _f32(math.pi / 2 - _PIO2_HI)


def _pio2_chunks(bits: int, count: int) -> list[float]:
    """pi/2 as `count` float32 chunks of `bits` significant bits each (truncated), plus a full float32 rest."""
    from decimal import Decimal, getcontext
    from fractions import Fraction

    getcontext().prec = 90
    rest = Fraction(Decimal(_PI)) / 2
    chunks = []
    for _ in range(count):
        quantum = Fraction(2) ** (math.floor(math.log2(rest)) - bits + 1)
        chunk = math.floor(rest / quantum) * quantum
        chunks.append(float(chunk))
        rest -= chunk
    return chunks + [_f32(float(rest))]


_PIO2_CHUNKS = _pio2_chunks(13, 3)
"""pi/2 = c1 + c2 + c3 + c4: c1..c3 have 13 significant bits, so an 11-bit integer times ck is exact."""
_CW_LIMIT = 65536.0
"""Where the Cody-Waite reduction may be used (|x| < 2^16; measured max error 2.5 ulp there)."""


def _cody_waite(m: _Emitter, ax):
    """(q, r) with ax = q pi/2 + r for 0 <= ax < 2^22 (harmless values elsewhere): q = round(ax 2/pi), split as
    qh + ql (11 bits each, so qh ck and ql ck are exact), subtracted chunk by chunk in decreasing size; every
    step but the last is exact. Cheaper than Payne-Hanek, but its error grows with ax (2.5 ulp below 2^16)."""
    b = m.b
    xs = m.sel(m.lt(ax, m.f(4194304.0)), ax, m.f(0.0))
    t = m.mul(xs, m.f(2.0 / math.pi))
    magic = 12582912.0
    qf = m.sub(m.add(t, m.f(magic)), m.f(magic))
    q = m.to_int(qf)
    qh = m.to_float(b.and_(q, m.i(~0x7FF)))
    ql = m.to_float(b.and_(q, m.i(0x7FF)))
    c1, c2, c3, c4 = (m.f(c) for c in _PIO2_CHUNKS)
    r = xs
    for qq, c in ((qh, c1), (ql, c1), (qh, c2), (ql, c2), (qh, c3), (ql, c3), (qf, c4)):
        r = m.sub(r, m.mul(qq, c))
    return q, r


def _trig(m: _Emitter, x, quadrant_offset: int, reduction: str = "payne-hanek"):
    """sin(x) (offset 0) or cos(x) (offset 1): reduce |x| = q pi/2 + r, evaluate sin or cos of r by the
    (q + offset) mod 4 quadrant, restore the sign (sin is odd, cos even)."""
    ax = m.fabs(x)
    finite = m.lt(ax, m.f(_INF))
    axs = m.sel(finite, ax, m.f(0.0))
    q, r = _payne_hanek(m, axs) if reduction == "payne-hanek" else _cody_waite(m, axs)
    small = m.lt(axs, m.f(_PIO4))  # no reduction needed
    q = m.sel(small, m.i(0), q)
    r = m.sel(small, axs, r)
    z = m.mul(r, r)
    s = m.padd(m.pmul(m.pmul(r, z), m.horner(z, _SIN_P[1:])), r)
    c = m.horner(z, _COS_P)
    quadrant = m.b.add(q, m.i(quadrant_offset))
    use_cos = m.b.icmp_unsigned("!=", m.b.and_(quadrant, m.i(1)), m.i(0))
    y = m.sel(use_cos, c, s)
    flip = m.b.shl(m.b.and_(quadrant, m.i(2)), m.i(30))  # quadrants 2, 3: negate (sign bit)
    if quadrant_offset == 0:  # sin(-x) = -sin(x)
        flip = m.b.xor(flip, m.b.and_(m.as_int(x), m.i(-0x80000000)))
    y = m.as_float(m.b.xor(m.as_int(y), flip))
    return m.sel(finite, y, m.f(_NAN))


def sin(kb_or_builder, x: ir.Value) -> ir.Value:
    """Sine (radians), over the whole float32 range: |x| >= pi/4 is reduced by Payne-Hanek (a table of the
    bits of 2/pi, 32 x 32 -> 64-bit integer products, exact to 2^-62 of a quadrant), then a polynomial.
    Max error 1.5 ulp (measured from 1e-30 to 3.4e38). sin(+-inf) = sin(NaN) = NaN."""
    m = _Emitter(kb_or_builder, x)
    return _trig(m, x, 0)


def cos(kb_or_builder, x: ir.Value) -> ir.Value:
    """Cosine (radians), over the whole float32 range; same reduction and accuracy as sin (max 1.5 ulp).
    cos(+-inf) = cos(NaN) = NaN."""
    m = _Emitter(kb_or_builder, x)
    return _trig(m, x, 1)


SMALL_TRIG_LIMIT = _CW_LIMIT


def sin_small(kb_or_builder, x: ir.Value) -> ir.Value:
    """Sine for |x| < SMALL_TRIG_LIMIT (2^16) only: a cheaper Cody-Waite reduction (about 8x faster than
    sin's); max error 2 ulp there. Larger |x| gives a wrong (but never poison) value: callers check the range
    (the Sin kernel tests the whole tensor once and picks sin or sin_small). Max error 2.5 ulp."""
    m = _Emitter(kb_or_builder, x)
    return _trig(m, x, 0, "cody-waite")


def cos_small(kb_or_builder, x: ir.Value) -> ir.Value:
    """Cosine for |x| < SMALL_TRIG_LIMIT (2^16) only; see sin_small. Max error 2.5 ulp there."""
    m = _Emitter(kb_or_builder, x)
    return _trig(m, x, 1, "cody-waite")


# ----------------------------------------------------------------------------------------------------------
# pow
# ----------------------------------------------------------------------------------------------------------

_LOG_S = (2.0 / 3.0, 2.0 / 5.0, 2.0 / 7.0, 2.0 / 9.0, 2.0 / 11.0, 2.0 / 13.0)
"""ln(1 + f) = 2s + s^3 (2/3 + 2/5 s^2 + ...), s = f / (2 + f), |s| <= 0.1716."""
_LN2_HI12 = _f32(float.fromhex("0x1.62ep-1"))  # ln 2 to 12 bits: e * hi exact for |e| < 2^12
_LN2_LO12 = _f32(math.log(2) - _LN2_HI12)


def _log_dd(m: _Emitter, ax):
    """ln(ax) as an unevaluated sum hi + lo, absolute error < 3e-10, for finite ax > 0.

    ax = 2^e (1 + f); ln(1 + f) = 2s + s^3 P(s^2) with s = f / (2 + f): s is carried as s + ds (the residual of the
    division through a Dekker product, with 2 + f itself split exactly), e ln2 as e * ln2_hi (exact) + e * ln2_lo."""
    e, f = _log_parts(m, ax)
    d, dl = m.fast_two_sum(m.f(2.0), f)  # 2 + f = d + dl exactly
    s = m.div(f, d)
    p, pe = m.two_prod(s, d)
    ds = m.div(m.sub(m.sub(m.sub(f, p), pe), m.mul(s, dl)), d)  # f - p is exact (Sterbenz)
    s2 = m.mul(s, s)
    tail = m.pmul(m.pmul(s, s2), m.horner(s2, _LOG_S))
    hi, lo = m.two_sum(m.mul(e, m.f(_LN2_HI12)), m.mul(s, m.f(2.0)))
    ds_terms = m.mul(ds, m.padd(m.f(2.0), m.pmul(s2, m.f(2.0))))  # d/ds of 2s + 2/3 s^3, times ds
    small_terms = m.add(m.add(m.mul(e, m.f(_LN2_LO12)), ds_terms), tail)
    return m.fast_two_sum(hi, m.add(lo, small_terms))


def pow(kb_or_builder, x: ir.Value, y: ir.Value) -> ir.Value:
    """x ** y for float32 x and y, with C99/NumPy special cases (pow(x, 0) = 1, pow(1, y) = 1, negative x
    with an integer y gives the signed result, with a non-integer y NaN; zeros and infinities per IEEE 754).

    |x|^y = e^(y ln|x|), with ln|x| and the product y ln|x| carried in double-float (two float32s, Dekker
    products), so the error does not grow with the size of the result: max error 2 ulp over the whole range
    (measured on random bases and exponents whose result is a normal float32)."""
    m = _Emitter(kb_or_builder, x)
    ax = m.fabs(x)
    finite_pos = m.b.and_(m.gt(ax, m.f(0.0)), m.lt(ax, m.f(_INF)))
    axs = m.sel(finite_pos, ax, m.f(1.0))
    lh, ll = _log_dd(m, axs)
    # clamp y so that y * ln|x| cannot overflow the split (the result saturates long before)
    ys = m.sel(m.gt(y, m.f(1e30)), m.f(1e30), m.sel(m.lt(y, m.f(-1e30)), m.f(-1e30), y))
    ys = m.sel(m.isnan(y), m.f(0.0), ys)
    ph, pl = m.two_prod(ys, lh)
    pl = m.add(pl, m.mul(ys, ll))
    zh, zl = m.fast_two_sum(ph, pl)
    overflow = m.gt(zh, m.f(89.0))
    underflow = m.lt(zh, m.f(-104.0))
    zc = m.sel(m.b.or_(overflow, underflow), m.f(0.0), zh)
    zlc = m.sel(m.b.or_(overflow, underflow), m.f(0.0), zl)
    r = _exp_core(m, zc, zlc)
    r = m.sel(overflow, m.f(_INF), m.sel(underflow, m.f(0.0), r))
    # y's integrality and parity: every float32 with |y| >= 2^24 is an even integer; below, fptosi is exact
    ay = m.fabs(y)
    y_mid = m.lt(ay, m.f(_TWO23 * 2))
    yc = m.sel(y_mid, y, m.f(0.0))
    yi = m.to_int(yc)
    y_int = m.b.or_(m.b.and_(y_mid, m.eq(m.to_float(yi), yc)),
                    m.b.and_(m.b.not_(y_mid), m.lt(ay, m.f(_INF))))
    y_odd = m.b.and_(y_mid, m.b.and_(y_int, m.b.icmp_unsigned("!=", m.b.and_(yi, m.i(1)), m.i(0))))
    # |x| in {0, inf}: 0^y = 0 (y > 0) or inf (y < 0); inf^y the other way round
    x_zero = m.eq(ax, m.f(0.0))
    x_inf = m.eq(ax, m.f(_INF))
    y_pos = m.gt(y, m.f(0.0))
    edge = m.sel(m.b.xor(x_zero, y_pos), m.f(_INF), m.f(0.0))  # zero & y>0 -> 0; inf & y<0 -> 0
    r = m.sel(m.b.or_(x_zero, x_inf), edge, r)
    # y = +-inf: |x| < 1 -> (0 or inf), |x| > 1 -> (inf or 0), |x| = 1 -> 1
    y_inf = m.eq(ay, m.f(_INF))
    gt1 = m.gt(ax, m.f(1.0))
    inf_case = m.sel(m.b.xor(gt1, y_pos), m.f(0.0), m.f(_INF))
    inf_case = m.sel(m.eq(ax, m.f(1.0)), m.f(1.0), inf_case)
    r = m.sel(y_inf, inf_case, r)
    # sign: x < 0 (including -0 and -inf) with an odd integer y negates; non-integer y with x < 0 is NaN
    x_neg = m.b.icmp_signed("<", m.as_int(x), m.i(0))
    r = m.sel(m.b.and_(x_neg, y_odd), m.neg(r), r)
    x_neg_finite = m.b.and_(m.lt(x, m.f(0.0)), m.b.not_(x_inf))
    neg_nan = m.b.and_(x_neg_finite, m.b.and_(m.b.not_(y_int), m.b.not_(y_inf)))
    r = m.sel(neg_nan, m.f(_NAN), r)
    r = m.sel(m.b.or_(m.isnan(x), m.isnan(y)), m.add(x, y), r)
    r = m.sel(m.b.or_(m.eq(y, m.f(0.0)), m.eq(x, m.f(1.0))), m.f(1.0), r)
    return r


_M_SQRT1_2 = _f32(-math.sqrt(0.5))
_M_SQRT1_2_LO = _f32(-math.sqrt(0.5) - _M_SQRT1_2)


def gelu(kb_or_builder, x: ir.Value) -> ir.Value:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt(2))) = 0.5 x erfc(-x / sqrt(2)), accurate in relative terms also
    in the negative tail: -x / sqrt(2) is carried as zh + zl (Dekker), and the tail uses
    erfc(zh + zl) ~ erfc(zh) e^(-2 zh zl). Max error 5 ulp relative, in the far negative tail (measured);
    NaN stays NaN."""
    m = _Emitter(kb_or_builder, x)
    xc = m.sel(m.lt(m.fabs(x), m.f(20.0)), x, m.copysign(m.f(20.0), x))
    xc = m.sel(m.isnan(x), m.f(0.0), xc)
    zh, zl = m.two_prod(xc, m.f(_M_SQRT1_2))
    zl = m.add(zl, m.mul(xc, m.f(_M_SQRT1_2_LO)))
    az = m.fabs(zh)
    small = m.le(az, m.f(_ERF_T))
    zs = m.sel(small, zh, m.f(0.0))
    # zh > 0.75 (x < 0): erfc(zh + zl) = e^(-zh^2 - 2 zh zl) F(zh) to first order
    a = m.sel(small, m.f(1.0), az)
    pos = m.gt(zh, m.f(0.0))
    correction = m.sel(pos, m.neg(m.mul(m.mul(a, m.f(2.0)), zl)), m.f(0.0))
    e, r = _erfc_large_parts(m, a, correction)
    tail = m.mul(e, r)
    two_minus = m.sub(m.f(2.0), tail)  # zh < -0.75: x > 0
    value = m.sel(small, m.sub(m.f(1.0), _erf_small(m, zs)), m.sel(pos, tail, two_minus))
    y = m.mul(m.mul(x, m.f(0.5)), value)
    return m.sel(m.isnan(x), x, y)




# ----------------------------------------------------------------------------------------------------------
# fmod
# ----------------------------------------------------------------------------------------------------------


def _exponent(m: _Emitter, a):
    """floor(log2(a)) as i32 for finite a > 0 (subnormals included)."""
    sub = m.lt(a, m.f(1.1754943508222875e-38))
    scaled = m.sel(sub, m.mul(a, m.f(16777216.0)), a)
    e = m.b.sub(m.b.lshr(m.as_int(scaled), m.i(23)), m.i(127))
    return m.b.sub(e, m.b.select(sub, m.i(24), m.i(0)))


def _fmod_step(m: _Emitter, a, b):
    """a mod b exactly, for finite a >= 0 and b > 0 with a / b < 2^23 (the quotient is exact).

    q = trunc(a / b) (possibly one too large when a / b rounds up to an integer), then a - q b with q b split
    exactly (Dekker): a - p is exact by Sterbenz and the remainder, a float32, takes one exact rounding.
    Operands are scaled by 2^-64 or 2^64 when large or tiny so the split neither overflows nor underflows."""
    down = m.gt(b, m.f(2.0 ** 100))
    up = m.lt(b, m.f(2.0 ** -100))
    scale = m.sel(down, m.f(2.0 ** -64), m.sel(up, m.f(2.0 ** 64), m.f(1.0)))
    unscale = m.sel(down, m.f(2.0 ** 64), m.sel(up, m.f(2.0 ** -64), m.f(1.0)))
    below = m.lt(a, b)
    sa = m.mul(a, scale)
    sb = m.mul(b, scale)
    _, q = _trunc_core(m, m.div(sa, sb))
    p, pe = m.two_prod(q, sb)
    r = m.sub(m.sub(sa, p), pe)
    r = m.sel(m.lt(r, m.f(0.0)), m.add(r, sb), r)
    return m.sel(below, a, m.mul(r, unscale))


def fmod(kb_or_builder, a: ir.Value, b: ir.Value) -> ir.Value:
    """C fmod (numpy.fmod): a - trunc(a / b) * b with the sign of a, computed exactly (the true remainder is
    always a float32) for every pair of float32: the quotient's exponent gap is closed 22 bits at a time
    (13 exact steps cover the whole range). fmod(x, 0), fmod(inf, y) and NaN operands give NaN;
    fmod(x, inf) = x."""
    m = _Emitter(kb_or_builder, a)
    aa = m.fabs(a)
    ab = m.fabs(b)
    valid = m.b.and_(m.b.and_(m.lt(aa, m.f(_INF)), m.gt(ab, m.f(0.0))), m.lt(ab, m.f(_INF)))
    x = m.sel(valid, aa, m.f(0.0))
    y = m.sel(valid, ab, m.f(1.0))
    eb = _exponent(m, y)
    zero = m.i(0)
    for _ in range(13):
        ea = _exponent(m, m.sel(m.gt(x, m.f(0.0)), x, y))
        t = m.b.sub(m.b.sub(ea, eb), m.i(22))
        t = m.b.select(m.b.icmp_signed(">", t, zero), t, zero)
        t1 = m.b.select(m.b.icmp_signed(">", t, m.i(127)), m.i(127), t)
        ys = m.mul(m.mul(y, m.pow2i(t1)), m.pow2i(m.b.sub(t, t1)))
        x = _fmod_step(m, x, ys)
    r = m.copysign(x, a)
    finite_a_inf_b = m.b.and_(m.lt(aa, m.f(_INF)), m.eq(ab, m.f(_INF)))
    return m.sel(valid, r, m.sel(finite_a_inf_b, a, m.f(_NAN)))


def mod_floor(kb_or_builder, a: ir.Value, b: ir.Value) -> ir.Value:
    """numpy.mod for floats (Python %: the result has the sign of b): r = fmod(a, b), plus b when r is
    non-zero and of the other sign, and a zero gets b's sign. Exact except for that final addition (one
    rounding, as in NumPy)."""
    m = _Emitter(kb_or_builder, a)
    r = fmod(m.b, a, b)
    nonzero = m.b.fcmp_unordered("!=", r, m.f(0.0))
    differ = m.b.xor(m.lt(b, m.f(0.0)), m.lt(r, m.f(0.0)))
    r2 = m.sel(m.b.and_(nonzero, differ), m.add(r, b), r)
    return m.sel(m.eq(r, m.f(0.0)), m.copysign(m.f(0.0), b), r2)


__all__ = ["trunc", "floor", "ceil", "round_half_even", "rint", "exp", "expm1", "log", "log1p", "tanh", "sigmoid",
           "softplus", "erf", "erfc", "gelu", "sin", "cos", "sin_small", "cos_small", "SMALL_TRIG_LIMIT", "pow",
           "fmod", "mod_floor"]
