"""Linear-algebra kernels: Gemm, MatMul (numpy semantics, batch broadcasting) and Einsum.

Gemm and MatMul share one matrix-product engine, `emit_matmul`, over strided A (M x K) and B (K x N) views:

- "row" form (B's rows contiguous, the common case): register tiles of MR output rows x NR columns, MR
  accumulator vectors of NR lanes; each k step loads one vector of B and broadcasts MR scalars of A.
- "dot" form (A's rows and B's columns both contiguous along k, e.g. Gemm with transB=1, or N = 1): NT dot
  products at once, vectors over k, one A load shared by NT columns, a horizontal reduction at the end.

Floats accumulate in float32 (float16 operands are widened), with llvm.fmuladd; integers wrap like NumPy.
Einsum is a generic loop nest: the output labels outside, the contracted labels inside, a running sum.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import F64, FAST, I32, Buffer, KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.epilogue import Epilogue
from edgecc.backends.kernels.sparse import emit_sparse_matmul, sparse_weights
from edgecc.backends.kernels.conv import (Accumulators, Vec, add_i64, choose_block, chunk_width, compute_bits,
                                          for_blocks, intrinsic, lanes, mul_i64, node_call, vector_registers,
                                          _type_suffix)
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from edgecc.ops.linalg import parse_einsum

TileSink = Callable[[ir.Value, ir.Value, int, ir.Value], None]
"""epilogue(i, j0, n, values): output row i (i64), columns j0..j0+n-1, `values` a vector of n compute lanes."""

_MATMUL_DTYPES = (DType.float32, DType.float16, DType.int32, DType.int64)


def emit_matmul(kb: KernelBuilder, dtype: DType, a: Buffer, a_off, sam: int, sak: int, bm: Buffer, b_off,
                sbk: int, sbn: int, m: int, n: int, k: int, epilogue: TileSink, b_panels: bool = False) -> None:
    """C[i, j] = sum_k A[a_off + i*sam + k*sak] * B[b_off + k*sbk + j*sbn] for i < m, j < n, handed to the
    epilogue in row segments. a_off / b_off are i64 values or ints. With `b_panels`, B is packed by
    `pack_panels` (sbk, sbn are then ignored)."""
    if m == 0 or n == 0:
        return
    if not b_panels and sak == 1 and sbk == 1 and (sbn != 1 or n == 1) and k > 1:
        _emit_dot_form(kb, dtype, a, a_off, sam, bm, b_off, sbn, m, n, k, epilogue)
    else:
        _emit_row_form(kb, dtype, a, a_off, sam, sak, bm, b_off, sbk, sbn, m, n, k, epilogue, b_panels)


def row_tile(kb: KernelBuilder, dtype: DType, m: int, n: int) -> tuple[int, int]:
    """(MR, NR): the row form's register tile of MR rows x NR columns. Few rows (matrix-vector products) get up to
    8 vectors of columns each, so enough independent accumulators hide the FMA latency."""
    vl = lanes(kb, compute_bits(kb, dtype))
    budget = vector_registers(kb) * 3 // 4
    nr = chunk_width(n, vl, 1 if m >= 4 else min(8, budget // max(m, 1)))
    return choose_block(m, min(16, budget // -(-nr // vl))), nr


def pack_panels(b: np.ndarray, nr: int) -> np.ndarray:
    """B [K, N] as column panels of nr (the last one narrower), each [K, width] row-major: the row form then
    streams B once, sequentially, per tile column."""
    return np.concatenate([np.ascontiguousarray(b[:, j:j + nr]).reshape(-1) for j in range(0, b.shape[1], nr)])


def _emit_row_form(kb, dtype, a, a_off, sam, sak, bm, b_off, sbk, sbn, m, n, k, epilogue, b_panels) -> None:
    vec = Vec(kb, dtype, native_half=True)
    mr, nr = row_tile(kb, dtype, m, n)
    vl = lanes(kb, compute_bits(kb, dtype))
    accs = Accumulators(kb)

    def tile(i0, rows: int, j0, width: int) -> None:
        # one accumulator per row and register-wide segment of columns (a single wide LLVM vector of several
        # registers would be legalised into 128-bit pieces)
        segments = [(s, min(vl, width - s)) for s in range(0, width, vl)]
        for r in range(rows):
            for s, w in segments:
                accs.set(("mm", r, s), vec.zero(w))
        # a panel holds columns j0..j0+width-1 as [k, width] after the j0 * k elements of the panels before it
        b_col = add_i64(kb, b_off, mul_i64(kb, j0, k if b_panels else sbn))
        step_k, step_n = (width, 1) if b_panels else (sbk, sbn)
        a_rows = [add_i64(kb, a_off, mul_i64(kb, add_i64(kb, i0, r), sam)) for r in range(rows)]
        with kb.loop(k, "k") as kk:
            b_row = add_i64(kb, b_col, mul_i64(kb, kk, step_k))
            bvs = [vec.load(bm, add_i64(kb, b_row, s * step_n), w, step_n) for s, w in segments]
            a_k = mul_i64(kb, kk, sak)
            for r in range(rows):
                av = vec.scalar(a, add_i64(kb, a_rows[r], a_k))
                for (s, w), bv in zip(segments, bvs):
                    accs.set(("mm", r, s), vec.fma(vec.splat(av, w), bv, accs.get(("mm", r, s), vec.ty(w))))
        for r in range(rows):
            for s, w in segments:
                epilogue(add_i64(kb, i0, r), add_i64(kb, j0, s), w, accs.get(("mm", r, s), vec.ty(w)))

    def row_block(i0, rows: int) -> None:
        for_blocks(kb, n, nr, lambda j0, cols: tile(i0, rows, j0, cols), "jt")

    for_blocks(kb, m, mr, row_block, "ib")


def _reduce(kb: KernelBuilder, vec: Vec, value: ir.Value) -> ir.Value:
    """Horizontal sum of a vector (llvm.vector.reduce.*, expanded inline)."""
    ty = value.type
    if vec.is_float:
        fn = intrinsic(kb, f"llvm.vector.reduce.fadd.{_type_suffix(ty)}", ty.element, [ty.element, ty])
        return kb.b.call(fn, [ir.Constant(ty.element, -0.0), value], fastmath=FAST)
    fn = intrinsic(kb, f"llvm.vector.reduce.add.{_type_suffix(ty)}", ty.element, [ty])
    return kb.b.call(fn, [value])


def _emit_dot_form(kb, dtype, a, a_off, sam, bm, b_off, sbn, m, n, k, epilogue) -> None:
    vec = Vec(kb, dtype, native_half=True)
    vl = lanes(kb, compute_bits(kb, dtype))
    width = min(vl, k)
    chunks, tail = divmod(k, width)
    nt = min(n, 4)
    accs = Accumulators(kb)

    def block(i, j0, cols: int) -> None:
        ty = vec.ty(width)
        for c in range(cols):
            accs.set(("dot", c), vec.zero(width))
        a_row = add_i64(kb, a_off, mul_i64(kb, i, sam))
        b_cols = [add_i64(kb, b_off, mul_i64(kb, add_i64(kb, j0, c), sbn)) for c in range(cols)]
        with kb.loop(chunks, "kc") as kc:
            k0 = mul_i64(kb, kc, width)
            av = vec.load(a, add_i64(kb, a_row, k0), width)
            for c in range(cols):
                bv = vec.load(bm, add_i64(kb, b_cols[c], k0), width)
                accs.set(("dot", c), vec.fma(av, bv, accs.get(("dot", c), ty)))
        sums = []
        for c in range(cols):
            total = accs.get(("dot", c), ty)
            if tail:
                av = vec.load(a, add_i64(kb, a_row, chunks * width), tail)
                bv = vec.load(bm, add_i64(kb, b_cols[c], chunks * width), tail)
                part = vec.mul(av, bv)
                total = vec.add(total, vec.place(part, tail, 0, width))
            sums.append(_reduce(kb, vec, total))
        values = ir.Constant(vec.ty(cols), ir.Undefined)
        for c, s in enumerate(sums):
            values = kb.b.insert_element(values, s, ir.Constant(I32, c))
        epilogue(i, j0, cols, values)

    with kb.loop(m, "i") as i:
        for_blocks(kb, n, nt, lambda j0, cols: block(i, j0, cols), "jb")


# ---------------------------------------------------------------------------------------------------------------
# Gemm
# ---------------------------------------------------------------------------------------------------------------


@lowering("Gemm", "FusedGemm")
def lower_gemm(kb: KernelBuilder) -> None:
    """Gemm, and edgecc.FusedGemm: the same kernel with the activation applied before the store."""
    a, bm, c = kb.inputs[0], kb.inputs[1], kb.optional_input(2)
    y = kb.outputs[0]
    dtype = a.dtype
    if dtype not in _MATMUL_DTYPES:
        raise EdgeccError(f"Gemm kernel does not take {dtype.name}")
    trans_a, trans_b = int(kb.attrs["transA"]), int(kb.attrs["transB"])
    alpha, beta = float(kb.attrs["alpha"]), float(kb.attrs["beta"])
    m, kk = a.shape[::-1] if trans_a else a.shape
    _, n = bm.shape[::-1] if trans_b else bm.shape
    if tuple(y.shape) != (m, n):
        raise EdgeccError(f"Gemm output shape {list(y.shape)} is not {[m, n]}")
    sam, sak = (1, m) if trans_a else (kk, 1)
    sbk, sbn = (1, kk) if trans_b else (n, 1)
    b = kb.b
    vec = Vec(kb, dtype, native_half=True)
    use_c = c is not None and beta != 0
    csm, csn = broadcast_strides(c.shape, (m, n)) if use_c else (0, 0)
    exact = not dtype.is_float and alpha == 1 and beta == 1
    finish = Epilogue(kb)
    _, nr = row_tile(kb, dtype, m, n)
    sparse = sparse_weights(kb)
    packed = None if sparse else kb.packed_input(1, lambda w: pack_panels(w.T if trans_b else w, nr))
    if packed is not None:
        bm = packed

    def epilogue(i, j0, width, values):
        flat = add_i64(kb, mul_i64(kb, i, n), j0)
        if use_c:
            cv = vec.load(c, add_i64(kb, mul_i64(kb, i, csm), mul_i64(kb, j0, csn)), width, csn)
        if dtype.is_float:
            if alpha != 1:
                values = vec.mul(values, vec.const_vector([alpha] * width))
            if use_c:
                if beta != 1:
                    cv = vec.mul(cv, vec.const_vector([beta] * width))
                values = vec.add(values, cv)
        elif exact:
            if use_c:
                values = b.add(values, cv)
        else:  # integer Gemm with alpha/beta != 1: through float64 like the reference, truncated back
            dty = ir.VectorType(F64, width)
            values = b.fmul(b.sitofp(values, dty), ir.Constant(dty, [ir.Constant(F64, alpha)] * width))
            if use_c:
                scaled = b.fmul(b.sitofp(cv, dty), ir.Constant(dty, [ir.Constant(F64, beta)] * width))
                values = b.fadd(values, scaled)
            values = b.fptosi(values, vec.ty(width))
        vec.store(y, flat, finish.apply(vec, values, flat, width), width)

    if sparse:
        emit_sparse_matmul(kb, sparse, a, 0, sam, sak, m, n, epilogue)
        return
    emit_matmul(kb, dtype, a, 0, sam, sak, bm, 0, sbk, sbn, m, n, kk, epilogue, b_panels=packed is not None)


# ---------------------------------------------------------------------------------------------------------------
# MatMul
# ---------------------------------------------------------------------------------------------------------------


@lowering("MatMul", "FusedMatMul")
def lower_matmul(kb: KernelBuilder) -> None:
    """MatMul, and edgecc.FusedMatMul: the bias (per column), residual and activation applied before the store."""
    a, bm = kb.inputs[0], kb.inputs[1]
    y = kb.outputs[0]
    dtype = a.dtype
    if dtype not in _MATMUL_DTYPES:
        raise EdgeccError(f"MatMul kernel does not take {dtype.name}")
    a_shape = (1,) + tuple(a.shape) if a.type.rank == 1 else tuple(a.shape)
    b_shape = tuple(bm.shape) + (1,) if bm.type.rank == 1 else tuple(bm.shape)
    m, kk = a_shape[-2:]
    n = b_shape[-1]
    batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    if y.size != int(np.prod(batch, dtype=np.int64)) * m * n:
        raise EdgeccError(f"MatMul output shape {list(y.shape)} disagrees with {list(batch)} x {m} x {n}")
    if y.size == 0:
        return
    vec = Vec(kb, dtype, native_half=True)
    bias, finish = kb.optional_input(2), Epilogue(kb, kb.optional_input(3))
    if kk == 0:
        with kb.loop(y.size) as i:
            kb.store(y, i, kb.const(dtype, 0))
        return
    _, nr = row_tile(kb, dtype, m, n)
    sparse = sparse_weights(kb)
    packed = kb.packed_input(1, lambda w: pack_panels(w, nr)) if bm.type.rank == 2 and not sparse else None
    if packed is not None:
        bm = packed
    a_batch = [s * m * kk for s in broadcast_strides(a_shape[:-2], batch)]
    b_batch = [s * kk * n for s in broadcast_strides(b_shape[:-2], batch)]
    y_batch = [s * m * n for s in strides_of(batch)]
    with kb.loop_nest(batch, "bt") as idx:
        a_off, b_off, y_off = kb.linear(idx, a_batch), kb.linear(idx, b_batch), kb.linear(idx, y_batch)

        def epilogue(i, j0, width, values):
            flat = add_i64(kb, y_off, mul_i64(kb, i, n), j0)
            if bias is not None:
                values = vec.add(values, vec.load(bias, j0, width))
            vec.store(y, flat, finish.apply(vec, values, flat, width), width)

        if sparse:
            emit_sparse_matmul(kb, sparse, a, a_off, kk, 1, m, n, epilogue)
        else:
            emit_matmul(kb, dtype, a, a_off, kk, 1, bm, b_off, n, 1, m, n, kk, epilogue, b_panels=packed is not None)


# ---------------------------------------------------------------------------------------------------------------
# Einsum
# ---------------------------------------------------------------------------------------------------------------


@lowering("Einsum")
def lower_einsum(kb: KernelBuilder) -> None:
    ins = [buf for buf in kb.inputs if buf is not None]
    y = kb.outputs[0]
    dtype = y.dtype
    terms, out = parse_einsum(node_call(kb), kb.attrs["equation"], [buf.type.rank for buf in ins])
    n_ell = max([buf.type.rank - len(t.replace(".", "")) for t, buf in zip(terms, ins) if "." in t], default=0)
    sizes: dict[str, int] = {}
    operands = []
    for term, buf in zip(terms, ins):
        k = buf.type.rank - len(term.replace(".", "")) if "." in term else 0
        labels = []
        for ch in term:
            labels.extend([f".{n_ell - k + e}" for e in range(k)] if ch == "." else [ch])
        for label, d in zip(labels, buf.shape):
            if sizes.get(label, 1) == 1:
                sizes[label] = int(d)
        operands.append((buf, labels))
    if n_ell and "." not in out:
        raise EdgeccError(f"Einsum '{kb.attrs['equation']}': the output has no '...' for the {n_ell} broadcast "
                          "dimension(s) of the inputs", hint="add '...' to the output term (NumPy rejects this too)")
    out_labels = []
    for ch in out:
        out_labels.extend([f".{e}" for e in range(n_ell)] if ch == "." else [ch])
    if tuple(sizes[label] for label in out_labels) != tuple(y.shape):
        raise EdgeccError(f"Einsum output shape {list(y.shape)} disagrees with the equation's "
                          f"{[sizes[label] for label in out_labels]}")
    if y.size == 0:
        return
    summed = [label for label in sizes if label not in out_labels]
    all_labels = out_labels + summed
    plans = []
    for buf, labels in operands:
        per_label = dict.fromkeys(all_labels, 0)
        for label, d, s in zip(labels, buf.shape, strides_of(buf.shape)):
            if not (d == 1 and sizes[label] != 1):
                per_label[label] += s
        plans.append((buf, [per_label[label] for label in all_labels]))
    accs = Accumulators(kb)
    zero = kb.const(dtype, 0)
    with kb.loop_nest([sizes[label] for label in out_labels], "o") as oidx:
        accs.set("acc", zero)
        with kb.loop_nest([sizes[label] for label in summed], "s") as sidx:
            idx = list(oidx) + list(sidx)
            product = None
            for buf, strides in plans:
                v = kb.load(buf, kb.linear(idx, strides))
                product = v if product is None else kb.mul(dtype, product, v)
            accs.set("acc", kb.add(dtype, accs.get("acc", zero.type), product))
        kb.store(y, kb.linear(oidx, strides_of(y.shape)), accs.get("acc", zero.type))
