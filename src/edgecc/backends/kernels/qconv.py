"""Fast int8 convolution for QLinearConv with constant symmetric weights (w_zero_point 0), as the int8
quantisation produces: one "dot4" step, fixed-point requantisation (`QuantParams`, shared with qgemm.py) and three
kernels; every other QLinearConv keeps the generic, bit-exact kernel of quant.py.

Dot4 (`Dot4`): acc_i32[lane] += sum of 4 byte products (activation x int8 weight) per 32-bit lane:
- x86 with +avx512vnni (512-bit vectors): `vpdpbusd` (u8 x s8, 16 lanes); with 256-bit vectors and +avxvnni
  (or +avx512vnni,+avx512vl) its ymm form (8 lanes);
- AArch64 with +dotprod: `sdot` (s8 x s8, 4 lanes); uint8 activations are flipped to int8 (xor 0x80) as they are
  packed, and the shift (-128 * sum of the weights) goes into the per-channel correction;
- x86 without VNNI (SSE2, AVX2, AVX-512 BW): `pmaddwd` on 2 int16 values per 32-bit word (activations packed as
  int16 x - x_zp, weights sign-extended; exact, see Dot4). vpmaddubsw is never used: its i16 pair sums saturate
  for 8-bit weights (u8 255 x s8 -128, twice, is below -2^15), and 7-bit weights would cost accuracy. LLVM does
  not form pmaddwd from the widened form below (it emitted vpmullw + blends + packs, 4-5x slower than fp32 on Zen 3);
- Cortex-M4 (ARMv7E-M DSP extension, no vectors): `smlad`, the scalar pmaddwd (2 int16 x 2 int16 into an int32),
  on the same int16 forms, with the kernels' stack scratch cut to a few KiB (MCU_SCRATCH_DIVISOR): digits_cnn int8
  8.3 ms on stm32f4 (generic kernels 30.9; float32 17.0), digits_mobilenet 38.0 ms (75.9; float32 49.3); weights
  are stored as int16 pairs, twice the int8 bytes, so code built for size (flash budgets) keeps the generic kernels;
- elsewhere a widened form LLVM vectorises (i16 products, which cannot overflow: 255 * 128 < 2^15, then pairwise
  i32 sums: smull/saddlp on NEON).

Zero points: acc = sum x * w over the padded input (padding holds x_zp, so it contributes x_zp * w, exactly what
the correction removes): y_acc = acc - (x_zp + delta) * sum(w) + B, where sum(w) per output channel is computed
when the weights are packed (stored before them in the packed buffer) and delta is the activation flip's shift.
Overflow: |acc| <= K * 255 * 128, so K = C/group * kh * kw must be at most 65793 (MAX_K = 2^31 / 32640); larger
reductions go to the generic kernel.

Requantisation (`QuantParams`): M = x_scale * w_scale / y_scale in float32 as the reference computes it, taken
apart bit-exactly into an integer multiplier and a shift; results are within 1 of the reference (exact but at
ties, see the class). Parameters are read at run time from the scale / zero-point / bias pointers, so a kernel
is shared by layers of one shape, like the float ones.

Kernels:
- `emit_dot_conv` (group 1), "flattened padded rows": per band of output rows the input is packed into stack
  scratch (<= BAND_BYTES) as [C/4][stride phase y][stride phase x][rows][Wq][4 channels], padding filled with
  x_zp, so that for every tap T consecutive flattened output positions q = oh * Wq + ow read one contiguous run
  of 4-byte words (the Wq - OW junk columns are computed and not stored). Weights are packed at compile time as
  [output-channel block][C/4][tap][MR][4]: each step broadcasts one 32-bit weight word per channel into MR x NR
  register tiles (24 accumulators on AVX-512). Results go to a staging row per channel, copied out per row.
- `emit_channel_dot_conv` (group 1, small maps: 7x7): output channels in the lanes, positions broadcast, when
  that fills lanes clearly better (`channel_lanes_pay`).
- `emit_depthwise_qconv`: each channel's padded map packed one byte per position; with vpdpbusd (+avx512vbmi's
  vpermb) or sdot, up to 4 taps of a row are one dot4 over a byte window; elsewhere i32 multiply-adds.

Measured on Zen 4 (AVX-512 VNNI), one thread, median, tools/bench_int8_layers.py (layers) and tools/bench_int8.py
(whole models quantised by edgecc; int8 / edgecc fp32 / onnxruntime int8 QDQ): ResNet-18 3x3 layers 0.13-0.31x
fp32 (0.52 ms for 512x7x7 -> 512), its 7x7/2 first layer 0.39x; MobileNet-v2 pointwise layers 0.19-0.54x,
depthwise 0.5-1.0x (1.9x for 960x7x7, whose per-channel packing and requantising of 4 vectors for 49 outputs
cost more than the 9-tap float layer), all its convolutions 0.45x; whole models: resnet18 9.7 ms (0.29x fp32
33.9 ms; ort 37.7 ms), mobilenet_v2 3.1 ms (0.43x of 7.3; ort 8.5), squeezenet1_1 2.5 ms (0.34x of 7.3; ort 9.6),
shufflenet_v2_x1_0 1.5 ms (0.40x of 3.7; ort 5.3).
On Zen 3 (AVX2, pmaddwd; docs/performance-int8.md): whole models 0.49 (resnet18) to 0.70 (shufflenet_v2) of fp32,
all faster than onnxruntime's int8; pmaddwd + vpaddd is at most 2x fp32's FMA rate, before requantisation and packing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import I8, I16, I32, I64, PTR, Buffer, KernelBuilder
from edgecc.backends.kernels.conv import Accumulators, add_i64, for_blocks, i32_vector, intrinsic, lanes, \
    mul_i64, vector_registers

BAND_BYTES = 64 * 1024
"""Stack scratch for one band of packed input rows."""
MAX_SCRATCH = 256 * 1024
"""A layer whose one-output-row band needs more than this goes to the generic kernel."""
MAX_K = (2 ** 31 - 1) // (255 * 128)
"""Largest reduction (taps * channels) whose u8 x s8 sum cannot overflow int32 (65793)."""
CHUNK = 16
"""Columns packed per vector step (16 bytes read from each channel row)."""
MAX_SHIFT = 46
"""Largest requantisation shift: |acc * m0| < 2^62 and |y_zp << 46| < 2^54 keep the i64 sum exact."""
STAGE_BYTES = 32 * 1024
"""Stack scratch for the requantised rows of one channel block before they are copied out."""
MAX_CHANNELS = 4096
"""Per-channel requantisation parameters live on the stack (20 bytes each)."""


def _i1(v: int) -> ir.Constant:
    return ir.Constant(ir.IntType(1), v)


def vec_ty(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def splat(b: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    undef = ir.Constant(vec_ty(value.type, 1), ir.Undefined)
    one = b.insert_element(undef, value, ir.Constant(I32, 0))
    return b.shuffle_vector(one, undef, i32_vector([0] * n))


def byte_ptr(kb: KernelBuilder, ptr: ir.Value, offset) -> ir.Value:
    off = kb.i64(offset) if isinstance(offset, int) else offset
    return kb.b.gep(ptr, [off], inbounds=True, source_etype=I8)


def store_to(kb: KernelBuilder, value: ir.Value, ptr: ir.Value, align: int = 1) -> None:
    """Store through an untyped byte pointer (llvmlite checks pointee types of typed ones)."""
    kb.b.store(value, kb.b.bitcast(ptr, value.type.as_pointer()), align=align)


def memset(kb: KernelBuilder, ptr: ir.Value, value: ir.Value, length) -> None:
    fn = kb.module.declare_intrinsic("llvm.memset", [PTR, I64])
    kb.b.call(fn, [ptr, value, kb.i64(length) if isinstance(length, int) else length, _i1(0)])


def memcpy(kb: KernelBuilder, dst: ir.Value, src: ir.Value, length: int) -> None:
    fn = kb.module.declare_intrinsic("llvm.memcpy", [PTR, PTR, I64])
    kb.b.call(fn, [dst, src, kb.i64(length), _i1(0)])


def stack_array(kb: KernelBuilder, ty: ir.Type, count: int, name: str) -> ir.Value:
    """Stack scratch of `count` elements (entry block, 64-byte aligned) as an untyped pointer."""
    from edgecc.backends.kernels.quant import entry_alloca

    slot = entry_alloca(kb, ty, max(1, count), name)
    slot.align = 64
    if kb.b.block is slot.parent:
        return kb.b.bitcast(slot, PTR)
    builder = ir.IRBuilder(slot.parent)
    builder.position_after(slot)
    return builder.bitcast(slot, PTR)


def stack_bytes(kb: KernelBuilder, count: int, name: str) -> ir.Value:
    return stack_array(kb, I8, count, name)


# ---------------------------------------------------------------------------------------------------------------
# dot4


def dot4_form(target) -> tuple[str, int, bool | None]:
    """(kind, lanes, signed activations) of `target`'s dot4 (see Dot4): "vnni", "sdot", or "generic" (lanes 0: the
    target's). Also read by encode-sparsity: int8 sparse weights pay only against the generic form."""
    features = set(target.features.split(","))
    triple = target.triple
    if triple.startswith("x86_64") and "+avx512vnni" in features and target.vector_bits >= 512:
        return "vnni", 16, False
    if triple.startswith("x86_64") and target.vector_bits >= 256 and (
            "+avxvnni" in features or {"+avx512vnni", "+avx512vl"} <= features):
        return "vnni", 8, False  # the 256-bit form (AVX-VNNI or AVX512-VL)
    if triple.startswith(("aarch64", "arm64")) and "+dotprod" in features:
        return "sdot", 4, True
    return "generic", 0, None


MADD = {128: ("llvm.x86.sse2.pmadd.wd", "+sse2"), 256: ("llvm.x86.avx2.pmadd.wd", "+avx2"),
        512: ("llvm.x86.avx512.pmaddw.d.512", "+avx512bw")}
"""x86 without VNNI: pmaddwd of each vector width (intrinsic, the feature it needs)."""
SMLAD = "llvm.arm.smlad"
"""Cortex-M4 (ARMv7E-M's DSP extension): two signed 16 x 16 multiply-adds into an int32 in one instruction, the
scalar pmaddwd: activations packed as int16 x - x_zp pairs, weights as int16 pairs."""
MCU_SCRATCH_DIVISOR = 16
"""On a microcontroller the kernels' stack scratch is cut by this: 2 KiB bands of int16 rows, 2 KiB of staged
output rows, 16 KiB for a one-row band at most, 256 output channels (20 bytes of parameters each)."""
SMLAD_REGISTERS = 8
"""Accumulators a Cortex-M4 tile keeps. It has 13 general registers, so 8 accumulators spill some pointers, yet
measured fewer instructions than 2, 4 or 6 (digits_mobilenet int8 on stm32f4: 38.0 ms against 42.2-42.6)."""


def smlad_target(target) -> bool:
    """ARMv7E-M without vectors (Cortex-M4) built for speed: the int8 kernels run on smlad, with stack scratch cut
    to fit (MCU_SCRATCH_DIVISOR). Built for size (a flash budget) the generic kernels stay: they read int8 weights,
    where these store int16 pairs."""
    return target.triple.startswith("thumbv7em") and target.vector_bits <= 32 and target.optimise_for == "speed"


def fast_kernels_run(target) -> bool:
    """The fast int8 kernels (here, qgemm.py, and the fixed-point requantisation qsparse.py shares) serve `target`:
    where kernels may take large stack scratch, and on Cortex-M4 with it cut to a few KiB. Other microcontrollers
    keep the generic kernels of quant.py."""
    return target.large_scratch or smlad_target(target)


def channel_limit(target) -> int:
    """Output channels the fast kernels take (their requantisation parameters live on the stack)."""
    return MAX_CHANNELS if target.large_scratch else MAX_CHANNELS // MCU_SCRATCH_DIVISOR


class Dot4:
    """acc (<L x i32>) += per lane, the sum of the activation values of one 32-bit word times the int8 weights of
    one 32-bit word: 4 bytes x 4 bytes (vpdpbusd, sdot, the widened generic form), or on x86 without VNNI
    (`per_word` 2, dot4_form still says "generic") 2 int16 x 2 int16 by `pmaddwd`.

    The pmaddwd form ("pairs"): activations are packed as int16 x - x_zp (`centred`: the zero point is taken off
    when packing, so padding is 0 and the correction is bias only) and weights as sign-extended int16. Bound:
    |x - x_zp| <= 255 and |w| <= 128 give |products| <= 32640 and |pair sums| <= 65280, exact in pmaddwd's int32
    (its only inexact case, both pairs -32768 * -32768, cannot occur), and |acc| <= K * 32640 as in MAX_K.
    One pmaddwd does 16 multiply-adds per 256 bits (vpmaddubsw's 32 would need 7-bit weights not to saturate)."""

    def __init__(self, kb: KernelBuilder):
        self.kb = kb
        self.kind, self.lanes, self.signed = dot4_form(kb.target)
        self.per_word = 4
        """Activation values (channels) per 32-bit word: 4 bytes, or 2 int16 with pmaddwd."""
        self.madd = None
        if self.kind == "generic":
            self.lanes = max(1, lanes(kb))
            madd = MADD.get(kb.target.vector_bits)
            if kb.target.triple.startswith("x86_64") and madd and madd[1] in kb.target.features.split(","):
                self.madd, self.per_word = madd[0], 2
            elif smlad_target(kb.target):
                self.madd, self.per_word = SMLAD, 2
        self.band_bytes = BAND_BYTES // 2 if self.per_word == 2 else BAND_BYTES
        self.stage_bytes, self.max_scratch, self.max_channels = STAGE_BYTES, MAX_SCRATCH, MAX_CHANNELS
        if not kb.target.large_scratch:  # a microcontroller's stack: a few KiB of scratch (MCU_SCRATCH_DIVISOR)
            self.band_bytes //= MCU_SCRATCH_DIVISOR
            self.stage_bytes //= MCU_SCRATCH_DIVISOR
            self.max_scratch //= MCU_SCRATCH_DIVISOR
            self.max_channels //= MCU_SCRATCH_DIVISOR
        """Packed input per band (and the largest map the channel-lanes kernel takes): 32 KiB for the int16 form,
        measured on Zen 3 (32 KiB L1D) against 64 KiB: ResNet-18 conv1 3.15 -> 2.30 ms, its 512-channel 7x7 layer
        2.52 -> 1.92 (positions in the lanes instead of channels), other 3x3 layers 5-10% faster, MobileNet-v2's
        first layer 0.28 -> 0.33 ms the one loss."""
        self.registers = vector_registers(kb) if self.madd != SMLAD else SMLAD_REGISTERS

    @property
    def centred(self) -> bool:
        """Activations are packed as int16 x - x_zp (the pmaddwd form)."""
        return self.per_word == 2

    def accumulators(self) -> int:
        """Accumulator vectors a register tile may hold (the generic form needs temporaries of its own)."""
        budget = 24 if self.registers >= 32 else 10 if self.registers >= 16 else self.registers
        if self.centred:
            return budget
        return budget // 2 if self.kind == "generic" else budget

    def flip(self, act_signed: bool) -> tuple[int, int]:
        """(xor mask applied to activation bytes when packed, delta): the dot sees x + delta."""
        if self.centred or self.signed is None or self.signed == act_signed:
            return 0, 0
        return 0x80, (-128 if self.signed else 128)

    def dot(self, acc: ir.Value, x: ir.Value, w: ir.Value, act_signed: bool) -> ir.Value:
        """acc + dot4(x, w): x is 32 L bytes of activations (after the flip, or centred int16), w is <L x i32>
        weight words."""
        b, n = self.kb.b, self.lanes
        if self.madd == SMLAD:  # one lane: acc + x.lo * w.lo + x.hi * w.hi (signed int16 halves)
            fn = intrinsic(self.kb, SMLAD, I32, [I32, I32, I32])
            word = lambda v: b.extract_element(b.bitcast(v, vec_ty(I32, 1)), ir.Constant(I32, 0))  # noqa: E731
            total = b.call(fn, [word(x), word(w), word(acc)])
            return b.insert_element(ir.Constant(vec_ty(I32, 1), ir.Undefined), total, ir.Constant(I32, 0))
        if self.madd:
            ty, pairs = vec_ty(I32, n), vec_ty(I16, 2 * n)
            fn = intrinsic(self.kb, self.madd, ty, [pairs, pairs])
            return b.add(acc, b.call(fn, [b.bitcast(x, pairs), b.bitcast(w, pairs)]))
        if self.kind == "vnni":
            ty = vec_ty(I32, n)
            fn = intrinsic(self.kb, f"llvm.x86.avx512.vpdpbusd.{32 * n}", ty, [ty, ty, ty])
            return b.call(fn, [acc, b.bitcast(x, ty), w])
        if self.kind == "sdot":
            ty, by = vec_ty(I32, 4), vec_ty(I8, 16)
            fn = intrinsic(self.kb, "llvm.aarch64.neon.sdot.v4i32.v16i8", ty, [ty, by, by])
            return b.call(fn, [acc, x, b.bitcast(w, by)])
        i16x = vec_ty(ir.IntType(16), 4 * n)
        xw = b.sext(x, i16x) if act_signed else b.zext(x, i16x)
        prod = b.mul(xw, b.sext(b.bitcast(w, vec_ty(I8, 4 * n)), i16x))  # |u8 * s8| <= 32640: exact in i16
        i32x = vec_ty(I32, 2 * n)
        pairs = b.add(b.sext(b.shuffle_vector(prod, prod, i32_vector(range(0, 4 * n, 2))), i32x),
                      b.sext(b.shuffle_vector(prod, prod, i32_vector(range(1, 4 * n, 2))), i32x))
        quads = b.add(b.shuffle_vector(pairs, pairs, i32_vector(range(0, 2 * n, 2))),
                      b.shuffle_vector(pairs, pairs, i32_vector(range(1, 2 * n, 2))))
        return b.add(acc, quads)


# ---------------------------------------------------------------------------------------------------------------
# Requantisation


_RANGE = {True: (-128, 127), False: (0, 255)}


class QuantParams:
    """Per-channel fixed-point requantisation parameters, computed once per kernel call into stack arrays of
    `padded` entries, and the requantisation itself (`requantise`).

    Accumulators start at `initial(m)` = corr + 2^31 (wrapping i32), corr = bias - (x_zp + delta) * sum(w): the
    reference's int32 sum v = acc - 2^31 then reads as the unsigned value v + 2^31, at no cost per output. Two
    forms, chosen at run time for the whole call:
    - "high word" when every multiplier is in [2^-12, 1/2) (the usual case): m1 = round(M * 2^32) < 2^31 and
      y = clamp(((v + 2^31) * m1 + offset) >> 32) with offset = 2^31 + (y_zp << 32) - (m1 << 31): unsigned
      32 x 32 -> 64-bit products of the even and odd lanes (vpmuludq / umull), the high words gathered by one
      shuffle, then clamped in i32 (8 vector operations per 16 outputs on AVX-512). m1 keeps 32 + log2(M)
      bits: the error is below |v| * 2^-33 < 1/4 of an output unit, so results stay within 1 of the reference,
      and exact but near ties (a gap under 2^-12 for M >= 2^-12, where outputs in range need |v| < 2^21).
    - exact: M = m0 * 2^-shift with m0 = mantissa << 7 (exact), y = clamp((v * m0 + offset) >> shift) with
      offset = 2^(shift-1) + (y_zp << shift), all in i64."""

    def __init__(self, kb: KernelBuilder, channels: int, padded: int, x_scale: Buffer, x_zp: Buffer | None,
                 w_scale: Buffer, y_scale: Buffer, y_zp: Buffer | None, bias: Buffer | None, sums: Buffer,
                 delta: int):
        b = kb.b
        self.kb = kb
        self.out_signed = y_zp is not None and y_zp.dtype.name == "int8"
        self.init = stack_array(kb, I32, padded, "qinit")
        self.m0 = stack_array(kb, I32, padded, "qm0")
        self.shift = stack_array(kb, I32, padded, "qshift")
        self.offset = stack_array(kb, I64, padded, "qoffset")
        self.m1 = stack_array(kb, I32, padded, "qm1")
        self.offset1 = stack_array(kb, I64, padded, "qoffset1")
        zp_x = (b.sext if x_zp.dtype.name == "int8" else b.zext)(kb.load(x_zp, kb.i64(0)), I32) \
            if x_zp is not None else ir.Constant(I32, 0)
        x_offset = b.add(zp_x, ir.Constant(I32, delta))
        zp_y = (b.sext if self.out_signed else b.zext)(kb.load(y_zp, kb.i64(0)), I64) \
            if y_zp is not None else kb.i64(0)
        offset32 = b.add(kb.i64(1 << 31), b.shl(zp_y, kb.i64(32)))
        xs, ys = kb.load(x_scale, kb.i64(0)), kb.load(y_scale, kb.i64(0))
        small_slot = stack_array(kb, I8, 1, "qsmall")
        store_to(kb, ir.Constant(I8, 1), small_slot)

        def channel_params(m, n: int | None) -> None:
            """Compute and store the parameters of channel m (n None), or of channels m..m+n-1 (all < channels)
            as <n x ...> vectors: the same operations lane by lane."""
            def c(v: int, ty: ir.Type = I32) -> ir.Constant:
                return ir.Constant(ty, v) if n is None else ir.Constant(vec_ty(ty, n), [ir.Constant(ty, v)] * n)

            def sp(value: ir.Value) -> ir.Value:
                return value if n is None else splat(b, value, n)

            def read(buf: Buffer, ty: ir.Type, index) -> ir.Value:
                if n is None:
                    return kb.load(buf, index)
                return b.load(b.gep(buf.ptr, [index], inbounds=True, source_etype=ty), typ=vec_ty(ty, n), align=4)

            if n is None:
                mc = b.select(b.icmp_signed("<", m, kb.i64(channels)), m, kb.i64(channels - 1))
            else:
                mc = m
            scale = read(w_scale, ir.FloatType(), mc) if w_scale.size > 1 else sp(kb.load(w_scale, kb.i64(0)))
            mult = b.fdiv(b.fmul(sp(xs), scale), sp(ys))
            bits = b.bitcast(mult, I32 if n is None else vec_ty(I32, n))
            expo = b.and_(b.lshr(bits, c(23)), c(0xFF))
            mant = b.or_(b.and_(bits, c(0x7FFFFF)), c(0x800000))
            m0 = b.shl(mant, c(7))  # in [2^30, 2^31): a positive i32
            shift = b.sub(c(157), expo)  # mult = m0 * 2^-shift exactly
            # high-word multiplier round(mant * 2^(expo - 118)), for expo < 126 (mult < 1/2)
            down = b.sub(c(118), expo)
            down_c = b.select(b.icmp_signed(">", down, c(31)), c(31), down)
            rounded = b.lshr(b.add(mant, b.shl(c(1), b.sub(down_c, c(1)))), down_c)
            m1 = b.select(b.icmp_signed(">", down, c(0)), rounded,
                          b.shl(mant, b.select(b.icmp_signed(">", down, c(-8)), b.sub(c(0), down), c(0))))
            # shift <= MAX_SHIFT keeps (acc * m0 + offset) inside i64: smaller multipliers (< 2^-15) drop low
            # bits of m0, an error below |acc| * 2^-MAX_SHIFT <= 2^-15 of an output unit
            excess = b.sub(shift, c(MAX_SHIFT))
            excess = b.select(b.icmp_signed(">", excess, c(31)), c(31), excess)
            m0 = b.select(b.icmp_signed(">", excess, c(0)), b.lshr(m0, excess), m0)
            usable = b.and_(b.icmp_unsigned("!=", expo, c(0)), b.icmp_signed(">=", bits, c(0)))
            m0 = b.select(usable, m0, c(0))  # zero, subnormal or negative multipliers give y_zp
            m1 = b.select(usable, m1, c(0))
            # the high word keeps 32 + log2(M) bits of M: from M >= 2^-12 on that is >= 20 bits, an error below
            # 2^-12 of an output unit for every accumulator whose output is in range; smaller multipliers (large
            # accumulators, e.g. a wide final Gemm with M ~ 2^-23) take the exact form
            small = b.or_(b.and_(b.icmp_signed("<", expo, c(126)), b.icmp_signed(">=", expo, c(115))),
                          b.not_(usable))
            if n is not None:  # every lane small
                small = b.icmp_unsigned("==", b.bitcast(small, ir.IntType(n)), ir.Constant(ir.IntType(n), -1))
            was = b.load(small_slot, typ=I8)
            store_to(kb, b.and_(was, b.zext(small, I8)), small_slot)
            # shift >= 1: multipliers >= 2^30 saturate every nonzero accumulator either way
            shift = b.select(b.icmp_signed(">", shift, c(MAX_SHIFT)), c(MAX_SHIFT), shift)
            shift = b.select(b.icmp_signed("<", shift, c(1)), c(1), shift)
            s64 = b.zext(shift, I64 if n is None else vec_ty(I64, n))
            offset = b.add(b.shl(c(1, I64), b.sub(s64, c(1, I64))), b.shl(sp(zp_y), s64))
            corr = b.mul(sp(x_offset), read(sums, I32, m))
            corr = b.sub(read(bias, I32, mc) if bias is not None else c(0), corr)
            offset1 = b.sub(sp(offset32), b.shl(b.zext(m1, s64.type), c(31, I64)))
            for slot, value, align in ((self.init, b.add(corr, c(-2 ** 31)), 4), (self.m0, m0, 4),
                                       (self.shift, shift, 4), (self.offset, offset, 8), (self.m1, m1, 4),
                                       (self.offset1, offset1, 8)):
                elem = value.type if n is None else value.type.element
                store_to(kb, value, b.gep(slot, [m], inbounds=True, source_etype=elem), align)

        # whole vectors of channels first (the computation costs ~25 cycles per channel done one by one, which
        # counts in small layers), then the rest and the padding one by one
        n_vec = max(1, lanes(kb))
        whole = channels // n_vec if n_vec > 1 else 0
        if whole:
            with kb.loop(whole, "qv") as blk:
                channel_params(mul_i64(kb, blk, n_vec), n_vec)
        with kb.loop(padded, "qp", start=whole * n_vec) as m:
            channel_params(m, None)
        self.small = b.icmp_unsigned("!=", b.load(small_slot, typ=I8), ir.Constant(I8, 0))

    def load(self, slot: ir.Value, ty: ir.Type, m, n: int | None = None) -> ir.Value:
        """One parameter (n None) or n consecutive ones as a vector."""
        b = self.kb.b
        ptr = b.gep(slot, [self.kb.i64(m) if isinstance(m, int) else m], inbounds=True, source_etype=ty)
        return b.load(ptr, typ=ty if n is None else vec_ty(ty, n), align=ty.width // 8)

    def initial(self, m, n: int, lanes_: int | None = None) -> ir.Value:
        """The <n x i32> accumulator start: channel m's in every lane (lanes_ None), or channels m..m+n-1."""
        return self._vector(self.init, I32, m, lanes_, n)

    def requantise(self, items, store) -> None:
        """items: [(acc <n x i32> started at `initial`, channel m, lanes)]: lanes None means every lane is channel
        m, else lane i is channel m + i. Calls store(k, <n x i8>) for each, in whichever form (see the class)
        applies."""
        with self.kb.b.if_else(self.small) as (high, exact):
            with high:
                for k, (acc, m, lanes_) in enumerate(items):
                    store(k, self._high_word(acc, m, lanes_))
            with exact:
                for k, (acc, m, lanes_) in enumerate(items):
                    store(k, self._exact(acc, m, lanes_))

    def _vector(self, slot, ty, m, lanes_, n: int) -> ir.Value:
        value = self.load(slot, ty, m, lanes_)
        return value if lanes_ is not None else splat(self.kb.b, value, n)

    def _clamp_narrow(self, v: ir.Value) -> ir.Value:
        b = self.kb.b
        ty = v.type
        lo, hi = _RANGE[self.out_signed]
        lo_v, hi_v = (ir.Constant(ty, [ir.Constant(ty.element, c)] * ty.count) for c in (lo, hi))
        v = b.select(b.icmp_signed("<", v, lo_v), lo_v, v)
        v = b.select(b.icmp_signed(">", v, hi_v), hi_v, v)
        return b.trunc(v, vec_ty(I8, ty.count))

    def _exact(self, acc: ir.Value, m, lanes_) -> ir.Value:
        b = self.kb.b
        n = acc.type.count
        i64x = vec_ty(I64, n)
        v = b.xor(acc, ir.Constant(acc.type, [ir.Constant(I32, -2 ** 31)] * n))  # acc - 2^31: the signed sum
        v = b.mul(b.sext(v, i64x), b.zext(self._vector(self.m0, I32, m, lanes_, n), i64x))
        v = b.ashr(b.add(v, self._vector(self.offset, I64, m, lanes_, n)),
                   b.zext(self._vector(self.shift, I32, m, lanes_, n), i64x))
        return self._clamp_narrow(v)

    def _high_word(self, acc: ir.Value, m, lanes_) -> ir.Value:
        """Even and odd lanes multiplied as unsigned 32 x 32 -> 64-bit pairs, high words gathered by a shuffle."""
        b = self.kb.b
        n = acc.type.count
        if n % 2:
            i64x = vec_ty(I64, n)
            v = b.mul(b.zext(acc, i64x), b.zext(self._vector(self.m1, I32, m, lanes_, n), i64x))
            v = b.add(v, self._vector(self.offset1, I64, m, lanes_, n))
            return self._clamp_narrow(b.trunc(b.lshr(v, ir.Constant(i64x, [ir.Constant(I64, 32)] * n)),
                                              vec_ty(I32, n)))
        half = vec_ty(I64, n // 2)

        def const(v: int) -> ir.Constant:
            return ir.Constant(half, [ir.Constant(I64, v)] * (n // 2))

        v = b.bitcast(acc, half)
        parts = [b.and_(v, const(0xFFFFFFFF)), b.lshr(v, const(32))]
        if lanes_ is None:
            mults = [splat(b, b.zext(self.load(self.m1, I32, m), I64), n // 2)] * 2
            offsets = [splat(b, self.load(self.offset1, I64, m), n // 2)] * 2
        else:
            pair = b.bitcast(self.load(self.m1, I32, m, lanes_), half)
            mults = [b.and_(pair, const(0xFFFFFFFF)), b.lshr(pair, const(32))]
            wide = self.load(self.offset1, I64, m, lanes_)
            offsets = [b.shuffle_vector(wide, wide, i32_vector(range(first, n, 2))) for first in (0, 1)]
        words = [b.bitcast(b.add(b.mul(part, mult), offset), vec_ty(I32, n))
                 for part, mult, offset in zip(parts, mults, offsets)]
        # lane 2i: the high word (dword 2i+1) of even product i; lane 2i+1: that of odd product i
        high = b.shuffle_vector(words[0], words[1], i32_vector(j + 1 if j % 2 == 0 else n + j for j in range(n)))
        return self._clamp_narrow(high)


def weight_sums(w: np.ndarray) -> np.ndarray:
    """Sum of each output channel's (row's) int8 weights, as int32."""
    return w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Convolution


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    n: int
    c: int
    h: int
    w: int
    m: int
    kh: int
    kw: int
    sy: int
    sx: int
    dy: int
    dx: int
    pt: int
    pl: int
    oh: int
    ow: int

    @property
    def ey(self) -> int:
        return (self.kh - 1) * self.dy // self.sy

    @property
    def ex(self) -> int:
        return (self.kw - 1) * self.dx // self.sx

    @property
    def wq(self) -> int:
        """Columns of a packed phase row: every tap's read of an output row stays inside it."""
        return self.ow + self.ex

    @property
    def window_extent(self) -> tuple[int, int]:
        """(rows, columns) of the padded input that the whole output reads."""
        return ((self.oh - 1) * self.sy + (self.kh - 1) * self.dy + 1,
                (self.ow - 1) * self.sx + (self.kw - 1) * self.dx + 1)

    def taps(self):
        """(phase index, position offset) of each tap (kh, kw), row-major."""
        for ky in range(self.kh):
            for kx in range(self.kw):
                phase = ((ky * self.dy) % self.sy) * self.sx + (kx * self.dx) % self.sx
                yield phase, (ky * self.dy // self.sy) * self.wq + kx * self.dx // self.sx


def conv_geometry(kb: KernelBuilder, x: Buffer, w_shape, y: Buffer) -> ConvGeometry | None:
    from edgecc.backends.kernels.quant import _conv_window

    window = _conv_window(kb, x, kb.inputs[3])
    if len(window.kernel) != 2 or tuple(window.out) != tuple(y.shape[2:]):
        return None
    return ConvGeometry(x.shape[0], x.shape[1], x.shape[2], x.shape[3], w_shape[0], *window.kernel,
                        *window.strides, *window.dilations, *window.pads_begin, *window.out)


class BandPacker:
    """Packs output-row bands of the input into scratch: [group][phase y][phase x][rows][Wq][g channels] values,
    padding filled with the zero point (xor the flip). With `centre` (the x zero point as an i16 value, the
    pmaddwd form) the values are int16 x - x_zp, and padding is 0 (`fill` must then be 0)."""

    def __init__(self, kb: KernelBuilder, x: Buffer, geo: ConvGeometry, g: int, rows: int, flip: int,
                 fill: ir.Value, centre: ir.Value | None = None):
        self.kb, self.x, self.geo, self.g, self.rows, self.flip, self.fill = kb, x, geo, g, rows, flip, fill
        self.centre = centre
        self.unit = g * (2 if centre is not None else 1)  # bytes per position
        self.plane = (rows + geo.ey) * geo.wq  # positions of one phase plane
        self.group_bytes = geo.sy * geo.sx * self.plane * self.unit

    def pack(self, n_idx, group, oh0, band_rows, channels: int = 1) -> None:
        """Pack channel groups group..group+channels-1 (each of g channels) for output rows oh0..oh0+band_rows-1
        into self.scratch (from its start)."""
        kb, b, geo, g, unit = self.kb, self.kb.b, self.geo, self.g, self.unit
        rows = add_i64(kb, band_rows, geo.ey)
        with kb.loop(channels, "pg") as gi:
            gidx = add_i64(kb, group, gi)
            for py in range(geo.sy):
                for px in range(geo.sx):
                    phase = py * geo.sx + px
                    # columns c whose input column c * sx + px - pl lies inside [0, W)
                    inside = [c for c in range(geo.wq) if 0 <= c * geo.sx + px - geo.pl < geo.w]
                    c_lo, c_hi = (inside[0], inside[-1] + 1) if inside else (0, 0)
                    with kb.loop(rows, "pr") as rr:
                        dst = add_i64(kb, mul_i64(kb, gi, self.group_bytes), (phase * self.plane) * unit,
                                      mul_i64(kb, rr, geo.wq * unit))
                        ih = add_i64(kb, mul_i64(kb, add_i64(kb, oh0, rr), geo.sy), py - geo.pt)
                        valid = b.icmp_unsigned("<", ih, kb.i64(geo.h))
                        with b.if_else(valid) as (then, otherwise):
                            with then:
                                if c_lo:
                                    memset(kb, byte_ptr(kb, self.scratch, dst), self.fill, c_lo * unit)
                                if c_hi < geo.wq:
                                    memset(kb, byte_ptr(kb, self.scratch, add_i64(kb, dst, c_hi * unit)),
                                           self.fill, (geo.wq - c_hi) * unit)
                                srcs = []
                                for j in range(g):
                                    ch = add_i64(kb, mul_i64(kb, gidx, g), j)
                                    if g > 1 and geo.c % g:  # channels past C read channel C-1 (zero weights)
                                        ch = b.select(b.icmp_signed("<", ch, kb.i64(geo.c)), ch,
                                                      kb.i64(geo.c - 1))
                                    srcs.append(add_i64(kb, mul_i64(kb, n_idx, geo.c * geo.h * geo.w),
                                                        mul_i64(kb, ch, geo.h * geo.w), mul_i64(kb, ih, geo.w),
                                                        px - geo.pl))
                                if unit == 1 and geo.sx == 1 and not self.flip and c_hi > c_lo:  # one plain copy
                                    memcpy(kb, byte_ptr(kb, self.scratch, add_i64(kb, dst, c_lo)),
                                           kb.element_ptr(self.x, add_i64(kb, srcs[0], c_lo)), c_hi - c_lo)
                                else:
                                    self.copy_columns(srcs, dst, c_lo, c_hi, px)
                            with otherwise:
                                memset(kb, byte_ptr(kb, self.scratch, dst), self.fill, geo.wq * unit)

    def value(self, v: ir.Value) -> ir.Value:
        """An activation byte (or vector of them) as packed: xor the flip, or widened to i16 less the zero point."""
        b = self.kb.b
        if self.centre is not None:
            signed = self.x.dtype.name == "int8"
            if isinstance(v.type, ir.VectorType):
                wide = (b.sext if signed else b.zext)(v, vec_ty(I16, v.type.count))
                return b.sub(wide, splat(b, self.centre, v.type.count))
            return b.sub((b.sext if signed else b.zext)(v, I16), self.centre)
        if self.flip:
            mask = ir.Constant(I8, self.flip)
            return b.xor(v, ir.Constant(v.type, [mask] * v.type.count) if isinstance(v.type, ir.VectorType) else mask)
        return v

    def copy_columns(self, srcs, dst, c_lo: int, c_hi: int, px: int) -> None:
        """Columns c_lo..c_hi-1 of the g channel rows at srcs into the packed row at dst: whole chunks of CHUNK,
        then CHUNK / 2 columns by vectors, the rest by one chunk ending at c_hi (overlapping columns already
        copied, with the same values) when its read stays inside the row, else value by value."""
        kb, geo, g = self.kb, self.geo, self.g
        start = c_lo
        for width in (CHUNK, CHUNK // 2):
            chunks = self.chunks(start, c_hi, px, width)
            if chunks:
                with kb.loop(chunks, "pv") as k:
                    self.copy_chunk(srcs, dst, add_i64(kb, mul_i64(kb, k, width), start), width)
                start += chunks * width
        if start == c_hi:
            return
        for width in (CHUNK // 2, CHUNK):
            col = c_hi - width
            if c_lo <= col <= start and self.chunks(col, c_hi, px, width):
                self.copy_chunk(srcs, dst, kb.i64(col), width)
                return
        with kb.loop(c_hi, "pc", start=start) as col:
            for j in range(g):
                v = self.value(kb.load(self.x, add_i64(kb, srcs[j], mul_i64(kb, col, geo.sx))))
                store_to(kb, v, byte_ptr(kb, self.scratch, add_i64(kb, dst, mul_i64(kb, col, self.unit),
                                                                   j * (self.unit // g))))

    def chunks(self, c_lo: int, c_hi: int, px: int, width: int = CHUNK) -> int:
        """Whole chunks of `width` columns from c_lo whose vector reads (width * sx bytes) stay inside the input
        row."""
        geo, k = self.geo, 0
        while c_lo + (k + 1) * width <= c_hi and (c_lo + (k + 1) * width) * geo.sx - 1 + px - geo.pl <= geo.w - 1:
            k += 1
        return k

    def copy_chunk(self, srcs, dst, col, width: int = CHUNK) -> None:
        """Columns col..col+width-1 of the g channel rows at srcs into dst, interleaved by channel."""
        kb, b, sx, g = self.kb, self.kb.b, self.geo.sx, self.g
        rows = []
        for src in srcs:
            wide = b.load(kb.element_ptr(self.x, add_i64(kb, src, mul_i64(kb, col, sx))), typ=vec_ty(I8, width * sx),
                          align=1)
            row = wide if sx == 1 else b.shuffle_vector(wide, wide, i32_vector(range(0, width * sx, sx)))
            rows.append(self.value(row))
        if g == 1:
            value = rows[0]
        elif g == 2:  # out[2i + j] = rows[j][i]
            value = b.shuffle_vector(rows[0], rows[1], i32_vector(j * width + i for i in range(width) for j in range(2)))
        else:  # g == 4: out[4i + j] = rows[j][i]
            low = b.shuffle_vector(rows[0], rows[1], i32_vector(range(2 * width)))
            high = b.shuffle_vector(rows[2], rows[3], i32_vector(range(2 * width)))
            value = b.shuffle_vector(low, high, i32_vector(j * width + i for i in range(width) for j in range(4)))
        store_to(kb, value, byte_ptr(kb, self.scratch, add_i64(kb, dst, mul_i64(kb, col, self.unit))))


def band_span(kb: KernelBuilder, geo: ConvGeometry, band, rows: int) -> tuple:
    """(first output row, row count) of band `band` of `rows` rows (the last one may be shorter)."""
    b = kb.b
    oh0 = mul_i64(kb, band, rows)
    left = b.sub(kb.i64(geo.oh), oh0)
    return oh0, b.select(b.icmp_signed("<", left, kb.i64(rows)), left, kb.i64(rows))


def packed_zero_point(kb: KernelBuilder, x_zp: Buffer | None, flip: int) -> ir.Value:
    """The byte that packed padding holds: x's zero point after the activation flip."""
    if x_zp is None:
        return ir.Constant(I8, flip)
    return kb.b.xor(kb.load(x_zp, kb.i64(0)), ir.Constant(I8, flip))


def band_rows(geo: ConvGeometry, bytes_per_row: int, limit: int = BAND_BYTES) -> int:
    """Output rows per band: as many as fit `limit`, balanced over the bands."""
    rows = max(1, min(geo.oh, limit // bytes_per_row - geo.ey))
    bands = -(-geo.oh // rows)
    return -(-geo.oh // bands)


def pack_dot_weights(w: np.ndarray, mr: int, c4: int, per_word: int = 4) -> np.ndarray:
    """[M, C, kh, kw] int8 -> int32 words: M sums padded to a whole block, then [M/mr][C/per_word][tap][mr][word],
    a word holding 4 int8 weights of consecutive channels, or 2 sign-extended int16 ones (per_word 2, pmaddwd)."""
    m, c = w.shape[:2]
    blocks = -(-m // mr)
    taps = int(np.prod(w.shape[2:]))
    padded = np.zeros((blocks * mr, c4 * per_word, taps), np.int8 if per_word == 4 else np.int16)
    padded[:m, :c] = w.reshape(m, c, taps)
    words = padded.reshape(blocks, mr, c4, per_word, taps).transpose(0, 2, 4, 1, 3)  # block, c4, tap, mr, word
    words = np.ascontiguousarray(words).view(np.int32).reshape(-1)
    sums = np.zeros(blocks * mr, np.int32)
    sums[:m] = weight_sums(w)
    return np.concatenate([sums, words])


def choose_tile(positions: int, lanes_: int, budget: int, channels: int) -> tuple[int, int]:
    """(MR channels, NR position vectors): the fewest padded positions over the band (ties: more vectors)."""
    best = None
    for nr in range(1, 5):
        padded = -(-positions // (nr * lanes_)) * nr * lanes_
        key = (padded, -nr)
        if best is None or key < best[0]:
            best = (key, nr)
    nr = best[1]
    return max(1, min(channels, budget // nr)), nr


class ActivationForm:
    """How a kernel packs activations for `dot`: bytes xor `flip` (the dot then sees x + delta, padding holds the
    zero point), or centred int16 x - x_zp (the pmaddwd form: padding 0, no zero-point correction). `params` are
    the (x_scale, x_zp, w_scale, y_scale, y_zp, bias) QuantParams sees."""

    def __init__(self, kb: KernelBuilder, dot: Dot4, x: Buffer, params_in):
        self.flip, self.delta = dot.flip(x.dtype.name == "int8")
        x_zp = params_in[1]
        if dot.centred:
            self.fill = ir.Constant(I8, 0)
            self.centre = ir.Constant(I16, 0) if x_zp is None else \
                (kb.b.sext if x_zp.dtype.name == "int8" else kb.b.zext)(kb.load(x_zp, kb.i64(0)), I16)
            self.params = (params_in[0], None, *params_in[2:])
        else:
            self.fill = packed_zero_point(kb, x_zp, self.flip)
            self.centre = None
            self.params = tuple(params_in)


def emit_dot_conv(kb: KernelBuilder, geo: ConvGeometry, x: Buffer, params_in, y: Buffer, dot: Dot4) -> bool:
    """Group-1 QLinearConv by dot4 over packed bands (see the module docstring). False if the band does not fit."""
    b = kb.b
    act_signed = x.dtype.name == "int8"
    c4 = -(-geo.c // dot.per_word)  # channel words
    phases = geo.sy * geo.sx
    bytes_per_row = c4 * phases * geo.wq * 4
    if (1 + geo.ey) * bytes_per_row > dot.max_scratch:
        return False
    L = dot.lanes
    budget = dot.accumulators()
    rows = band_rows(geo, bytes_per_row, min(dot.band_bytes,
                                             (dot.stage_bytes // (budget * geo.wq) + geo.ey) * bytes_per_row))
    mr, nr = choose_tile(rows * geo.wq, L, budget, geo.m)
    T = nr * L
    n_tiles_max = -(-rows * geo.wq // T)
    taps = list(geo.taps())
    packed = kb.packed_input(3, lambda w: pack_dot_weights(w, mr, c4, dot.per_word))
    blocks = -(-geo.m // mr)
    w_words = blocks * mr  # the sums come first
    form = ActivationForm(kb, dot, x, params_in)
    params = QuantParams(kb, geo.m, blocks * mr, *form.params, sums=packed, delta=form.delta)

    packer = BandPacker(kb, x, geo, dot.per_word, rows, form.flip, form.fill, form.centre)
    slack = (T + geo.ey * geo.wq + geo.ex + 1) * 4
    packer.scratch = stack_bytes(kb, c4 * packer.group_bytes + slack, "band")
    memset(kb, byte_ptr(kb, packer.scratch, c4 * packer.group_bytes), form.fill, slack)
    stage_stride = n_tiles_max * T
    staging = stack_bytes(kb, mr * stage_stride, "stage")
    accs = Accumulators(kb)
    acc_ty = vec_ty(I32, L)
    x_ty = vec_ty(I8, 4 * L)
    n_bands = -(-geo.oh // rows)

    def channel_block(n_idx, oh0, rb, m0, count: int):
        blk = b.sdiv(m0, kb.i64(mr)) if not isinstance(m0, int) else m0 // mr
        w_block = add_i64(kb, mul_i64(kb, blk, c4 * len(taps) * mr), w_words)
        positions = b.sub(b.mul(rb, kb.i64(geo.wq)), kb.i64(geo.wq - geo.ow))
        n_tiles = b.sdiv(b.add(positions, kb.i64(T - 1)), kb.i64(T))
        with kb.loop(n_tiles, "tile") as t:
            q0 = mul_i64(kb, t, T)
            slots = [(r, v) for r in range(count) for v in range(nr)]
            starts = [params.initial(add_i64(kb, m0, r), L) for r in range(count)]
            for r, v in slots:
                accs.set(("q", r, v), starts[r])
            with kb.loop(c4, "c4") as g:
                base = add_i64(kb, mul_i64(kb, g, packer.group_bytes), mul_i64(kb, q0, 4))
                wg = add_i64(kb, w_block, mul_i64(kb, g, len(taps) * mr))
                values = {key: accs.get(("q", *key), acc_ty) for key in slots}
                for ti, (phase, offset) in enumerate(taps):
                    start = add_i64(kb, base, (phase * packer.plane + offset) * 4)
                    xs = [b.load(byte_ptr(kb, packer.scratch, add_i64(kb, start, v * L * 4)), typ=x_ty, align=4)
                          for v in range(nr)]
                    for r in range(count):
                        word = kb.load(packed, add_i64(kb, wg, ti * mr + r))
                        wv = splat(b, word, L)
                        for v in range(nr):
                            values[r, v] = dot.dot(values[r, v], xs[v], wv, act_signed if dot.signed is None
                                                   else dot.signed)
                for key in slots:
                    accs.set(("q", *key), values[key])
            for r in range(count):
                items = [(accs.get(("q", r, v), acc_ty), add_i64(kb, m0, r), None) for v in range(nr)]
                params.requantise(items, lambda k, out, r=r: store_to(
                    kb, out, byte_ptr(kb, staging, add_i64(kb, q0, r * stage_stride + k * L))))
        for r in range(count):
            with kb.loop(rb, "row") as rr:
                flat = add_i64(kb, mul_i64(kb, add_i64(kb, n_idx, 0), geo.m * geo.oh * geo.ow),
                               mul_i64(kb, add_i64(kb, m0, r), geo.oh * geo.ow),
                               mul_i64(kb, add_i64(kb, oh0, rr), geo.ow))
                memcpy(kb, kb.element_ptr(y, flat), byte_ptr(kb, staging, add_i64(kb, mul_i64(kb, rr, geo.wq),
                                                                                  r * stage_stride)), geo.ow)

    with kb.loop(geo.n, "n") as n_idx, kb.loop(n_bands, "band") as band:
        oh0, rb = band_span(kb, geo, band, rows)
        packer.pack(n_idx, kb.i64(0), oh0, rb, c4)
        for_blocks(kb, geo.m, mr, lambda m0, count: channel_block(n_idx, oh0, rb, m0, count), "mb")
    return True


def channel_lanes_pay(geo: ConvGeometry, dot: Dot4) -> bool:
    """Output channels in the lanes (emit_channel_dot_conv) when the whole padded map fits one band and fills
    lanes clearly better (10 points) than flattened positions do: 7x7 maps use 49 of 64 position lanes (ResNet-18's
    last stage: 0.66 -> 0.50 ms per 512-channel 3x3 layer on Zen 4); 14x14 ones already 88%."""
    c4 = -(-geo.c // dot.per_word)
    rows_in, cols_in = geo.window_extent
    if rows_in * cols_in * c4 * 4 > dot.band_bytes:
        return False
    L = dot.lanes
    _, nr = choose_tile(geo.oh * geo.wq, L, 24, geo.m)
    position_use = geo.oh * geo.ow / (-(-(geo.oh * geo.wq) // (nr * L)) * nr * L)
    channel_use = geo.m / (-(-geo.m // L) * L)
    return channel_use >= position_use + 0.1


def emit_channel_dot_conv(kb: KernelBuilder, geo: ConvGeometry, x: Buffer, params_in, y: Buffer, dot: Dot4) -> None:
    """Group-1 QLinearConv of a small map with output channels in the lanes: the padded map is packed once as
    [row][column][C/4][4 channels] (each position's channel words contiguous), weights as in emit_dot_conv with
    blocks of MV * L channels; a tile is MV channel vectors x P positions, each step MV weight-vector loads, P
    broadcast input words and MV * P dot4. Outputs are stored lane by lane (channel stride H * W)."""
    b = kb.b
    act_signed = x.dtype.name == "int8"
    form = ActivationForm(kb, dot, x, params_in)
    c4 = -(-geo.c // dot.per_word)  # channel words
    rows_in, cols_in = geo.window_extent
    pos_bytes = c4 * 4
    L = dot.lanes
    budget = dot.accumulators()
    mv = max(1, min(4, -(-geo.m // L), budget // 4))
    block = mv * L
    p_full = max(1, budget // mv)
    n_pos = geo.oh * geo.ow
    taps = [((ky * geo.dy) * cols_in + kx * geo.dx) * pos_bytes for ky in range(geo.kh) for kx in range(geo.kw)]
    packed = kb.packed_input(3, lambda w: pack_dot_weights(w, block, c4, dot.per_word))
    blocks = -(-geo.m // block)
    params = QuantParams(kb, geo.m, blocks * block, *form.params, sums=packed, delta=form.delta)
    value_bytes = 4 // dot.per_word
    scratch = stack_bytes(kb, rows_in * cols_in * pos_bytes, "map")
    offsets = kb.table(np.array([((p // geo.ow) * geo.sy * cols_in + (p % geo.ow) * geo.sx) * pos_bytes
                                 for p in range(n_pos)], np.int64), "qpos")
    accs = Accumulators(kb)
    acc_ty = vec_ty(I32, L)
    bytes_ty = vec_ty(I8, 4 * L)
    r_lo, r_hi = max(0, geo.pt), min(rows_in, geo.h + geo.pt)
    c_lo, c_hi = max(0, geo.pl), min(cols_in, geo.w + geo.pl)

    def pack(n_idx) -> None:
        memset(kb, scratch, form.fill, rows_in * cols_in * pos_bytes)
        if r_hi <= r_lo or c_hi <= c_lo:
            return
        with kb.loop(geo.c, "pc") as c, kb.loop(r_hi, "pr", start=r_lo) as r:
            src = add_i64(kb, mul_i64(kb, n_idx, geo.c * geo.h * geo.w), mul_i64(kb, c, geo.h * geo.w),
                          mul_i64(kb, r, geo.w), -geo.pt * geo.w - geo.pl)
            dst = add_i64(kb, mul_i64(kb, r, cols_in * pos_bytes), mul_i64(kb, c, value_bytes))
            with kb.loop(c_hi, "pcol", start=c_lo) as col:
                v = kb.load(x, add_i64(kb, src, col))
                if form.centre is not None:
                    v = b.sub((b.sext if act_signed else b.zext)(v, I16), form.centre)
                elif form.flip:
                    v = b.xor(v, ir.Constant(I8, form.flip))
                store_to(kb, v, byte_ptr(kb, scratch, add_i64(kb, dst, mul_i64(kb, col, pos_bytes))))

    def tile(n_idx, m0, count: int, p0, n: int) -> None:
        nvec = -(-count // L)
        slots = [(v, q) for v in range(nvec) for q in range(n)]
        starts = [params.initial(add_i64(kb, m0, v * L), L, L) for v in range(nvec)]
        for v, q in slots:
            accs.set(("c", v, q), starts[v])
        pos = [b.load(b.gep(offsets, [add_i64(kb, p0, q)], inbounds=True, source_etype=I64), typ=I64)
               for q in range(n)]
        blk = m0 // block if isinstance(m0, int) else b.sdiv(m0, kb.i64(block))
        w_block = add_i64(kb, mul_i64(kb, blk, c4 * len(taps) * block), blocks * block)
        with kb.loop(c4, "c4") as g:
            values = {key: accs.get(("c", *key), acc_ty) for key in slots}
            wg = add_i64(kb, w_block, mul_i64(kb, g, len(taps) * block))
            for ti, tap in enumerate(taps):
                weights = [b.load(b.bitcast(kb.element_ptr(packed, add_i64(kb, wg, ti * block + v * L)),
                                            acc_ty.as_pointer()), typ=acc_ty, align=4) for v in range(nvec)]
                for q in range(n):
                    ptr = byte_ptr(kb, scratch, add_i64(kb, pos[q], mul_i64(kb, g, 4), tap))
                    word = b.load(b.bitcast(ptr, I32.as_pointer()), typ=I32, align=4)
                    xv = b.bitcast(splat(b, word, L), bytes_ty)
                    for v in range(nvec):
                        values[v, q] = dot.dot(values[v, q], xv, weights[v],
                                               act_signed if dot.signed is None else dot.signed)
            for key in slots:
                accs.set(("c", *key), values[key])
        def store(k: int, out: ir.Value) -> None:
            v, q = slots[k]
            base = add_i64(kb, mul_i64(kb, n_idx, geo.m * n_pos), mul_i64(kb, add_i64(kb, m0, v * L), n_pos), p0, q)
            for i in range(min(L, count - v * L)):
                kb.store(y, add_i64(kb, base, i * n_pos), b.extract_element(out, ir.Constant(I32, i)))

        params.requantise([(accs.get(("c", v, q), acc_ty), add_i64(kb, m0, v * L), L) for v, q in slots], store)

    with kb.loop(geo.n, "n") as n_idx:
        pack(n_idx)

        def channel_block(m0, count: int) -> None:
            full, rest = divmod(n_pos, p_full)
            if full:
                with kb.loop(full, "pt") as t:
                    tile(n_idx, m0, count, mul_i64(kb, t, p_full), p_full)
            if rest:
                tile(n_idx, m0, count, full * p_full, rest)

        for_blocks(kb, geo.m, block, channel_block, "cb")


def window_groups(geo: ConvGeometry, row_bytes: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """The taps cut into windows of 4 consecutive bytes of one packed row (rows of `row_bytes`, one plane per
    stride phase along y): (y phase, byte offset of the window, [(byte j in the window, tap index)]). A 3x3
    kernel is 3 windows at any stride (2 dilated by 2)."""
    groups = []
    for ky in range(geo.kh):
        phase, row_off = (ky * geo.dy) % geo.sy, (ky * geo.dy // geo.sy) * row_bytes
        offsets = [(kx * geo.dx, ky * geo.kw + kx) for kx in range(geo.kw)]
        while offsets:
            first = offsets[0][0]
            inside = [(o - first, t) for o, t in offsets if o < first + 4]
            groups.append((phase, row_off + first, inside))
            offsets = offsets[len(inside):]
    return groups


def pack_depthwise_weights(w: np.ndarray, windows: tuple | None) -> np.ndarray:
    """[C, 1, kh, kw] int8 -> int32: the C sums, then per channel either its taps sign-extended (windows None) or
    one 4-byte word per window (byte j = the weight of the tap at window position j, 0 where there is none)."""
    taps = w.reshape(w.shape[0], -1)
    if windows is None:
        return np.concatenate([weight_sums(w), taps.astype(np.int32).reshape(-1)])
    words = np.zeros((w.shape[0], len(windows), 4), np.int8)
    for g, inside in enumerate(windows):
        for j, t in inside:
            words[:, g, j] = taps[:, t]
    return np.concatenate([weight_sums(w), words.view(np.int32).reshape(-1)])


def emit_depthwise_qconv(kb: KernelBuilder, geo: ConvGeometry, x: Buffer, params_in, y: Buffer) -> bool:
    """Depthwise QLinearConv: each channel's padded map packed (one byte per position). With vpdpbusd (and
    AVX-512 VBMI's byte permute) or sdot, up to 4 taps of one kernel row are one dot4: the rows are packed whole
    (one plane per y stride phase), and lane i takes the 4 bytes at sx * i + 0..3 of the window (a byte shuffle of
    one load), the weight word holding the taps' weights. On x86 without VNNI: pmaddwd over tap pairs
    (emit_paired_depthwise_qconv). Elsewhere the input is packed by stride phases as in emit_dot_conv and each tap
    is an i32 multiply-add over L positions (u8/s8 x s8 products need 16 bits; sums need 32)."""
    b = kb.b
    act_signed = x.dtype.name == "int8"
    dot = Dot4(kb)
    features = set(kb.target.features.split(","))
    windowed = dot.kind == "sdot" or (dot.kind == "vnni" and "+avx512vbmi" in features)
    if not windowed and dot.centred:
        return emit_paired_depthwise_qconv(kb, geo, x, params_in, y, dot)
    L = dot.lanes if windowed else max(1, lanes(kb))
    window_bytes = next((n for n in (16, 32, 64) if n >= (L - 1) * geo.sx + 4), None)
    windowed = windowed and window_bytes is not None
    if windowed:  # whole rows; q = oh * wq + ow reads from byte sx * q of a y-phase plane
        sx = geo.sx
        wq = max(geo.ow, geo.ow - 1 + -(-((geo.kw - 1) * geo.dx + 1) // sx))
        pack_geo = dataclasses.replace(geo, sx=1, kw=1, dx=1, ow=wq * sx)
    else:
        sx, wq, pack_geo = 1, geo.wq, geo
    bytes_per_row = pack_geo.sy * pack_geo.sx * pack_geo.wq
    if (1 + geo.ey) * bytes_per_row > dot.max_scratch:
        return False
    rows = band_rows(geo, bytes_per_row, dot.band_bytes)
    budget = 12 if vector_registers(kb) >= 32 else 6
    _, nr = choose_tile(rows * wq, L, budget * 4, 4)
    nr = min(nr, budget)
    T = nr * L
    n_tiles_max = -(-rows * wq // T)
    taps = list(geo.taps())
    groups = window_groups(geo, pack_geo.wq) if windowed else None
    windows = tuple(tuple(inside) for _, _, inside in groups) if windowed else None
    packed = kb.packed_input(3, lambda w: pack_depthwise_weights(w, windows))
    flip, delta = dot.flip(act_signed) if windowed else (0, 0)
    params = QuantParams(kb, geo.m, geo.m, *params_in, sums=packed, delta=delta)
    fill = packed_zero_point(kb, params_in[1], flip)
    packer = BandPacker(kb, x, pack_geo, 1, rows, flip, fill)
    slack = sx * T + geo.ey * pack_geo.wq + (geo.kw - 1) * geo.dx + 1 + (window_bytes or 0)
    packer.scratch = stack_bytes(kb, packer.group_bytes + slack, "band")
    memset(kb, byte_ptr(kb, packer.scratch, packer.group_bytes), fill, slack)
    staging = stack_bytes(kb, n_tiles_max * T, "stage")
    acc_ty, x_ty = vec_ty(I32, L), vec_ty(I8, L)
    n_bands = -(-geo.oh // rows)
    per_channel = len(groups) if windowed else len(taps)
    spread = i32_vector(sx * i + j for i in range(L) for j in range(4))
    reads = [(phase, offset) for phase, offset, _ in groups] if windowed else taps

    with kb.loop(geo.n, "n") as n_idx, kb.loop(geo.c, "c") as c, kb.loop(n_bands, "band") as band:
        oh0, rb = band_span(kb, geo, band, rows)
        packer.pack(n_idx, c, oh0, rb)
        weights = [splat(b, kb.load(packed, add_i64(kb, mul_i64(kb, c, per_channel), geo.m + k)), L)
                   for k in range(per_channel)]
        start = params.initial(c, L)
        positions = b.sub(b.mul(rb, kb.i64(wq)), kb.i64(wq - geo.ow))
        n_tiles = b.sdiv(b.add(positions, kb.i64(T - 1)), kb.i64(T))
        with kb.loop(n_tiles, "tile") as t:
            q0 = mul_i64(kb, t, T)
            values = [start] * nr
            for k, (phase, offset) in enumerate(reads):
                for v in range(nr):
                    at_ = add_i64(kb, mul_i64(kb, q0, sx), phase * packer.plane + offset + v * L * sx)
                    ptr = byte_ptr(kb, packer.scratch, at_)
                    if windowed:
                        wide = b.load(ptr, typ=vec_ty(I8, window_bytes), align=1)
                        xv = b.shuffle_vector(wide, wide, spread)
                        values[v] = dot.dot(values[v], xv, weights[k], dot.signed)
                    else:
                        xv = b.load(ptr, typ=x_ty, align=1)
                        xv = b.sext(xv, acc_ty) if act_signed else b.zext(xv, acc_ty)
                        values[v] = b.add(values[v], b.mul(xv, weights[k]))
            params.requantise([(values[v], c, None) for v in range(nr)],
                              lambda k, out: store_to(kb, out, byte_ptr(kb, staging, add_i64(kb, q0, k * L))))
        with kb.loop(rb, "row") as rr:
            flat = add_i64(kb, mul_i64(kb, n_idx, geo.m * geo.oh * geo.ow), mul_i64(kb, c, geo.oh * geo.ow),
                           mul_i64(kb, add_i64(kb, oh0, rr), geo.ow))
            memcpy(kb, kb.element_ptr(y, flat), byte_ptr(kb, staging, mul_i64(kb, rr, wq)), geo.ow)
    return True


def tap_pairs(geo: ConvGeometry) -> list[tuple[int, int, int, int | None]]:
    """The taps of geo.taps() in pairs reading adjacent positions of one phase plane (phase, offset, tap a, tap b
    at offset + 1, or None: a lone tap, paired with a zero weight). 3x3 stride 1: per kernel row (kx 0, 1) and
    (kx 2); stride 2: (kx 0, 2) share phase 0 at offsets 0 and 1, kx 1 is alone in phase 1."""
    taps = sorted((phase, offset, t) for t, (phase, offset) in enumerate(geo.taps()))
    pairs, i = [], 0
    while i < len(taps):
        phase, offset, t = taps[i]
        if i + 1 < len(taps) and taps[i + 1][:2] == (phase, offset + 1):
            pairs.append((phase, offset, t, taps[i + 1][2]))
            i += 2
        else:
            pairs.append((phase, offset, t, None))
            i += 1
    return pairs


def pack_paired_depthwise_weights(w: np.ndarray, pairs) -> np.ndarray:
    """[C, 1, kh, kw] int8 -> int32: the C sums, then per channel one word per tap pair (2 sign-extended int16
    weights, the second 0 for a lone tap)."""
    taps = w.reshape(w.shape[0], -1)
    words = np.zeros((w.shape[0], len(pairs), 2), np.int16)
    for k, (_, _, ta, tb) in enumerate(pairs):
        words[:, k, 0] = taps[:, ta]
        if tb is not None:
            words[:, k, 1] = taps[:, tb]
    return np.concatenate([weight_sums(w), words.view(np.int32).reshape(-1)])


def emit_paired_depthwise_qconv(kb: KernelBuilder, geo: ConvGeometry, x: Buffer, params_in, y: Buffer,
                                dot: Dot4) -> bool:
    """Depthwise QLinearConv with pmaddwd (x86 without VNNI): each channel's band packed by stride phases as int16
    x - x_zp (BandPacker, centred), taps paired when they read adjacent positions (tap_pairs). One pmaddwd of the
    2L values from position p + offset gives, in lane i, x[p + 2i + offset] * wa + x[p + 2i + offset + 1] * wb:
    the pair's contribution to output p + 2i; the load from one position further gives the odd outputs p + 2i + 1.
    So a 3x3 kernel is 6 pmaddwd per 2L outputs instead of 9 i32 multiplies per L. Even and odd results are
    requantised separately and interleaved when stored. Exact for the bound in Dot4. Also takes group-1
    convolutions of one input channel (lenet5's first layer): each packed band then feeds all M output channels."""
    b = kb.b
    L = dot.lanes
    bytes_per_row = geo.sy * geo.sx * geo.wq * 2
    if (1 + geo.ey) * bytes_per_row > dot.max_scratch:
        return False
    rows = band_rows(geo, bytes_per_row, dot.band_bytes)
    budget = 12 if vector_registers(kb) >= 32 else 6  # accumulators: an even and an odd one per 2L positions
    positions = rows * geo.wq  # per band: padded positions plus a tile's fixed cost (its loop, requantisation
    # branch and the dependency chains one vector pair alone leaves waiting), counted as 2L positions
    nr = min(range(1, budget // 2 + 1), key=lambda n: (-(-positions // (2 * L * n)) * (2 * L * n + 2 * L), -n))
    T = nr * 2 * L
    n_tiles_max = -(-rows * geo.wq // T)
    pairs = tap_pairs(geo)
    packed = kb.packed_input(3, lambda w: pack_paired_depthwise_weights(w, pairs))
    form = ActivationForm(kb, dot, x, params_in)
    params = QuantParams(kb, geo.m, geo.m, *form.params, sums=packed, delta=form.delta)
    packer = BandPacker(kb, x, geo, 1, rows, 0, form.fill, form.centre)
    slack = (T + geo.ey * geo.wq + geo.ex + 2) * 2
    packer.scratch = stack_bytes(kb, packer.group_bytes + slack, "band")
    memset(kb, byte_ptr(kb, packer.scratch, packer.group_bytes), form.fill, slack)
    staging = stack_bytes(kb, n_tiles_max * T, "stage")
    x_ty = vec_ty(I16, 2 * L)
    n_bands = -(-geo.oh // rows)
    interleave = i32_vector(j * L + i for i in range(L) for j in range(2))

    def channel_band(n_idx, m, oh0, rb) -> None:
        """Output channel m over the packed band of rows oh0..oh0+rb-1."""
        weights = [splat(b, kb.load(packed, add_i64(kb, mul_i64(kb, m, len(pairs)), geo.m + k)), L)
                   for k in range(len(pairs))]
        start = params.initial(m, L)
        positions = b.sub(b.mul(rb, kb.i64(geo.wq)), kb.i64(geo.wq - geo.ow))
        n_tiles = b.sdiv(b.add(positions, kb.i64(T - 1)), kb.i64(T))
        with kb.loop(n_tiles, "tile") as t:
            q0 = mul_i64(kb, t, T)
            values = [start] * (2 * nr)  # [2v]: even outputs of vector pair v, [2v + 1]: odd ones
            for k, (phase, offset, _, _) in enumerate(pairs):
                for v in range(2 * nr):
                    at_ = add_i64(kb, q0, phase * packer.plane + offset + (v // 2) * 2 * L + v % 2)
                    xv = b.load(byte_ptr(kb, packer.scratch, mul_i64(kb, at_, 2)), typ=x_ty, align=2)
                    values[v] = dot.dot(values[v], xv, weights[k], True)
            even = {}

            def store(k: int, out: ir.Value) -> None:
                if k % 2 == 0:
                    even[k // 2] = out
                    return
                both = b.shuffle_vector(even[k // 2], out, interleave)
                store_to(kb, both, byte_ptr(kb, staging, add_i64(kb, q0, (k // 2) * 2 * L)))

            params.requantise([(values[v], m, None) for v in range(2 * nr)], store)
        with kb.loop(rb, "row") as rr:
            flat = add_i64(kb, mul_i64(kb, n_idx, geo.m * geo.oh * geo.ow), mul_i64(kb, m, geo.oh * geo.ow),
                           mul_i64(kb, add_i64(kb, oh0, rr), geo.ow))
            memcpy(kb, kb.element_ptr(y, flat), byte_ptr(kb, staging, mul_i64(kb, rr, geo.wq)), geo.ow)

    mult = geo.m // geo.c  # output channels per input channel (1: depthwise; M: one input channel, group 1)
    with kb.loop(geo.n, "n") as n_idx, kb.loop(geo.c, "c") as c, kb.loop(n_bands, "band") as band:
        oh0, rb = band_span(kb, geo, band, rows)
        packer.pack(n_idx, c, oh0, rb)
        with kb.loop(mult, "mult") as j:
            m = add_i64(kb, mul_i64(kb, c, mult), j)
            channel_band(n_idx, m, oh0, rb)
    return True


def emit_fast_qlinear_conv(kb: KernelBuilder) -> bool:
    """QLinearConv by the fast kernels when they apply (hosted target, 2-D, constant int8 weights with zero points
    all 0, group 1 or depthwise, per-tensor x/y parameters, K <= MAX_K, M <= MAX_CHANNELS); False leaves the node
    to the generic kernel."""
    node = kb.node
    if not fast_kernels_run(kb.target):
        return False
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (kb.inputs + [None] * 9)[:8]
    bias = kb.optional_input(8)
    y = kb.outputs[0]
    wv = node.input(3)
    if wv is None or not wv.is_const or w.dtype.name != "int8" or x.type.rank != 4:
        return False
    if x.dtype.name not in ("uint8", "int8") or y.dtype.name not in ("uint8", "int8"):
        return False
    if any(p is None for p in (x_s, w_s, y_s)) or x_s.size != 1 or y_s.size != 1 or \
            (x_zp is not None and x_zp.size != 1) or (y_zp is not None and y_zp.size != 1):
        return False
    if w_zp is not None:
        zp = kb.const_input(5)
        if zp is None or np.any(zp != 0):
            return False
    if bias is not None and bias.dtype.name != "int32":
        return False
    group = int(kb.attrs["group"])
    m, cg = w.shape[:2]
    if m > channel_limit(kb.target) or (w_s.size != 1 and w_s.size != m):
        return False
    geo = conv_geometry(kb, x, w.shape, y)
    if geo is None or y.size == 0:
        return False
    params = (x_s, x_zp, w_s, y_s, y_zp, bias)
    if group == 1 and cg * geo.kh * geo.kw <= MAX_K:
        dot = Dot4(kb)
        if geo.c == 1 and dot.centred and emit_paired_depthwise_qconv(kb, geo, x, params, y, dot):
            return True  # one input channel: pairs of taps fill the int16 pairs, not channels
        if channel_lanes_pay(geo, dot):
            emit_channel_dot_conv(kb, geo, x, params, y, dot)
            return True
        return emit_dot_conv(kb, geo, x, params, y, dot)
    if group == geo.c == m and cg == 1:
        return emit_depthwise_qconv(kb, geo, x, params, y)
    return False
