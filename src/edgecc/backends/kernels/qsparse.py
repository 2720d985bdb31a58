"""int8 sparse kernels: edgecc.QGemm whose constant int8 B (zero points all 0) encode-sparsity stored sparse, and
1x1 group-1 QLinearConv (stride 1, unpadded) whose W is, as the product of each image's [positions, C] with W^T.

The weight is packed at compile time in the int8 layout of edgecc.ops.sparse (`pack_int8`: uint16 or int32
offsets of the column blocks, by the shape, then per entry a little-endian uint16 k and V int8 values), read with
byte loads only, so no alignment is assumed on any target. For each row i of A (position of the image) and each
column block of V outputs, one <V x i32> accumulator:

    acc += (A[i, k] - a_zero_point) * B[k, jV .. jV+V-1]     over the block's stored entries (increasing k)

then the dense kernels' requantisation, unchanged: on hosted targets qconv.QuantParams (the fixed-point form of
the fast QGemm / QLinearConv kernels: the accumulator starts at its `initial`, whose correction here is only the
bias because the zero point is subtracted per entry), so the result is bit-exact to the dense fast kernel's;
elsewhere (and past qconv.MAX_CHANNELS columns) the generic kernels' reference rounding (qgemm.requantise_exact;
quant.qlinear_conv_output for QLinearConv). The integer sum is the same exact value in every form
(|sum| <= 65535 * 255 * 128 < 2^31), so only the requantisation decides the output bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import I8, I32, I64, PTR, Buffer, KernelBuilder
from edgecc.backends.kernels.conv import Accumulators, add_i64, mul_i64
from edgecc.backends.kernels.qconv import MAX_K, QuantParams, byte_ptr, channel_limit, conv_geometry, \
    fast_kernels_run, memset, splat, stack_array, store_to, vec_ty
from edgecc.backends.kernels.qgemm import requantise_exact
from edgecc.backends.kernels.sparse import for_column_blocks
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.errors import ShapeError
from edgecc.ops.sparse import INT8_WEIGHT_INPUT, int8_offset_bytes, matrix_view, pack_int8, pointwise_unit, \
    sparse_capable


def emit_sparse_qgemm(kb: KernelBuilder) -> bool:
    """The QGemm node by the sparse kernel when its B is encoded (and sparse_capable); False emits nothing."""
    if not _encoded(kb):
        return False
    a, bias = kb.inputs[0], kb.optional_input(8)
    k, n = matrix_view(kb.node)(kb.node.input(INT8_WEIGHT_INPUT).const).shape

    def exact(total, col):
        return requantise_exact(kb, total if bias is None else kb.b.add(total, kb.load(bias, col)), col)

    _emit_walk(kb, (int(np.prod(a.shape[:-1])),), n,
               lambda idx: [_Tap(0, None, lambda kk: add_i64(kb, mul_i64(kb, idx[0], k), kk))],
               lambda idx, col: add_i64(kb, mul_i64(kb, idx[0], n), col), 1, exact)
    return True


def emit_sparse_qlinear_conv(kb: KernelBuilder) -> bool:
    """A group-1 QLinearConv whose W is encoded (ops.sparse.matrix_view: [C_in, taps x C_out], column block
    tap * J_out + j for the V output channels j): a 1x1, stride-1, unpadded one (any rank) as the matrix product of
    each image's [positions, C] view with W's [C, M]; any other 2-D one per output position, walking each kernel
    tap's column block (taps unrolled; with padding, a tap outside the input is skipped: the dense kernel's padding
    holds the zero point, whose term x - x_zp is 0, so the integer sum is the same). False emits nothing."""
    if not _encoded(kb):
        return False
    from edgecc.backends.kernels.quant import qlinear_conv_output, qlinear_conv_scale

    x, y, bias = kb.inputs[0], kb.outputs[0], kb.optional_input(8)
    c, m = x.shape[1], y.shape[1]
    b = kb.b

    def exact(total, col):
        total = total if bias is None else b.add(total, kb.load(bias, col))
        return qlinear_conv_output(kb, total, qlinear_conv_scale(kb, col))

    if pointwise_unit(kb.node):
        hw = int(np.prod(x.shape[2:]))
        _emit_walk(kb, (x.shape[0], hw), m, lambda idx: [_Tap(0, None, lambda kk: add_i64(
            kb, mul_i64(kb, idx[0], c * hw), b.mul(kk, kb.i64(hw)), idx[1]))],
            lambda idx, col: add_i64(kb, mul_i64(kb, idx[0], m * hw), mul_i64(kb, col, hw), idx[1]), hw, exact)
        return True
    geo = conv_geometry(kb, x, kb.inputs[3].shape, y)
    if geo is None:
        raise ShapeError(f"QLinearConv '{kb.node.name}': the int8 sparse kernel takes 2-D convolutions",
                          where=kb.node.name, hint="run encode-sparsity{encoding=dense} for this model")
    width = kb.node.input(INT8_WEIGHT_INPUT).type.sparse.width
    blocks_out = -(-m // width)
    plane = geo.h * geo.w

    def taps(idx) -> list[_Tap]:
        n_idx, oy, ox = idx
        found = []
        for ky in range(geo.kh):
            iy = add_i64(kb, mul_i64(kb, oy, geo.sy), ky * geo.dy - geo.pt)
            for kx in range(geo.kw):
                ix = add_i64(kb, mul_i64(kb, ox, geo.sx), kx * geo.dx - geo.pl)
                inside = None
                if geo.pt or geo.pl or (geo.oh - 1) * geo.sy + (geo.kh - 1) * geo.dy >= geo.h or \
                        (geo.ow - 1) * geo.sx + (geo.kw - 1) * geo.dx >= geo.w:
                    inside = b.and_(b.icmp_unsigned("<", iy, kb.i64(geo.h)), b.icmp_unsigned("<", ix, kb.i64(geo.w)))
                pixel = add_i64(kb, mul_i64(kb, n_idx, c * plane), mul_i64(kb, iy, geo.w), ix)
                found.append(_Tap((ky * geo.kw + kx) * blocks_out, inside,
                                  lambda kk, pixel=pixel: add_i64(kb, b.mul(kk, kb.i64(plane)), pixel)))
        return found

    out_plane = geo.oh * geo.ow
    _emit_walk(kb, (geo.n, geo.oh, geo.ow), m, taps,
               lambda idx, col: add_i64(kb, mul_i64(kb, idx[0], m * out_plane), mul_i64(kb, col, out_plane),
                                        mul_i64(kb, idx[1], geo.ow), idx[2]), out_plane, exact)
    return True


def _encoded(kb: KernelBuilder) -> bool:
    value = kb.node.input(INT8_WEIGHT_INPUT)
    return value is not None and value.type is not None and value.type.sparse is not None and \
        sparse_capable(kb.node) is None


@dataclass(frozen=True)
class _Tap:
    """One kernel tap of an output position: its first column block, the condition that it reads inside the input
    (None: always), and the flat index of A (activation) for reduction index k."""
    block: int
    inside: ir.Value | None
    a_flat: Callable[[ir.Value], ir.Value]


def _emit_walk(kb: KernelBuilder, loops: tuple[int, ...], channels: int, taps, y_flat, column_stride: int,
               exact) -> None:
    """For each index of the `loops` nest and each column block of V of the `channels` outputs: acc = sum over
    taps(index) and each tap's column block's entries of (A[tap.a_flat(k)] - a_zp) * w, requantised by
    QuantParams (see the module docstring) or exact(i32 sum, column) into Y[y_flat(index, column)] (columns
    column_stride apart)."""
    value = kb.node.input(INT8_WEIGHT_INPUT)
    a, a_zp = kb.inputs[0], kb.inputs[2]
    bias = kb.optional_input(8)
    out = kb.outputs[0]
    width = value.type.sparse.width
    view = matrix_view(kb.node)
    k, n = view(value.const).shape
    if int(np.prod(loops)) == 0 or channels == 0:
        return
    words = kb.packed_input(INT8_WEIGHT_INPUT, lambda w: pack_int8(view(w), width))
    blocks = -(-n // width)
    b = kb.b
    step = int8_offset_bytes(k, blocks)
    base = b.bitcast(words.ptr, PTR)
    records = byte_ptr(kb, base, step * (blocks + 1))
    acc_ty = vec_ty(I32, width)
    zp = (b.sext if a.dtype is DType.int8 else b.zext)(kb.load(a_zp, kb.i64(0)), I32) if a_zp is not None \
        else ir.Constant(I32, 0)
    params = _fixed_point(kb, -(-channels // width) * width, channels, bias)
    accs = Accumulators(kb)

    def offset(block) -> ir.Value:
        if step == 4:
            return b.sext(kb.load(words, add_i64(kb, block)), I64)
        return _uint16(kb, byte_ptr(kb, base, mul_i64(kb, block, 2)))

    def walk(tap: _Tap, jb) -> None:
        block = add_i64(kb, jb, tap.block)
        with kb.loop(offset(add_i64(kb, block, 1)), "e", start=offset(block)) as e:
            record = byte_ptr(kb, records, mul_i64(kb, e, 2 + width))
            x = b.sub(kb.convert(a.dtype, DType.int32, kb.load(a, tap.a_flat(_uint16(kb, record)))), zp)
            w = b.sext(b.load(byte_ptr(kb, record, 2), typ=vec_ty(I8, width), align=1), acc_ty)
            accs.set("acc", b.add(accs.get("acc", acc_ty), b.mul(splat(b, x, width), w)))

    def column_block(idx, jb, cols: int) -> None:
        col0 = mul_i64(kb, jb, width)
        start = params.initial(col0, width, width) if params is not None else ir.Constant(acc_ty, None)
        accs.set("acc", start)
        for tap in taps(idx):
            if tap.inside is None:
                walk(tap, jb)
            else:
                with b.if_then(tap.inside):
                    walk(tap, jb)
        acc = accs.get("acc", acc_ty)
        flat = y_flat(idx, col0)
        if params is not None:
            def store(_k: int, q: ir.Value) -> None:
                if cols == width and column_stride == 1:
                    store_to(kb, q, kb.element_ptr(out, flat))
                else:
                    for j in range(cols):
                        kb.store(out, add_i64(kb, flat, j * column_stride), b.extract_element(q, ir.Constant(I32, j)))

            params.requantise([(acc, col0, width)], store)
            return
        for j in range(cols):
            total = b.extract_element(acc, ir.Constant(I32, j))
            kb.store(out, add_i64(kb, flat, j * column_stride), exact(total, add_i64(kb, col0, j)))

    with kb.loop_nest(loops, "o") as idx:
        for_column_blocks(kb, channels, width, lambda jb, cols: column_block(idx, jb, cols))


def _uint16(kb: KernelBuilder, ptr: ir.Value) -> ir.Value:
    """The little-endian uint16 at byte pointer `ptr`, by byte loads (any alignment), as an i64."""
    lo, hi = (kb.b.zext(kb.b.load(byte_ptr(kb, ptr, j), typ=I8), I64) for j in (0, 1))
    return kb.b.or_(lo, kb.b.shl(hi, kb.i64(8)))


def _fixed_point(kb: KernelBuilder, padded: int, n: int, bias: Buffer | None) -> QuantParams | None:
    """The dense fast kernel's QuantParams where it would run (qconv.fast_kernels_run, at most qconv.channel_limit columns, a reduction
    of at most qconv.MAX_K), with a zero column-sum correction (the zero point is taken off each activation
    instead); None: exact requantisation, as the generic kernel."""
    reduction = int(np.prod(kb.inputs[3].shape[1:])) if kb.node.op == "QLinearConv" else \
        matrix_view(kb.node)(kb.node.input(INT8_WEIGHT_INPUT).const).shape[0]
    if not fast_kernels_run(kb.target) or padded > channel_limit(kb.target) or reduction > MAX_K:
        return None
    a_s, b_s, y_s, y_zp = kb.inputs[1], kb.inputs[4], kb.inputs[6], kb.inputs[7]
    zeros = stack_array(kb, I32, padded, "qzero")
    memset(kb, zeros, ir.Constant(I8, 0), 4 * padded)
    sums = Buffer(zeros, TensorType(DType.int32, (padded,)))
    return QuantParams(kb, n, padded, a_s, None, b_s, y_s, y_zp, bias, sums, 0)
