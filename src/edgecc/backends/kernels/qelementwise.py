"""Integer elementwise kernels for int8 graphs (ops/qelementwise.py): edgecc.QLinearAdd, edgecc.QLinearMul,
edgecc.QLookup and edgecc.QLinearGlobalAveragePool.

Requantisation is fixed point with one shared shift S and one integer multiplier per input,

    y = (sum_k q_k * M_k + C) >> S          M_k = round(r_k * 2^S), C = -sum_k zp_k * M_k + y_zp * 2^S + 2^(S-1)

where r_k = in_scale_k / out_scale (Add: a and b; Mul: one input, the exact product (a - za) * (b - zb), with
r = a_scale * b_scale / y_scale; the pool: the sum of the map, r = x_scale / (count * y_scale)). Rounding is half
to even like the references (a remainder of exactly one half goes to the even result of rint before y_zp is
added). S is the largest shift for which the whole sum fits the accumulator (i32 for Add, i64 for Mul and the
pool): sum_k span_k * (|r_k| + 1/2) + 257 <= 2^(width-1) / 2^S, span_k bounding |q_k - zp_k| (255, 255^2,
255 * count); intermediate wrap-around is harmless (two's complement), the final sum is in range. This is
TFLite's idea (a left shift and one multiplier per input) with a single rounding: each M_k is off by at most half
a unit, so the result is off by at most sum_k span_k * 2^-(S+1) steps (about 2^-13 of a step for Add with r ~ 1,
where S ~ 21), plus the references' own float32 rounding: the two agree except within that distance of a
rounding tie, never by more than one step.

QLinearAdd computes in i32 lanes (vpmulld, mul), QLinearMul scales its product in i64, the pool sums bytes in
i32 and requantises each channel once in i64. QLookup y[i] = table[x[i] - min] shuffles whole registers of bytes
through the 256-byte table where the target can (AVX-512 VBMI vpermi2b, AArch64 tbl: TableShuffle), else loops
over bytes (the table stays in L1).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, I8, I32, I64, Buffer, KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.conv import intrinsic
from edgecc.backends.kernels.elementwise import _coalesce
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from edgecc.ops.fused import activation_params
from edgecc.ops.quant import quant_range, quantize


def _scalar(kb: KernelBuilder, index: int) -> float | int:
    value = kb.const_input(index)
    if value is None:
        raise EdgeccError(f"{kb.node.op} needs constant scales and zero points (input {index} is computed)",
                          where=kb.node.label, hint="lower-qdq only creates it from constant QDQ parameters")
    return np.asarray(value).reshape(()).item()


def fixed_point(reals: list[float], spans: list[int], zero_points: list[int], y_zp: int,
                width: int) -> tuple[int, list[int], int]:
    """(S, [M_k], C) for y = (sum_k q_k * M_k + C) >> S ~ sum_k r_k * (q_k - zp_k) + y_zp + 1/2 in a `width`-bit
    accumulator, where |q_k - zp_k| <= spans[k] (see the module docstring). Raises when no shift >= 1 fits (an
    output scale about 2^20 times finer than the inputs', where everything saturates anyway)."""
    limit = 2 ** (width - 1) - 1
    need = sum(abs(r) * s + 0.5 * s for r, s in zip(reals, spans)) + 257  # 0.5 * span: M_k's rounding
    shift = min(width - 2, math.floor(math.log2(limit / need)))
    # multipliers below 2^31 even in i64: a 32 x 32 -> 64-bit product (vpmuldq, smull) instead of a full
    # 64-bit multiply, and still 2^-31 relative precision
    shift = min(shift, math.floor(math.log2((2 ** 31 - 1) / (max(abs(r) for r in reals) + 2 ** -40))) - 1)
    if shift < 1:
        raise EdgeccError(f"requantisation multipliers {reals} are too large for a {width}-bit fixed-point kernel",
                          hint="the output scale is far finer than the inputs'; quantise with a wider output range")
    mults = [int(round(r * 2.0 ** shift)) for r in reals]
    offset = -sum(z * m for z, m in zip(zero_points, mults)) + (y_zp << shift) + (1 << (shift - 1))
    return shift, mults, offset


def round_shift(kb: KernelBuilder, acc: ir.Value, shift: int, y_zp: int) -> ir.Value:
    """floor(acc / 2^shift), where acc already holds the + 1/2: round half up, then ties (remainder exactly 0)
    moved to the even value of (result - y_zp), as the references round before adding y_zp."""
    b = kb.b
    ty = acc.type
    q = b.ashr(acc, ir.Constant(ty, shift))
    tie = b.icmp_signed("==", b.and_(acc, ir.Constant(ty, (1 << shift) - 1)), ir.Constant(ty, 0))
    odd = b.trunc(b.and_(b.xor(q, ir.Constant(ty, y_zp)), ir.Constant(ty, 1)), ir.IntType(1))
    return b.sub(q, b.zext(b.and_(tie, odd), ty))


def clamp_store(kb: KernelBuilder, out: Buffer, flat: ir.Value, q: ir.Value, lo: int, hi: int) -> None:
    """Store an integer clamped to [lo, hi] (within the output type's range) in the output's 8-bit type."""
    b = kb.b
    ty = q.type
    q = b.select(b.icmp_signed("<", q, ir.Constant(ty, lo)), ir.Constant(ty, lo), q)
    q = b.select(b.icmp_signed(">", q, ir.Constant(ty, hi)), ir.Constant(ty, hi), q)
    kb.store(out, flat, b.trunc(q, COMPUTE[out.dtype]))


def widen(kb: KernelBuilder, dtype: DType, v: ir.Value, ty: ir.Type) -> ir.Value:
    return kb.b.zext(v, ty) if dtype is DType.uint8 else kb.b.sext(v, ty)


def output_bounds(kb: KernelBuilder, dtype: DType, scale: float, zp: int) -> tuple[int, int]:
    """The integer range of the output: the type's, narrowed by a folded Relu/Clip to [Q(lo), Q(hi)] (exact, as
    Q is monotone)."""
    qmin, qmax = quant_range(dtype.numpy)
    act = kb.attrs.get("activation", "")
    if not act:
        return qmin, qmax
    params = {"min": 0.0, "max": np.inf} if act == "Relu" else activation_params(act, kb.attrs["activation_params"])
    lo, hi = (int(quantize(np.float32(params[k]), np.float32(scale), zp, dtype.numpy)) for k in ("min", "max"))
    return max(qmin, lo), min(qmax, hi)


@lowering("QLinearAdd", "QLinearMul")
def lower_qlinear_binary(kb: KernelBuilder) -> None:
    """Over the broadcast output (one flat loop per merged run of dims): Add y = clamp((a * Ma + b * Mb + C) >> S)
    in i32; Mul y = clamp(((a - za) * (b - zb) * M + C) >> S), the exact product (|p| <= 255^2) scaled in i64."""
    a, b_in, out = kb.inputs[0], kb.inputs[3], kb.outputs[0]
    a_s, a_zp, b_s, b_zp, y_s, y_zp = (_scalar(kb, i) for i in (1, 2, 4, 5, 6, 7))
    y_zp = int(y_zp)
    if kb.node.op == "QLinearAdd":
        reals = [float(np.float64(a_s) / np.float64(y_s)), float(np.float64(b_s) / np.float64(y_s))]
        shift, mults, offset = fixed_point(reals, [255, 255], [int(a_zp), int(b_zp)], y_zp, 32)
    else:
        real = float(np.float64(a_s) * np.float64(b_s) / np.float64(y_s))
        shift, mults, offset = fixed_point([real], [255 * 255], [0], y_zp, 64)
    lo, hi = output_bounds(kb, out.dtype, y_s, y_zp)
    if out.size == 0:
        return
    strides = [broadcast_strides(buf.shape, out.shape) for buf in (a, b_in)] + [strides_of(out.shape)]
    shape, strides = _coalesce(list(out.shape), strides)
    b = kb.b
    with kb.loop_nest(shape) as idx:
        va = widen(kb, a.dtype, kb.load(a, kb.linear(idx, strides[0])), I32)
        vb = widen(kb, b_in.dtype, kb.load(b_in, kb.linear(idx, strides[1])), I32)
        if kb.node.op == "QLinearAdd":
            ma, mb = mults
            acc = b.add(b.add(b.mul(va, ir.Constant(I32, ma)), b.mul(vb, ir.Constant(I32, mb))),
                        ir.Constant(I32, offset))
        else:
            product = b.mul(b.sub(va, ir.Constant(I32, int(a_zp))), b.sub(vb, ir.Constant(I32, int(b_zp))))
            acc = b.add(b.mul(b.sext(product, I64), ir.Constant(I64, mults[0])), ir.Constant(I64, offset))
        clamp_store(kb, out, kb.linear(idx, strides[2]), round_shift(kb, acc, shift, y_zp), lo, hi)


class TableShuffle:
    """256-byte table lookups by register shuffles, W bytes per step: AVX-512 VBMI (vpermi2b picks from 128 bytes by
    the low 7 index bits: two of them, then a blend on the top bit; 64 bytes in about 4 instructions) or AArch64
    NEON (tbl over 4 registers gives 0 for an index beyond 63: four of them on index - 0, 64, 128, 192, OR-ed;
    16 bytes in 11 instructions). `kind` is None where neither exists (the scalar byte loop then)."""

    def __init__(self, kb: KernelBuilder):
        self.kb = kb
        features = set(kb.target.features.split(","))
        triple = kb.target.triple
        if triple.startswith("x86_64") and "+avx512vbmi" in features and kb.target.vector_bits >= 512:
            self.kind, self.width = "vbmi", 64
        elif triple.startswith(("aarch64", "arm64")):
            self.kind, self.width = "tbl", 16
        else:
            self.kind, self.width = None, 1
        self.ty = ir.VectorType(I8, self.width)
        self.parts: list[ir.Value] = []

    def _load(self, ptr: ir.Value, offset: ir.Value) -> ir.Value:
        load = self.kb.b.load(self.kb.b.gep(ptr, [offset], inbounds=True, source_etype=I8), typ=self.ty)
        load.align = 1
        return load

    def _splat(self, value: int) -> ir.Constant:
        return ir.Constant(self.ty, [ir.Constant(I8, value & 0xFF)] * self.width)

    def load_table(self, table: ir.Value) -> None:
        self.parts = [self._load(table, self.kb.i64(k)) for k in range(0, 256, self.width)]

    def lookup(self, index: ir.Value) -> ir.Value:
        """table[index] for a vector of unsigned byte indices."""
        b = self.kb.b
        if self.kind == "vbmi":
            permute = intrinsic(self.kb, "llvm.x86.avx512.vpermi2var.qi.512", self.ty, [self.ty] * 3)
            low = b.call(permute, [self.parts[0], index, self.parts[1]])
            high = b.call(permute, [self.parts[2], index, self.parts[3]])
            return b.select(b.icmp_signed("<", index, self._splat(0)), high, low)
        tbl4 = intrinsic(self.kb, "llvm.aarch64.neon.tbl4.v16i8", self.ty, [self.ty] * 5)
        result = None
        for k in range(4):
            shifted = b.sub(index, self._splat(64 * k)) if k else index
            part = b.call(tbl4, [*self.parts[4 * k: 4 * k + 4], shifted])
            result = part if result is None else b.or_(result, part)
        return result

    def run(self, x: Buffer, out: Buffer, flip: bool) -> int:
        """out[i] = table[x[i] (^ 0x80 when flip)] for whole vectors; returns how many elements were done."""
        steps = out.size // self.width
        b = self.kb.b
        if not steps:
            return 0
        with self.kb.loop(steps, "v") as v:
            offset = b.mul(v, self.kb.i64(self.width))
            index = self._load(x.ptr, offset)
            if flip:
                index = b.xor(index, self._splat(0x80))
            store = b.store(self.lookup(index), b.gep(out.ptr, [offset], inbounds=True, source_etype=I8))
            store.align = 1
        return steps * self.width


@lowering("QLookup")
def lower_qlookup(kb: KernelBuilder) -> None:
    """y[i] = table[x[i] - min] from the 256-byte table (read through its pointer, so lookups of one shape share
    the kernel): by register shuffles where the target has them (TableShuffle), the rest a byte loop over the
    table in L1."""
    x, table, out = kb.inputs[0], kb.inputs[1], kb.outputs[0]
    flip = x.dtype is DType.int8  # -128..127 -> 0..255
    shuffle = TableShuffle(kb)
    done = 0
    if shuffle.kind is not None and out.size >= shuffle.width:
        shuffle.load_table(table.ptr)
        done = shuffle.run(x, out, flip)
    b = kb.b
    with kb.loop(out.size, "i", start=done) as i:
        v = kb.load(x, i)
        if flip:
            v = b.xor(v, ir.Constant(I8, 0x80))
        kb.store(out, i, kb.load(table, b.zext(v, I64)))


@lowering("QLinearGlobalAveragePool")
def lower_qlinear_global_average_pool(kb: KernelBuilder) -> None:
    """Per (n, c): the exact i32 sum of the map's integers (count * 255 < 2^31 for maps below 2^23 positions),
    then y = clamp((sum * M + C) >> S) in i64 with C folding x_zp * count, y_zp and the rounding half."""
    x, out = kb.inputs[0], kb.outputs[0]
    x_s, x_zp, y_s, y_zp = (_scalar(kb, i) for i in (1, 2, 3, 4))
    count = int(np.prod(x.shape[2:], dtype=np.int64))
    if count == 0 or count * 255 >= 2 ** 31:
        raise EdgeccError(f"QLinearGlobalAveragePool over {count} positions has no kernel",
                          where=kb.node.label, hint="maps of 1 to 2^23 positions are supported")
    real = float(np.float64(x_s) / (np.float64(y_s) * count))
    shift, (mult,), offset = fixed_point([real], [255 * count], [int(x_zp) * count], int(y_zp), 64)
    lo, hi = quant_range(out.dtype.numpy)
    b = kb.b
    slot = b.alloca(I32, name="sum")
    with kb.loop(int(np.prod(x.shape[:2], dtype=np.int64)), "nc") as nc:
        base = b.mul(nc, kb.i64(count))
        b.store(ir.Constant(I32, 0), slot)
        with kb.loop(count, "p") as p:
            v = widen(kb, x.dtype, kb.load(x, b.add(base, p)), I32)
            b.store(b.add(b.load(slot, typ=I32), v), slot)
        total = b.sext(b.load(slot, typ=I32), I64)
        acc = b.add(b.mul(total, ir.Constant(I64, mult)), ir.Constant(I64, offset))
        clamp_store(kb, out, nc, round_shift(kb, acc, shift, int(y_zp)), lo, hi)
