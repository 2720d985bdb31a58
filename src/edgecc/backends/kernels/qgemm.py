"""edgecc.QGemm: int8 matrix product with an int32 bias, requantised (ops/qgemm.py).

Fast path (hosted target, constant int8 B with zero points all 0, K <= qconv.MAX_K, N <= qconv.MAX_CHANNELS):
output columns in the vector lanes. B is packed at compile time into panels of NB = NV * L columns,
[K/4][NB][4 bytes] each (zero-padded in K and N), after the N column sums; a register tile is MR rows of A x NV
column vectors: per 4 values of K it loads NV weight vectors, broadcasts one 32-bit word of each A row and does
MR * NV dot4 steps (qconv.Dot4: vpdpbusd, sdot, pmaddwd over int16 pairs, or the widened generic form). Rows of one (GEMV, a Linear layer
at batch 1) get the widest panels. The correction for A's zero point and the fixed-point requantisation are
qconv's (QuantParams), so results are within 1 of the reference (exact but near ties).

Otherwise (runtime B, nonzero b_zero_point) the generic integer matmul of quant.py with the reference's exact
float requantisation; a runtime B with transB=1 has no kernel (the quantisation passes only make constant ones).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, I8, I16, I32, Buffer, KernelBuilder
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.conv import Accumulators, add_i64, for_blocks, mul_i64
from edgecc.backends.kernels.qconv import MAX_K, ActivationForm, Dot4, QuantParams, channel_limit, fast_kernels_run, \
    splat, store_to, vec_ty, weight_sums
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType


def pack_qgemm_b(b: np.ndarray, trans_b: int, nb: int, per_word: int = 4) -> np.ndarray:
    """B ([K, N], or [N, K] with transB) -> int32: N column sums padded to whole panels, then the panels
    [N/nb][K/per_word][nb][word] (a word: 4 int8 values of K, or 2 sign-extended int16 ones for pmaddwd)."""
    bt = b if trans_b else b.T  # [N, K]
    n, k = bt.shape
    panels, k4 = -(-n // nb), -(-k // per_word)
    padded = np.zeros((panels * nb, k4 * per_word), np.int8 if per_word == 4 else np.int16)
    padded[:n, :k] = bt
    words = padded.reshape(panels, nb, k4, per_word).transpose(0, 2, 1, 3)
    sums = np.zeros(panels * nb, np.int32)
    sums[:n] = weight_sums(bt)
    return np.concatenate([sums, np.ascontiguousarray(words).view(np.int32).reshape(-1)])


def emit_fast_qgemm(kb: KernelBuilder) -> bool:
    a, a_s, a_zp, b_, b_s, b_zp, y_s, y_zp = kb.inputs[:8]
    bias = kb.optional_input(8)
    out = kb.outputs[0]
    trans_b = int(kb.attrs["transB"])
    bv = kb.node.input(3)
    if not fast_kernels_run(kb.target) or not bv.is_const or b_.dtype is not DType.int8:
        return False
    zp = kb.const_input(5)
    if zp is None or np.any(zp != 0):
        return False
    k, n = (b_.shape[1], b_.shape[0]) if trans_b else b_.shape
    if k > MAX_K or n > channel_limit(kb.target) or out.size == 0:  # (stack: 32 bytes of parameters a column)
        return False
    rows = int(np.prod(a.shape[:-1]))
    dot = Dot4(kb)
    L = dot.lanes
    budget = dot.accumulators()
    nv = max(1, min(-(-n // L), budget if rows == 1 else 4))
    mr = max(1, min(rows, budget // nv))
    nb = nv * L
    g = dot.per_word
    panels, k4 = -(-n // nb), k // g
    act_signed = a.dtype is DType.int8
    packed = kb.packed_input(3, lambda w: pack_qgemm_b(w, trans_b, nb, g))
    form = ActivationForm(kb, dot, a, (a_s, a_zp, b_s, y_s, y_zp, bias))
    flip = form.flip
    params = QuantParams(kb, n, panels * nb, *form.params, packed, form.delta)
    b = kb.b
    accs = Accumulators(kb)
    acc_ty = vec_ty(I32, L)
    bytes_ty = vec_ty(I8, 4 * L)
    sign = act_signed if dot.signed is None else dot.signed
    mask = ir.Constant(I32, flip * 0x01010101)

    def a_word(row, kk, tail: int = 0) -> ir.Value:
        """The 4 bytes A[row, kk..kk+3] (only `tail` of them when K ends inside the word) as an i32, flipped; or
        in the pmaddwd form the 2 values A[row, kk..kk+1] as int16 less the zero point (0 past K)."""
        base = add_i64(kb, mul_i64(kb, row, k), kk)
        if form.centre is not None:
            pair = ir.Constant(vec_ty(I16, 2), [ir.Constant(I16, 0)] * 2)
            for j in range(tail or 2):
                value = b.sub((b.sext if act_signed else b.zext)(kb.load(a, add_i64(kb, base, j)), I16), form.centre)
                pair = b.insert_element(pair, value, ir.Constant(I32, j))
            return b.bitcast(pair, I32)
        if not tail:
            word = b.load(b.bitcast(kb.element_ptr(a, base), I32.as_pointer()), typ=I32, align=1)
        else:
            word = ir.Constant(I32, 0)
            for j in range(tail):
                byte = b.zext(kb.load(a, add_i64(kb, base, j)), I32)
                word = b.or_(word, b.shl(byte, ir.Constant(I32, 8 * j)) if j else byte)
        return b.xor(word, mask) if flip else word

    def tile(row0, count: int, col0, width: int) -> None:
        """Rows row0..row0+count-1, columns col0..col0+width-1 (a panel's valid columns)."""
        nvec = -(-width // L)
        slots = [(r, v) for r in range(count) for v in range(nvec)]
        starts = [params.initial(add_i64(kb, col0, v * L), L, L) for v in range(nvec)]
        for r, v in slots:
            accs.set(("g", r, v), starts[v])
        w_panel = add_i64(kb, mul_i64(kb, col0, -(-k // g)), panels * nb)  # panel col0 / nb

        def step(kk, wk, tail: int = 0) -> None:
            values = {key: accs.get(("g", *key), acc_ty) for key in slots}
            weights = [b.load(b.bitcast(kb.element_ptr(packed, add_i64(kb, wk, v * L)), acc_ty.as_pointer()),
                              typ=acc_ty, align=4) for v in range(nvec)]
            for r in range(count):
                xv = b.bitcast(splat(b, a_word(add_i64(kb, row0, r), kk, tail), L), bytes_ty)
                for v in range(nvec):
                    values[r, v] = dot.dot(values[r, v], xv, weights[v], sign)
            for key in slots:
                accs.set(("g", *key), values[key])

        if k4:
            with kb.loop(k4, "k4") as kq:
                step(mul_i64(kb, kq, g), add_i64(kb, w_panel, mul_i64(kb, kq, nb)))
        if k % g:
            step(k4 * g, add_i64(kb, w_panel, k4 * nb), k % g)
        def store(k: int, q: ir.Value) -> None:
            r, v = slots[k]
            flat = add_i64(kb, mul_i64(kb, add_i64(kb, row0, r), n), col0, v * L)
            valid = min(L, width - v * L)
            if valid == L:
                store_to(kb, q, kb.element_ptr(out, flat))
            else:
                for j in range(valid):
                    kb.store(out, add_i64(kb, flat, j), b.extract_element(q, ir.Constant(I32, j)))

        params.requantise([(accs.get(("g", r, v), acc_ty), add_i64(kb, col0, v * L), L) for r, v in slots], store)

    for_blocks(kb, rows, mr, lambda row0, count: for_blocks(
        kb, n, nb, lambda col0, width: tile(row0, count, col0, width), "nb"), "mb")
    return True


def requantise_exact(kb: KernelBuilder, value: ir.Value, col: ir.Value) -> ir.Value:
    """The QGemm output for column `col` of the i32 sum `value` (bias included) as the reference computes it:
    clamp(rint(value * (a_scale * b_scale[col] / y_scale)) + y_zp), in the output's compute type. Shared by the
    generic kernel and the int8 sparse one (qsparse.py) on targets without the fixed-point form."""
    from edgecc.backends.kernels.quant import _NP_INFO, rint_times_f32

    a_s, b_s, y_s, y_zp = kb.inputs[1], kb.inputs[4], kb.inputs[6], kb.inputs[7]
    out = kb.outputs[0]
    lo, hi = _NP_INFO[out.dtype]
    b = kb.b
    mult = b.fdiv(b.fmul(kb.load(a_s, kb.i64(0)), kb.load(b_s, col if b_s.size > 1 else kb.i64(0))),
                  kb.load(y_s, kb.i64(0)))
    q = b.add(rint_times_f32(kb, value, mult), kb.convert(y_zp.dtype, DType.int64, kb.load(y_zp, kb.i64(0))))
    q = b.select(b.icmp_signed("<", q, kb.i64(lo)), kb.i64(lo), q)
    q = b.select(b.icmp_signed(">", q, kb.i64(hi)), kb.i64(hi), q)
    return b.trunc(q, COMPUTE[out.dtype])


def emit_generic_qgemm(kb: KernelBuilder) -> None:
    """(A - a_zp) @ (B - b_zp) + C by quant.emit_int_matmul, requantised exactly as the reference."""
    from edgecc.backends.kernels.quant import at, emit_int_matmul

    a, a_s, a_zp, b_, b_s, b_zp, y_s, y_zp = kb.inputs[:8]
    bias = kb.optional_input(8)
    out = kb.outputs[0]
    if kb.attrs["transB"]:
        packed = kb.packed_input(3, lambda w: np.ascontiguousarray(w.T))
        if packed is None:
            raise EdgeccError("edgecc.QGemm with transB=1 and a runtime B has no native kernel",
                              hint="make B a constant (the quantisation passes do) or transpose it into [K, N]")
        b_ = packed
    n = b_.shape[1]
    b = kb.b

    def epilogue(_bi, m, n0, length, acc):
        row = b.mul(m, kb.i64(n))
        with kb.loop(length, "e") as j:
            col = b.add(n0, j)
            value = b.load(at(kb, acc, I32, j), typ=I32)
            if bias is not None:
                value = b.add(value, kb.load(bias, col))
            kb.store(out, b.add(row, col), requantise_exact(kb, value, col))

    rows = Buffer(a.ptr, dataclasses.replace(a.type, shape=(int(np.prod(a.shape[:-1])), a.shape[-1])))
    emit_int_matmul(kb, rows, a_zp, b_, b_zp, epilogue)


@lowering("QGemm")
def lower_qgemm(kb: KernelBuilder) -> None:
    from edgecc.backends.kernels.qsparse import emit_sparse_qgemm  # B encoded by encode-sparsity

    if not emit_sparse_qgemm(kb) and not emit_fast_qgemm(kb):
        emit_generic_qgemm(kb)
