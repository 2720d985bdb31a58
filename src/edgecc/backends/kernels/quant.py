"""Quantisation kernels: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, the integer matmuls
(MatMulInteger, QLinearMatMul) and the integer convolutions (ConvInteger, QLinearConv); plus the small helpers
the gather and resize kernels share (exact round-half-to-even without libm, stack scratch, keyed constants).

Exactness: integer products and sums are accumulated in i32 (wrapping, which is what the references give
after their exact sum is wrapped to int32). Divisions, products and roundings follow the references' float
precision step by step (float16 steps are computed in f32 and rounded to f16, which is exact for one
+, *, / of f16 operands), without fast-math flags, so results are bit-exact. Rounding to nearest-even uses the
2^p trick ((|v| + 2^p) - 2^p with the sign copied back), which needs no libm call.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, F16, F32, F64, I32, I64, Buffer, KernelBuilder, broadcast_strides, \
    strides_of
from edgecc.backends.kernels import lowering
from edgecc.errors import EdgeccError, ShapeError
from edgecc.ir.dtypes import DType
from edgecc.ops.registry import Call

ACC_BLOCK = 256
"""Length of the i32 accumulator rows kept on the stack (1 KiB) by the integer matmul and convolution."""

_NP_INFO = {DType.int8: (-128, 127), DType.uint8: (0, 255), DType.int16: (-32768, 32767)}


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def node_call(kb: KernelBuilder) -> Call:
    """The node as an inference Call (input types, constant values, complete attributes), for the ops' helpers."""
    node = kb.node
    types = [None if v is None else v.type for v in node.inputs]
    values = [kb.const_input(i) for i in range(len(node.inputs))]
    return Call(node.op, types, dict(kb.attrs), len(node.outputs), values=values, where=node.label)


def entry_alloca(kb: KernelBuilder, ty: ir.Type, count: int = 1, name: str = "scratch") -> ir.Value:
    """Stack scratch allocated once in the kernel's entry block (never inside a loop)."""
    entry = kb.function.entry_basic_block
    if kb.b.block is entry:  # still emitting the entry block: a second builder would disturb kb.b's position
        builder = kb.b
    else:
        builder = ir.IRBuilder(entry)
        builder.position_at_start(entry)
    slot = builder.alloca(ty, size=ir.Constant(I32, count) if count != 1 else None, name=name)
    slot.align = 16
    return slot


def at(kb: KernelBuilder, ptr: ir.Value, ty: ir.Type, index) -> ir.Value:
    """Address of element `index` of type `ty` at `ptr`."""
    index = kb.i64(index) if isinstance(index, int) else index
    return kb.b.gep(ptr, [index], inbounds=True, source_etype=ty)


def fconst(ty: ir.Type, value: float) -> ir.Constant:
    return ir.Constant(ty, float(value))


def _intrinsic(kb: KernelBuilder, name: str, ty: ir.Type, arity: int):
    return kb.module.declare_intrinsic(name, [ty], ir.FunctionType(ty, [ty] * arity))


def fabs(kb: KernelBuilder, v: ir.Value) -> ir.Value:
    return kb.b.call(_intrinsic(kb, "llvm.fabs", v.type, 1), [v])


def round_half_even(kb: KernelBuilder, v: ir.Value) -> ir.Value:
    """rint(v) for an f32 or f64 value (NumPy's np.rint / np.round): exact, no libm. NaN and inf pass through."""
    b = kb.b
    two_p = fconst(v.type, 2.0 ** (52 if v.type == F64 else 23))
    a = fabs(kb, v)
    r = b.fsub(b.fadd(a, two_p), two_p)  # no fast-math: the sum rounds to an integer, nearest-even
    r = b.select(b.fcmp_ordered("<", a, two_p), r, a)  # |v| >= 2^p is already an integer (or inf/NaN)
    return b.call(_intrinsic(kb, "llvm.copysign", v.type, 2), [r, v])


def nan_to_zero(kb: KernelBuilder, v: ir.Value) -> ir.Value:
    return kb.b.select(kb.b.fcmp_ordered("ord", v, v), v, fconst(v.type, 0.0))


def clamp_float(kb: KernelBuilder, v: ir.Value, lo: float, hi: float) -> ir.Value:
    """min(max(v, lo), hi) for a non-NaN float."""
    b = kb.b
    v = b.select(b.fcmp_ordered("<", v, fconst(v.type, lo)), fconst(v.type, lo), v)
    return b.select(b.fcmp_ordered(">", v, fconst(v.type, hi)), fconst(v.type, hi), v)


def to_float(kb: KernelBuilder, dtype: DType, v: ir.Value, ty: ir.Type) -> ir.Value:
    """A compute-type value of `dtype` as float type `ty` (f32 or f64); integers convert exactly or rounded once."""
    b = kb.b
    if dtype.is_float:
        return v if ty == F32 else b.fpext(v, ty)
    if dtype is DType.bool:
        return b.uitofp(v, ty)
    return b.uitofp(v, ty) if dtype is DType.uint8 else b.sitofp(v, ty)


def round_f16(kb: KernelBuilder, v: ir.Value) -> ir.Value:
    """An f32 value rounded to float16 precision (kept in f32): one float16 operation's result."""
    return kb.b.fpext(kb.b.fptrunc(v, F16), F32)


def saturate_store(kb: KernelBuilder, out: Buffer, flat: ir.Value, q: ir.Value) -> None:
    """Store an integer-valued float (already rounded), saturated to the output integer type's range."""
    lo, hi = _NP_INFO[out.dtype]
    q = clamp_float(kb, nan_to_zero(kb, q), lo, hi)
    kb.store(out, flat, kb.b.trunc(kb.b.fptosi(q, I32), COMPUTE[out.dtype]) if out.dtype is not DType.int32
             else kb.b.fptosi(q, I32))


def _rne_shift_right(kb: KernelBuilder, p: ir.Value, s: ir.Value) -> ir.Value:
    """round_half_even(p / 2^s) for i64 p and 1 <= s <= 62."""
    b = kb.b
    q = b.ashr(p, s)  # floor
    r = b.sub(p, b.shl(q, s))  # in [0, 2^s)
    half = b.shl(kb.i64(1), b.sub(s, kb.i64(1)))
    odd = b.icmp_unsigned("!=", b.and_(q, kb.i64(1)), kb.i64(0))
    up = b.or_(b.icmp_signed(">", r, half), b.and_(b.icmp_signed("==", r, half), odd))
    return b.add(q, b.zext(up, I64))


def rint_times_f32(kb: KernelBuilder, acc: ir.Value, mult: ir.Value) -> ir.Value:
    """np.rint(float64(acc) * float64(mult)) as an i64, for an i32 acc and a finite f32 mult, in integer
    arithmetic: mult = mant * 2^e, P = acc * mant is exact in i64 (< 2^55); P is rounded to 53 significant bits
    as the float64 product is, then scaled by 2^e with round-half-to-even. Results beyond +-2^40 saturate (the
    caller clamps to an 8/16-bit range)."""
    b = kb.b
    bits = b.bitcast(mult, I32)
    expo = b.and_(b.lshr(bits, ir.Constant(I32, 23)), ir.Constant(I32, 0xFF))
    frac = b.and_(bits, ir.Constant(I32, 0x7FFFFF))
    normal = b.icmp_unsigned("!=", expo, ir.Constant(I32, 0))
    mant = b.select(normal, b.or_(frac, ir.Constant(I32, 0x800000)), frac)
    e = b.sub(b.sext(b.select(normal, expo, ir.Constant(I32, 1)), I64), kb.i64(150))
    p = b.mul(b.sext(acc, I64), b.zext(mant, I64))
    p = b.select(b.icmp_signed("<", bits, ir.Constant(I32, 0)), b.neg(p), p)
    # float64 rounding of the product to 53 significant bits (|P| >= 2^53 needs |acc| >= 2^29)
    mag = b.select(b.icmp_signed("<", p, kb.i64(0)), b.neg(p), p)
    s0 = b.select(b.icmp_signed(">=", mag, kb.i64(1 << 54)), kb.i64(2), kb.i64(1))
    wide = b.shl(_rne_shift_right(kb, p, s0), s0)
    p = b.select(b.icmp_signed(">=", mag, kb.i64(1 << 53)), wide, p)
    # times 2^e, rounded half to even
    s = b.sub(kb.i64(0), e)
    right = _rne_shift_right(kb, p, b.select(b.icmp_signed(">", s, kb.i64(62)), kb.i64(62), s))
    limit = kb.i64(1 << 20)
    clamped = b.select(b.icmp_signed(">", p, limit), limit, b.select(b.icmp_signed("<", p, b.neg(limit)),
                                                                      b.neg(limit), p))
    left = b.shl(clamped, b.select(b.icmp_signed(">", e, kb.i64(20)), kb.i64(20), e))
    return b.select(b.icmp_signed(">", s, kb.i64(0)), right, left)


def widen_i32(kb: KernelBuilder, dtype: DType, v: ir.Value) -> ir.Value:
    return kb.convert(dtype, DType.int32, v)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def param_loop(kb: KernelBuilder, shape, param: Buffer | None, axis: int, block: int, body) -> None:
    """Calls body(flat, param_index) for every element of a tensor of `shape` with a per-tensor, per-axis or
    blocked scale/zero point (the layouts of ops.quant.expand_quant_param); param_index is None without one."""
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        return
    if param is None or param.size == 1:
        with kb.loop(size) as i:
            body(i, kb.i64(0))
        return
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    dim = int(shape[axis])
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    b = kb.b
    if not block:
        with kb.loop(outer, "o") as o, kb.loop(dim, "a") as a:
            row = b.add(b.mul(o, kb.i64(dim)), a)
            if inner == 1:
                body(row, a)
            else:
                with kb.loop(inner, "n") as n:
                    body(b.add(b.mul(row, kb.i64(inner)), n), a)
        return
    nblocks = int(param.shape[axis])
    with kb.loop(outer, "o") as o, kb.loop(nblocks, "blk") as blk:
        start = b.mul(blk, kb.i64(block))
        stop = b.add(start, kb.i64(block))
        stop = b.select(b.icmp_signed("<", stop, kb.i64(dim)), stop, kb.i64(dim))
        pidx = b.add(b.mul(o, kb.i64(nblocks)), blk)
        pidx = b.mul(pidx, kb.i64(inner))
        with kb.loop(stop, "a", start=start) as a:
            row = b.add(b.mul(o, kb.i64(dim)), a)
            if inner == 1:
                body(row, pidx)
            else:
                with kb.loop(inner, "n") as n:
                    body(b.add(b.mul(row, kb.i64(inner)), n), b.add(pidx, n))


# ---------------------------------------------------------------------------------------------------------------
# QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear


@lowering("QuantizeLinear")
def lower_quantize(kb: KernelBuilder) -> None:
    """y = saturate(rint(x / scale) + zp): the division at NumPy's promoted precision of x and scale (or
    `precision`): float16 (computed in f32, rounded to f16), float32, or float64 when an int32 is involved."""
    x, scale = kb.inputs[0], kb.inputs[1]
    zp = kb.optional_input(2)
    out = kb.outputs[0]
    if out.dtype not in _NP_INFO:
        raise EdgeccError(f"QuantizeLinear to {out.dtype.name} has no native kernel")
    axis = _norm_axis(kb.attrs["axis"], x.type.rank) if x.type.rank else 0
    block = kb.attrs["block_size"]
    xd, sd = x.dtype, scale.dtype
    if kb.attrs.get("precision"):
        prec = DType.from_onnx(kb.attrs["precision"])
        division = prec.numpy
    else:
        prec = None
        division = np.result_type(xd.numpy, sd.numpy)
    ty = F64 if division == np.float64 else F32
    half = division == np.float16
    b = kb.b

    def operand(dtype: DType, v: ir.Value) -> ir.Value:
        if prec is not None and prec is not dtype:  # x.astype(prec), scale.astype(prec)
            if prec is DType.float16:
                return b.fpext(b.sitofp(v, F16) if not dtype.is_float else b.fptrunc(v, F16), F32)
            return to_float(kb, dtype, v, F32)
        return to_float(kb, dtype, v, ty)

    def body(flat, pidx):
        v = b.fdiv(operand(xd, kb.load(x, flat)), operand(sd, kb.load(scale, pidx)))
        if half:
            v = round_f16(kb, v)
        q = nan_to_zero(kb, round_half_even(kb, v))
        if zp is not None:
            q = b.fadd(q, to_float(kb, zp.dtype, kb.load(zp, pidx), ty))
        saturate_store(kb, out, flat, q)

    param_loop(kb, x.shape, scale, axis, block if scale.size != 1 else 0, body)


@lowering("DequantizeLinear")
def lower_dequantize(kb: KernelBuilder) -> None:
    """y = float32(x - zp) * float32(scale), given in the output type."""
    x, scale = kb.inputs[0], kb.inputs[1]
    zp = kb.optional_input(2)
    out = kb.outputs[0]
    axis = _norm_axis(kb.attrs["axis"], x.type.rank) if x.type.rank else 0
    wide = DType.int64 if x.dtype is DType.int32 and zp is not None else DType.int32
    b = kb.b

    def body(flat, pidx):
        dx = kb.convert(x.dtype, wide, kb.load(x, flat))
        if zp is not None:
            dx = b.sub(dx, kb.convert(zp.dtype, wide, kb.load(zp, pidx)))
        kb.store(out, flat, b.fmul(b.sitofp(dx, F32), kb.load(scale, pidx)))

    param_loop(kb, x.shape, scale, axis, kb.attrs["block_size"] if scale.size != 1 else 0, body)


@lowering("DynamicQuantizeLinear")
def lower_dynamic_quantize(kb: KernelBuilder) -> None:
    """Range pass (max(0, max x), min(0, min x); a NaN anywhere gives range 0 as the reference's Python max/min
    do), then scale, zero point and the quantisation, all in float32."""
    x = kb.inputs[0]
    y, y_scale, y_zp = (kb.outputs + [None, None])[:3]
    b = kb.b
    hi_slot, lo_slot = entry_alloca(kb, F32, name="hi"), entry_alloca(kb, F32, name="lo")
    nan_slot = entry_alloca(kb, ir.IntType(1), name="nan")
    b.store(fconst(F32, 0.0), hi_slot)
    b.store(fconst(F32, 0.0), lo_slot)
    b.store(ir.Constant(ir.IntType(1), 0), nan_slot)
    with kb.loop(x.size) as i:
        v = kb.load(x, i)
        hi, lo = b.load(hi_slot, typ=F32), b.load(lo_slot, typ=F32)
        b.store(b.select(b.fcmp_ordered(">", v, hi), v, hi), hi_slot)
        b.store(b.select(b.fcmp_ordered("<", v, lo), v, lo), lo_slot)
        b.store(b.or_(b.load(nan_slot, typ=ir.IntType(1)), b.fcmp_unordered("uno", v, v)), nan_slot)
    has_nan = b.load(nan_slot, typ=ir.IntType(1))
    hi = b.select(has_nan, fconst(F32, 0.0), b.load(hi_slot, typ=F32))
    lo = b.select(has_nan, fconst(F32, 0.0), b.load(lo_slot, typ=F32))
    scale = b.select(b.fcmp_ordered("==", hi, lo), fconst(F32, 1.0), b.fdiv(b.fsub(hi, lo), fconst(F32, 255.0)))
    zp = b.fsub(fconst(F32, 0.0), b.fdiv(lo, scale))
    # np.clip then np.rint; NaN (only from an infinite range) stays NaN through clip and becomes 0 in uint8
    zp = round_half_even(kb, clamp_float(kb, nan_to_zero(kb, zp), 0.0, 255.0))
    if y_scale is not None:
        kb.store(y_scale, kb.i64(0), scale)
    if y_zp is not None:
        kb.store(y_zp, kb.i64(0), b.trunc(b.fptoui(zp, I32), ir.IntType(8)))
    with kb.loop(x.size) as i:
        q = nan_to_zero(kb, round_half_even(kb, b.fdiv(kb.load(x, i), scale)))
        saturate_store(kb, y, i, b.fadd(q, zp))


# ---------------------------------------------------------------------------------------------------------------
# Integer matmuls


class _Strided:
    """A (possibly absent) tensor read at an index of the kernel's iteration space through fixed strides."""

    def __init__(self, buf: Buffer | None, strides):
        self.buf, self.strides = buf, list(strides)

    def flat(self, kb: KernelBuilder, indices) -> ir.Value:
        return kb.linear(indices, self.strides)


def _acc_blocks(kb: KernelBuilder, n: int, body) -> None:
    """Split 0..n into blocks of at most ACC_BLOCK: body(n0, length) with i64 values."""
    if n <= ACC_BLOCK:
        body(kb.i64(0), kb.i64(n))
        return
    b = kb.b
    with kb.loop(-(-n // ACC_BLOCK), "nb") as nb:
        n0 = b.mul(nb, kb.i64(ACC_BLOCK))
        rest = b.sub(kb.i64(n), n0)
        body(n0, b.select(b.icmp_signed("<", rest, kb.i64(ACC_BLOCK)), rest, kb.i64(ACC_BLOCK)))


def _matmul_layout(kb: KernelBuilder, a: Buffer, b_: Buffer):
    """(batch, M, K, N, A strides, B strides) over (batch..., M, K) / (batch..., K, N), numpy.matmul rules."""
    a2 = (1,) + a.shape if a.type.rank == 1 else a.shape
    b2 = b_.shape + (1,) if b_.type.rank == 1 else b_.shape
    batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    m, k, n = a2[-2], a2[-1], b2[-1]
    return batch, m, k, n, broadcast_strides(a2, batch + (m, k)), broadcast_strides(b2, batch + (k, n))


def _row_shape(p: Buffer, a_rank: int) -> tuple[int, ...]:
    """A per-row parameter's shape aligned with A: [M] (2-D A) is [M, 1]; scalars are ()."""
    if p.size == 1 and p.type.rank <= 1:
        return ()
    return (p.shape[0], 1) if p.type.rank == 1 else p.shape


def _col_shape(p: Buffer) -> tuple[int, ...]:
    if p.size == 1 and p.type.rank <= 1:
        return ()
    return (1, p.shape[0]) if p.type.rank == 1 else p.shape


def emit_int_matmul(kb: KernelBuilder, a: Buffer, a_zp: Buffer | None, b_: Buffer, b_zp: Buffer | None,
                    epilogue) -> None:
    """acc = (A - a_zp) @ (B - b_zp) in wrapping i32, numpy.matmul broadcasting; for each output row block
    calls epilogue(batch_indices, m, n0, length, acc_ptr) with acc_ptr[j] holding output column n0 + j."""
    batch, m_, k_, n_, a_str, b_str = _matmul_layout(kb, a, b_)
    full_a = batch + (m_, k_)
    full_b = batch + (k_, n_)
    azp = _Strided(a_zp, broadcast_strides(_row_shape(a_zp, a.type.rank), full_a)) if a_zp is not None else None
    bzp = _Strided(b_zp, broadcast_strides(_col_shape(b_zp), full_b)) if b_zp is not None else None
    acc = entry_alloca(kb, I32, min(n_, ACC_BLOCK) or 1, "acc")
    b = kb.b
    if m_ * n_ == 0 or not int(np.prod(batch, dtype=np.int64)):
        return
    with kb.loop_nest(batch, "bt") as bi, kb.loop(m_, "m") as m:
        def block(n0, length):
            with kb.loop(length, "z") as j:
                b.store(ir.Constant(I32, 0), at(kb, acc, I32, j))
            with kb.loop(k_, "k") as k:
                av = widen_i32(kb, a.dtype, kb.load(a, kb.linear(bi + [m, k], a_str)))
                if azp is not None:
                    av = b.sub(av, widen_i32(kb, a_zp.dtype, kb.load(a_zp, azp.flat(kb, bi + [m, k]))))
                row = kb.linear(bi + [k, n0], b_str)
                zrow = bzp.flat(kb, bi + [k, n0]) if bzp is not None else None
                with kb.loop(length, "n") as j:
                    bv = widen_i32(kb, b_.dtype, kb.load(b_, b.add(row, b.mul(j, kb.i64(b_str[-1])))
                                                         if b_str[-1] != 1 else b.add(row, j)))
                    if bzp is not None:
                        zflat = b.add(zrow, b.mul(j, kb.i64(bzp.strides[-1]))) if bzp.strides[-1] else zrow
                        bv = b.sub(bv, widen_i32(kb, b_zp.dtype, kb.load(b_zp, zflat)))
                    slot = at(kb, acc, I32, j)
                    b.store(b.add(b.load(slot, typ=I32), b.mul(av, bv)), slot)
            epilogue(bi, m, n0, length, acc)

        _acc_blocks(kb, n_, block)


@lowering("MatMulInteger")
def lower_matmul_integer(kb: KernelBuilder) -> None:
    a, b_ = kb.inputs[0], kb.inputs[1]
    a_zp = kb.optional_input(2)
    b_zp = kb.optional_input(3)
    out = kb.outputs[0]
    _, _, _, n_, _, _ = _matmul_layout(kb, a, b_)
    out_str = strides_of(_full_out_shape(a, b_))
    b = kb.b

    def epilogue(bi, m, n0, length, acc):
        base = kb.linear(bi + [m, n0], out_str)
        with kb.loop(length, "e") as j:
            kb.store(out, b.add(base, j), b.load(at(kb, acc, I32, j), typ=I32))

    emit_int_matmul(kb, a, a_zp, b_, b_zp, epilogue)


def _full_out_shape(a: Buffer, b_: Buffer) -> tuple[int, ...]:
    a2 = (1,) + a.shape if a.type.rank == 1 else a.shape
    b2 = b_.shape + (1,) if b_.type.rank == 1 else b_.shape
    return tuple(np.broadcast_shapes(a2[:-2], b2[:-2])) + (a2[-2], b2[-1])


def _out_param_strides(p: Buffer, a: Buffer, b_: Buffer, out: Buffer) -> list[int]:
    """Strides over the full (batch..., M, N) space of a parameter that broadcasts against the output."""
    shape = [1] * (out.type.rank - p.type.rank) + list(p.shape)
    if a.type.rank == 1:  # M was dropped from the output: put it back as a unit dim
        shape.insert(len(shape) - (0 if b_.type.rank == 1 else 1), 1)
    if b_.type.rank == 1:
        shape.append(1)
    return broadcast_strides(shape, _full_out_shape(a, b_))


@lowering("QLinearMatMul")
def lower_qlinear_matmul(kb: KernelBuilder) -> None:
    """acc as MatMulInteger, then y = saturate(rint(float64(acc) * multiplier) + y_zp) where multiplier =
    a_scale * b_scale / y_scale in the scales' own float type (ops.quant.requantize); the float64 product and
    rounding are reproduced exactly in integer arithmetic (rint_times_f32), so no double-precision FPU is needed."""
    a, a_s, a_zp, b_, b_s, b_zp, y_s, y_zp = kb.inputs
    out = kb.outputs[0]
    full = _full_out_shape(a, b_)
    # the reference broadcasts the row/column/output parameters against each other and the output
    row, col = _row_shape(a_s, a.type.rank), _col_shape(b_s)
    col_ref = () if col == () else b_s.shape  # ops.linalg._col_param keeps a 1-D b_scale 1-D
    try:
        shape = tuple(np.broadcast_shapes(row, col_ref, y_s.shape, y_zp.shape, out.shape))
    except ValueError:
        shape = None
    if shape != out.shape:
        raise EdgeccError(f"QLinearMatMul scales/zero points of shapes {list(a_s.shape)}, {list(b_s.shape)}, "
                          f"{list(y_s.shape)} do not broadcast to the output {list(out.shape)}",
                          hint="per-row/per-column scales need 2-D or batched operands; use scalars otherwise")
    s_a = broadcast_strides(row, full)
    s_b = broadcast_strides(col, full)
    s_y = _out_param_strides(y_s, a, b_, out)
    s_yz = _out_param_strides(y_zp, a, b_, out)
    out_str = strides_of(full)
    half = a_s.dtype is DType.float16
    lo, hi = _NP_INFO[out.dtype]
    b = kb.b

    def epilogue(bi, m, n0, length, acc):
        with kb.loop(length, "e") as j:
            n = b.add(n0, j)
            idx = bi + [m, n]
            mult = b.fmul(kb.load(a_s, kb.linear(idx, s_a)), kb.load(b_s, kb.linear(idx, s_b)))
            mult = round_f16(kb, mult) if half else mult
            mult = b.fdiv(mult, kb.load(y_s, kb.linear(idx, s_y)))
            mult = round_f16(kb, mult) if half else mult
            q = rint_times_f32(kb, b.load(at(kb, acc, I32, j), typ=I32), mult)
            q = b.add(q, kb.convert(y_zp.dtype, DType.int64, kb.load(y_zp, kb.linear(idx, s_yz))))
            q = b.select(b.icmp_signed("<", q, kb.i64(lo)), kb.i64(lo), q)
            q = b.select(b.icmp_signed(">", q, kb.i64(hi)), kb.i64(hi), q)
            kb.store(out, kb.linear(idx, out_str), b.trunc(q, COMPUTE[out.dtype]))

    emit_int_matmul(kb, a, a_zp, b_, b_zp, epilogue)


# ---------------------------------------------------------------------------------------------------------------
# Integer convolutions


def _conv_window(kb: KernelBuilder, x: Buffer, w: Buffer):
    from edgecc.ops.conv import kernel_from_weights, window_geometry

    call = node_call(kb)
    return window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))


def emit_int_conv(kb: KernelBuilder, x: Buffer, x_zp: Buffer | None, w: Buffer, w_zp: Buffer | None,
                  out: Buffer, epilogue) -> None:
    """acc = conv(x - x_zp, w - w_zp) in wrapping i32 (padding contributes nothing: it holds the zero point).
    Per output row block calls epilogue(m, out_flat_of_block_start, length, acc_ptr)."""
    if out.size == 0:
        return
    window = _conv_window(kb, x, w)
    group = kb.attrs["group"]
    n_batch, channels = x.shape[:2]
    m_out = w.shape[0]
    cg, mg = channels // group, m_out // group
    spatial, kernel, outs = x.shape[2:], window.kernel, window.out
    xs, ws, os_ = strides_of(x.shape), strides_of(w.shape), strides_of(out.shape)
    s_last, d_last, p_last = window.strides[-1], window.dilations[-1], window.pads_begin[-1]
    width, o_width = spatial[-1], outs[-1]
    # valid output range [lo, hi) of the last axis for each last-axis kernel tap
    lo_tab, hi_tab = [], []
    for t in range(kernel[-1]):
        start = t * d_last - p_last
        lo = 0 if start >= 0 else -(-(-start) // s_last)
        hi = 0 if width - 1 - start < 0 else (width - 1 - start) // s_last + 1
        lo, hi = min(max(lo, 0), o_width), min(max(hi, 0), o_width)
        lo_tab.append(lo)
        hi_tab.append(max(hi, lo))
    lo_ptr = kb.table(np.array(lo_tab, np.int64), "convlo")
    hi_ptr = kb.table(np.array(hi_tab, np.int64), "convhi")
    acc = entry_alloca(kb, I32, min(o_width, ACC_BLOCK), "acc")
    b = kb.b
    xzp = widen_i32(kb, x_zp.dtype, kb.load(x_zp, kb.i64(0))) if x_zp is not None else None

    def imin(p, q):
        return b.select(b.icmp_signed("<", p, q), p, q)

    def imax(p, q):
        return b.select(b.icmp_signed(">", p, q), p, q)

    with kb.loop(n_batch, "nb") as nb, kb.loop(group, "g") as g, kb.loop(mg, "ml") as ml:
        m = b.add(b.mul(g, kb.i64(mg)), ml)
        wzp = None
        if w_zp is not None:
            wzp = widen_i32(kb, w_zp.dtype, kb.load(w_zp, m if w_zp.size > 1 else kb.i64(0)))
        with kb.loop_nest(outs[:-1], "o") as orow:
            lead = [b.sub(b.mul(o, kb.i64(s)), kb.i64(p))
                    for o, s, p in zip(orow, window.strides[:-1], window.pads_begin[:-1])]
            out_row = kb.linear([nb, m] + orow, os_[:-1])

            def block(n0, length):
                n1 = b.add(n0, length)
                with kb.loop(length, "z") as j:
                    b.store(ir.Constant(I32, 0), at(kb, acc, I32, j))
                with kb.loop(cg, "c") as c:
                    xc = b.add(b.mul(nb, kb.i64(xs[0])), b.mul(b.add(b.mul(g, kb.i64(cg)), c), kb.i64(xs[1])))
                    wc = b.add(b.mul(m, kb.i64(ws[0])), b.mul(c, kb.i64(ws[1])))
                    with kb.loop_nest(kernel[:-1], "t") as taps:
                        ins = [b.add(base, b.mul(t, kb.i64(d))) for base, t, d in
                               zip(lead, taps, window.dilations[:-1])]
                        valid = ir.Constant(ir.IntType(1), 1)
                        for i, n in zip(ins, spatial[:-1]):
                            valid = b.and_(valid, b.icmp_unsigned("<", i, kb.i64(n)))
                        with b.if_then(valid):
                            xrow = kb.linear(ins, xs[2:-1], xc)
                            wrow = kb.linear(taps, ws[2:-1], wc)
                            with kb.loop(kernel[-1], "kw") as kw:
                                wv = widen_i32(kb, w.dtype, kb.load(w, b.add(wrow, kw)))
                                if wzp is not None:
                                    wv = b.sub(wv, wzp)
                                lo = imax(b.load(at(kb, lo_ptr, I64, kw), typ=I64), n0)
                                hi = imin(b.load(at(kb, hi_ptr, I64, kw), typ=I64), n1)
                                start = b.add(xrow, b.sub(b.mul(kw, kb.i64(d_last)), kb.i64(p_last)))
                                with kb.loop(hi, "ow", start=lo) as ow:
                                    xi = b.add(start, b.mul(ow, kb.i64(s_last)) if s_last != 1 else ow)
                                    xv = widen_i32(kb, x.dtype, kb.load(x, xi))
                                    if xzp is not None:
                                        xv = b.sub(xv, xzp)
                                    slot = at(kb, acc, I32, b.sub(ow, n0))
                                    b.store(b.add(b.load(slot, typ=I32), b.mul(xv, wv)), slot)
                epilogue(m, b.add(out_row, n0), length, acc)

            _acc_blocks(kb, o_width, block)


@lowering("ConvInteger")
def lower_conv_integer(kb: KernelBuilder) -> None:
    x, w = kb.inputs[0], kb.inputs[1]
    x_zp = kb.optional_input(2)
    w_zp = kb.optional_input(3)
    out = kb.outputs[0]
    b = kb.b

    def epilogue(m, base, length, acc):
        with kb.loop(length, "e") as j:
            kb.store(out, b.add(base, j), b.load(at(kb, acc, I32, j), typ=I32))

    emit_int_conv(kb, x, x_zp, w, w_zp, out, epilogue)


def qlinear_conv_scale(kb: KernelBuilder, m: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(m, float y_zp) of QLinearConv's output channel m: m = x_scale * w_scale / y_scale in float32."""
    x_s, w_s, y_s, y_zp = kb.inputs[1], kb.inputs[4], kb.inputs[6], kb.inputs[7]
    b = kb.b
    mult = b.fdiv(b.fmul(kb.load(x_s, kb.i64(0)), kb.load(w_s, m if w_s.size > 1 else kb.i64(0))),
                  kb.load(y_s, kb.i64(0)))
    return mult, to_float(kb, y_zp.dtype, kb.load(y_zp, kb.i64(0)), F32)


def qlinear_conv_output(kb: KernelBuilder, acc: ir.Value, scale: tuple[ir.Value, ir.Value]) -> ir.Value:
    """saturate(rint(float32(acc) * m) + y_zp) in the output's compute type, acc the i32 sum with the bias (shared
    with the int8 sparse kernel, qsparse.py)."""
    b, (mult, zp) = kb.b, scale
    lo, hi = _NP_INFO[kb.outputs[0].dtype]
    q = b.fadd(round_half_even(kb, b.fmul(b.sitofp(acc, F32), mult)), zp)
    q = clamp_float(kb, nan_to_zero(kb, q), lo, hi)
    return b.trunc(b.fptosi(q, I32), COMPUTE[kb.outputs[0].dtype])


@lowering("QLinearConv")
def lower_qlinear_conv(kb: KernelBuilder) -> None:
    """acc = conv(x - x_zp, w - w_zp) + B (i32), y = saturate(rint(float32(acc) * m) + float32(y_zp)) with
    m = x_scale * w_scale / y_scale in float32, per output channel when w_scale is. Constant symmetric int8
    weights (the quantised models' case) go to the fast kernels of qconv.py (fixed-point requantisation, within
    1 of this kernel); this one stays for every other case."""
    from edgecc.backends.kernels.qconv import emit_fast_qlinear_conv
    from edgecc.backends.kernels.qsparse import emit_sparse_qlinear_conv  # W encoded by encode-sparsity

    if emit_sparse_qlinear_conv(kb) or emit_fast_qlinear_conv(kb):
        return
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (kb.inputs + [None] * 9)[:8]
    bias = kb.optional_input(8)
    out = kb.outputs[0]
    b = kb.b

    def epilogue(m, base, length, acc):
        scale = qlinear_conv_scale(kb, m)
        bv = kb.load(bias, m) if bias is not None else None
        with kb.loop(length, "e") as j:
            a = b.load(at(kb, acc, I32, j), typ=I32)
            if bv is not None:
                a = b.add(a, bv)
            kb.store(out, b.add(base, j), qlinear_conv_output(kb, a, scale))

    if y_s is None or x_s is None or w_s is None:
        raise ShapeError("QLinearConv needs x_scale, w_scale and y_scale")
    emit_int_conv(kb, x, x_zp, w, w_zp, out, epilogue)
