"""int8 sparse kernel: edgecc.QGemm whose constant int8 B (zero points all 0) encode-sparsity stored sparse.

B is packed at compile time in the int8 layout of edgecc.ops.sparse (`pack_int8`: uint16 or int32 offsets of the
column blocks, by the shape, then per entry a little-endian uint16 k and V int8 values, read with byte loads only, so no alignment is
assumed on any target). For each row i of A and each column block of V outputs, one <V x i32> accumulator:

    acc += (A[i, k] - a_zero_point) * B[k, jV .. jV+V-1]     over the block's stored entries (increasing k)

then the dense QGemm kernels' requantisation, unchanged: on hosted targets qconv.QuantParams (the fixed-point form
of qgemm.emit_fast_qgemm: the accumulator starts at its `initial`, whose correction here is only the bias because
the zero point is subtracted per entry), so the result is bit-exact to the dense fast kernel's; elsewhere (and past
qconv.MAX_CHANNELS columns) qgemm.requantise_exact, the generic kernel's exact reference rounding. The integer
sum is the same exact value in every form (|sum| <= 65535 * 255 * 128 < 2^31), so only the requantisation decides
the output bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import I8, I32, I64, PTR, Buffer, KernelBuilder
from edgecc.backends.kernels.conv import Accumulators, add_i64, mul_i64
from edgecc.backends.kernels.qconv import MAX_CHANNELS, QuantParams, byte_ptr, memset, splat, stack_array, \
    store_to, vec_ty
from edgecc.backends.kernels.qgemm import requantise_exact
from edgecc.backends.kernels.sparse import for_column_blocks
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.sparse import INT8_WEIGHT_INPUT, int8_offset_bytes, matrix_view, pack_int8, sparse_capable


def emit_sparse_qgemm(kb: KernelBuilder) -> bool:
    """The QGemm node by the sparse kernel when its B is encoded (and sparse_capable); False emits nothing."""
    value = kb.node.input(INT8_WEIGHT_INPUT)
    if value is None or value.type is None or value.type.sparse is None or sparse_capable(kb.node) is not None:
        return False
    a, a_zp = kb.inputs[0], kb.inputs[2]
    bias = kb.optional_input(8)
    out = kb.outputs[0]
    width = value.type.sparse.width
    view = matrix_view(kb.node)
    k, n = view(value.const).shape
    rows = int(np.prod(a.shape[:-1]))
    if rows == 0 or n == 0:
        return True
    words = kb.packed_input(INT8_WEIGHT_INPUT, lambda w: pack_int8(view(w), width))
    blocks = -(-n // width)
    b = kb.b
    step = int8_offset_bytes(k, blocks)
    base = b.bitcast(words.ptr, PTR)
    records = byte_ptr(kb, base, step * (blocks + 1))
    acc_ty = vec_ty(I32, width)
    zp = (b.sext if a.dtype is DType.int8 else b.zext)(kb.load(a_zp, kb.i64(0)), I32) if a_zp is not None \
        else ir.Constant(I32, 0)
    params = _fixed_point(kb, blocks * width, n, bias)
    accs = Accumulators(kb)

    def offset(block) -> ir.Value:
        if step == 4:
            return b.sext(kb.load(words, add_i64(kb, block)), I64)
        return _uint16(kb, byte_ptr(kb, base, mul_i64(kb, block, 2)))

    def column_block(row, jb, cols: int) -> None:
        col0 = mul_i64(kb, jb, width)
        start = params.initial(col0, width, width) if params is not None else ir.Constant(acc_ty, None)
        accs.set("acc", start)
        with kb.loop(offset(add_i64(kb, jb, 1)), "e", start=offset(jb)) as e:
            record = byte_ptr(kb, records, mul_i64(kb, e, 2 + width))
            kk = _uint16(kb, record)
            x = b.sub(kb.convert(a.dtype, DType.int32, kb.load(a, add_i64(kb, mul_i64(kb, row, k), kk))), zp)
            w = b.sext(b.load(byte_ptr(kb, record, 2), typ=vec_ty(I8, width), align=1), acc_ty)
            accs.set("acc", b.add(accs.get("acc", acc_ty), b.mul(splat(b, x, width), w)))
        acc = accs.get("acc", acc_ty)
        flat = add_i64(kb, mul_i64(kb, row, n), col0)
        if params is not None:
            def store(_k: int, q: ir.Value) -> None:
                if cols == width:
                    store_to(kb, q, kb.element_ptr(out, flat))
                else:
                    for j in range(cols):
                        kb.store(out, add_i64(kb, flat, j), b.extract_element(q, ir.Constant(I32, j)))

            params.requantise([(acc, col0, width)], store)
            return
        for j in range(cols):
            col = add_i64(kb, col0, j)
            total = b.extract_element(acc, ir.Constant(I32, j))
            if bias is not None:
                total = b.add(total, kb.load(bias, col))
            kb.store(out, add_i64(kb, flat, j), requantise_exact(kb, total, col))

    with kb.loop(rows, "i") as row:
        for_column_blocks(kb, n, width, lambda jb, cols: column_block(row, jb, cols))
    return True


def _uint16(kb: KernelBuilder, ptr: ir.Value) -> ir.Value:
    """The little-endian uint16 at byte pointer `ptr`, by byte loads (any alignment), as an i64."""
    lo, hi = (kb.b.zext(kb.b.load(byte_ptr(kb, ptr, j), typ=I8), I64) for j in (0, 1))
    return kb.b.or_(lo, kb.b.shl(hi, kb.i64(8)))


def _fixed_point(kb: KernelBuilder, padded: int, n: int, bias: Buffer | None) -> QuantParams | None:
    """The dense fast kernel's QuantParams where it would run (hosted, at most MAX_CHANNELS columns), with a zero
    column-sum correction (the zero point is taken off each activation instead); None: exact requantisation."""
    if not kb.target.hosted or padded > MAX_CHANNELS:
        return None
    a_s, b_s, y_s, y_zp = kb.inputs[1], kb.inputs[4], kb.inputs[6], kb.inputs[7]
    zeros = stack_array(kb, I32, padded, "qzero")
    memset(kb, zeros, ir.Constant(I8, 0), 4 * padded)
    sums = Buffer(zeros, TensorType(DType.int32, (padded,)))
    return QuantParams(kb, n, padded, a_s, None, b_s, y_s, y_zp, bias, sums, 0)
