"""Conversions between compute types that never produce LLVM poison and need no runtime library: float to
integer (saturating or wrapping like NumPy on x86), and int64 <-> float32 with 32-bit integer operations on
32-bit targets (which have no such instructions; LLVM would otherwise call __aeabi_f2lz / __aeabi_l2f)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, F32, I1, I32, I64
from edgecc.ir.dtypes import DType


def narrow_target(kb) -> bool:
    """32-bit targets have no 64-bit float<->int instructions (LLVM would call __aeabi_f2lz / __aeabi_l2f)."""
    target = getattr(kb, "target", None)
    return target is not None and target.pointer_bits == 32


def float_to_int(kb: KernelBuilder, value: ir.Value, dst: DType) -> ir.Value:
    """Float (f32 compute value) to integer dtype `dst`, truncating toward zero, without LLVM poison.

    In range this is exact C/NumPy truncation. Narrow targets (int8, uint8, int16) convert through int32 like
    NumPy on x86 (cvttss2si, then the low bits): uint8(-1.0) = 255, int8(300.0) = 44, and NaN or values beyond
    int32 give int32's 0x80000000, whose low bits are 0. int32 and int64 saturate at their limits and NaN gives
    0 (NumPy leaves these undefined; x86 gives INT_MIN for all of them)."""
    b = kb.b
    wide = I64 if dst is DType.int64 else I32
    bits = wide.width
    lo = -float(2 ** (bits - 1))
    hi = float(np.nextafter(np.float32(2.0 ** (bits - 1)), np.float32(0)))  # largest float32 below 2^(bits-1)
    narrow = COMPUTE[dst].width < bits
    too_low = b.fcmp_ordered("<", value, ir.Constant(F32, lo))
    too_high = b.fcmp_ordered(">", value, ir.Constant(F32, hi))
    v = b.select(too_low, ir.Constant(F32, lo), value)
    v = b.select(too_high, ir.Constant(F32, lo if narrow else hi), v)
    v = b.select(kb.b.fcmp_unordered("uno", value, value), ir.Constant(F32, lo if narrow else 0.0), v)
    i = f32_to_i64_bits(b, v) if wide is I64 and narrow_target(kb) else b.fptosi(v, wide)
    if narrow:
        return b.trunc(i, COMPUTE[dst])
    return b.select(too_high, ir.Constant(wide, 2 ** (bits - 1) - 1), i)


def f32_to_i64_bits(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """fptosi f32 -> i64 with 32-bit integer and 64-bit shift operations only (no runtime-library call on
    32-bit targets). `v` must be finite and in [-2^63, 2^63)."""
    bits = b.bitcast(v, I32)
    e = b.sub(b.and_(b.lshr(bits, ir.Constant(I32, 23)), ir.Constant(I32, 0xFF)), ir.Constant(I32, 127))
    mant = b.zext(b.or_(b.and_(bits, ir.Constant(I32, 0x7FFFFF)), ir.Constant(I32, 0x800000)), I64)

    def clamp(x, lo_, hi_):
        x = b.select(b.icmp_signed("<", x, ir.Constant(I32, lo_)), ir.Constant(I32, lo_), x)
        return b.select(b.icmp_signed(">", x, ir.Constant(I32, hi_)), ir.Constant(I32, hi_), x)

    left = b.shl(mant, b.zext(clamp(b.sub(e, ir.Constant(I32, 23)), 0, 40), I64))
    right = b.lshr(mant, b.zext(clamp(b.sub(ir.Constant(I32, 23), e), 0, 31), I64))
    mag = b.select(b.icmp_signed(">=", e, ir.Constant(I32, 23)), left, right)
    mag = b.select(b.icmp_signed("<", e, ir.Constant(I32, 0)), ir.Constant(I64, 0), mag)
    negative = b.icmp_signed("<", bits, ir.Constant(I32, 0))
    return b.select(negative, b.sub(ir.Constant(I64, 0), mag), mag)


def i64_to_f32_bits(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """sitofp i64 -> f32, correctly rounded (to nearest even), with integer operations only (no
    runtime-library call on 32-bit targets)."""
    zero = ir.Constant(I64, 0)
    negative = b.icmp_signed("<", v, zero)
    a = b.select(negative, b.sub(zero, v), v)  # |v| as unsigned (MIN -> 2^63)
    ctlz = b.module.declare_intrinsic("llvm.ctlz", [I64, I1])
    lz = b.call(ctlz, [a, ir.Constant(I1, 0)])
    n = b.shl(a, b.select(b.icmp_unsigned(">", lz, ir.Constant(I64, 63)), ir.Constant(I64, 63), lz))
    mant = b.lshr(n, ir.Constant(I64, 40))  # 24 bits, top bit set
    rest = b.and_(n, ir.Constant(I64, (1 << 40) - 1))
    half = ir.Constant(I64, 1 << 39)
    odd = b.icmp_unsigned("!=", b.and_(mant, ir.Constant(I64, 1)), zero)
    up = b.or_(b.icmp_unsigned(">", rest, half), b.and_(b.icmp_unsigned("==", rest, half), odd))
    mant = b.add(mant, b.zext(up, I64))
    biased = b.sub(ir.Constant(I64, 63 + 127), lz)
    # a carry out of the mantissa (mant = 2^24) flows into the exponent field by itself
    bits = b.add(b.shl(biased, ir.Constant(I64, 23)), b.sub(mant, ir.Constant(I64, 0x800000)))
    bits = b.or_(b.trunc(bits, I32), b.select(negative, ir.Constant(I32, -0x80000000), ir.Constant(I32, 0)))
    result = b.bitcast(bits, F32)
    return b.select(b.icmp_unsigned("==", a, zero), ir.Constant(F32, 0.0), result)
