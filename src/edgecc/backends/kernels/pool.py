"""Pooling kernels: MaxPool (optional int64 Indices) and AveragePool, vectorised over the last spatial axis.

The window geometry comes from the reference (`pool_window`, i.e. `window_geometry`) at compile time. Each row of
output (one position on the outer spatial axes) is cut into tiles of NR consecutive outputs like Conv's
(`plan_tiles`): a tile keeps its running max / sum in NR-lane vectors, loops over the outer kernel taps that
fall inside the input (per-row ranges from compile-time tables, so padding costs nothing) and unrolls the
last-axis taps as (possibly strided) vector loads. Border tiles are emitted with compile-time lane masks
(lanes whose tap falls in the padding hold -inf / the dtype's minimum for MaxPool, 0 for AveragePool); interior
tiles run in a runtime loop with plain loads.

AveragePool divides by the product of per-axis counts (valid taps, or taps inside the input plus its declared
pads with count_include_pad=1), each from a compile-time table, with an exact IEEE division like the reference.
MaxPool ties keep the first element in row-major window order; a NaN wins like numpy.maximum when no Indices are
asked for.
"""

from __future__ import annotations

import contextlib

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import F32, I1, I64, KernelBuilder, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.conv import (Vec, add_i64, chunk_width, emit_tile_groups, entry_alloca, lanes,
                                          load_row_inside, mul_i64, node_call, plan_tiles, strided_span_ok)
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from edgecc.ops.nn import pool_window


def _axis_tables(window, spatial, a: int, include_pad: bool):
    """For spatial axis a, per output coordinate: (lo, hi) range of taps reading inside the input, and the
    number of taps the average's divisor counts on this axis."""
    size = spatial[a]
    o = np.arange(window.out[a])[:, None]
    t = np.arange(window.kernel[a])[None, :]
    pos = o * window.strides[a] + t * window.dilations[a] - window.pads_begin[a]
    valid = (pos >= 0) & (pos < size)
    any_valid = valid.any(axis=1)
    lo = np.where(any_valid, valid.argmax(axis=1), 0).astype(np.int64)
    hi = np.where(any_valid, window.kernel[a] - valid[:, ::-1].argmax(axis=1), 0).astype(np.int64)
    if include_pad:
        count = ((pos >= -window.pads_begin[a]) & (pos < size + window.pads_end[a])).sum(axis=1)
    else:
        count = hi - lo
    return lo, hi, count.astype(np.int64)


def _table_value(kb: KernelBuilder, array: np.ndarray, index: ir.Value) -> ir.Value:
    """array[index] for a compile-time int64 table (a constant when the table is uniform)."""
    if array.size and (array == array[0]).all():
        return kb.i64(int(array[0]))
    ptr = kb.table(array.astype(np.int64), "pool")
    return kb.b.load(kb.b.gep(ptr, [index], inbounds=True, source_etype=I64), typ=I64)


def _i1_vector(values) -> ir.Constant:
    values = [int(bool(v)) for v in values]
    return ir.Constant(ir.VectorType(I1, len(values)), [ir.Constant(I1, v) for v in values])


def _i64_vector(values) -> ir.Constant:
    values = [int(v) for v in values]
    return ir.Constant(ir.VectorType(I64, len(values)), [ir.Constant(I64, v) for v in values])


@lowering("MaxPool", "AveragePool")
def lower_pool(kb: KernelBuilder) -> None:
    x, y = kb.inputs[0], kb.outputs[0]
    indices = kb.outputs[1] if len(kb.outputs) > 1 and kb.outputs[1] is not None else None
    is_max = kb.node.op == "MaxPool"
    if not is_max and not x.dtype.is_float:
        raise EdgeccError(f"AveragePool kernel needs float16 or float32 input, got {x.dtype.name}")
    if is_max and x.dtype not in (DType.float32, DType.float16, DType.int8, DType.uint8):
        raise EdgeccError(f"MaxPool kernel takes float16, float32, int8 or uint8, got {x.dtype.name}")
    window = pool_window(node_call(kb), x.shape)
    if tuple(y.shape[2:]) != tuple(window.out):
        raise EdgeccError(f"{kb.node.op} output shape {list(y.shape)} disagrees with the window {list(window.out)}")
    if y.size == 0:
        return
    b = kb.b
    dtype = x.dtype
    vec = Vec(kb, dtype)
    spatial, out, kernel = tuple(x.shape[2:]), tuple(window.out), tuple(window.kernel)
    strides, dilations, pads = window.strides, window.dilations, window.pads_begin
    nsp = len(spatial)
    planes = x.shape[0] * x.shape[1]
    in_plane, out_plane = int(np.prod(spatial, dtype=np.int64)), int(np.prod(out, dtype=np.int64))
    xs, ys = strides_of(spatial), strides_of(out)
    include_pad = not is_max and int(kb.attrs["count_include_pad"]) == 1
    tables = [_axis_tables(window, spatial, a, include_pad) for a in range(nsp)]
    width_in, width_out, kw = spatial[-1], out[-1], kernel[-1]
    sx, dx, px = strides[-1], dilations[-1], pads[-1]
    last_lo, last_hi, last_count = tables[-1]

    if indices is not None:
        order = range(nsp) if int(kb.attrs["storage_order"]) else range(nsp - 1, -1, -1)
        index_stride, step = [0] * nsp, 1
        for a in order:
            index_stride[a], step = step, step * spatial[a]
    if is_max:
        lowest = -np.inf if dtype.is_float else int(np.iinfo(dtype.numpy).min)
    else:
        lowest = 0.0

    nr = chunk_width(width_out, lanes(kb))
    tiles, loop_tiles = plan_tiles(width_out, nr, width_in, kw, sx, dx, px)
    if loop_tiles[1] > loop_tiles[0]:  # interior tiles: every last-axis tap is valid and counted
        first, stop = tiles[loop_tiles[0]][0], tiles[loop_tiles[1] - 1][0] + nr
        assert (last_count[first:stop] == kw).all() and (last_hi[first:stop] - last_lo[first:stop] == kw).all()

    def emit_tile(nc, oys, bounds, starts, ox0, n: int, static: bool, ox_last: int) -> None:
        acc_ty = vec.ty(n)
        idx_ty = ir.VectorType(I64, n)
        acc_slot = kb_alloca(acc_ty)
        b.store(vec.const_vector([lowest] * n), acc_slot)
        if indices is not None:
            idx_slot = kb_alloca(idx_ty)
            b.store(_i64_vector([-1] * n), idx_slot)
        x_plane = mul_i64(kb, nc, in_plane)
        with contextlib.ExitStack() as stack:
            rows, index_terms = [x_plane], []
            for a, (lo, hi) in enumerate(bounds):
                t = stack.enter_context(kb.loop(hi, f"t{a}", start=lo))
                pos = add_i64(kb, starts[a], mul_i64(kb, t, dilations[a]))
                rows.append(mul_i64(kb, pos, xs[a]))
                if indices is not None:
                    index_terms.append(mul_i64(kb, pos, index_stride[a]))
            row = add_i64(kb, *rows)
            acc = b.load(acc_slot, typ=acc_ty)
            idx = b.load(idx_slot, typ=idx_ty) if indices is not None else None
            for k in range(kw):
                if static:
                    v = load_row_inside(kb, vec, x, row, ox0, n, k, sx, dx, px, width_in, allow_wide=True, fill=lowest)
                    if v is None:
                        continue
                    valid = [0 <= (ox0 + j) * sx + k * dx - px < width_in for j in range(n)]
                    lane_ok = None if all(valid) else _i1_vector(valid)
                else:
                    start = add_i64(kb, row, mul_i64(kb, ox0, sx), k * dx - px)
                    v = vec.load(x, start, n, sx, strided_span_ok(ox_last, n, k, sx, dx, px, width_in))
                    lane_ok = None
                if not is_max:
                    acc = vec.add(acc, v)
                elif indices is not None:
                    first = b.icmp_signed("<", idx, _i64_vector([0] * n))
                    better = b.or_(first, kb.compare(dtype, ">", v, acc))
                    if lane_ok is not None:
                        better = b.and_(better, lane_ok)
                    acc = b.select(better, v, acc)
                    # index of lane j: sum of the outer positions' terms + ((ox0 + j) * sx + k * dx - px) * stride
                    base = add_i64(kb, *index_terms, mul_i64(kb, ox0, sx * index_stride[-1]),
                                   (k * dx - px) * index_stride[-1])
                    here = b.add(splat_i64(base, n), _i64_vector(j * sx * index_stride[-1] for j in range(n)))
                    idx = b.select(better, here, idx)
                elif dtype.is_float:  # numpy.maximum: a NaN on either side wins
                    pick = b.select(b.fcmp_unordered(">", v, acc), v, acc)
                    acc = b.select(b.fcmp_unordered("uno", acc, acc), acc, pick)
                else:
                    acc = b.select(kb.compare(dtype, ">", v, acc), v, acc)
            b.store(acc, acc_slot)
            if indices is not None:
                b.store(idx, idx_slot)
        y_flat = add_i64(kb, mul_i64(kb, nc, out_plane), *[mul_i64(kb, o, s) for o, s in zip(oys, ys)], ox0)
        result = b.load(acc_slot, typ=acc_ty)
        if not is_max:
            outer = kb.i64(1)
            for a, o in enumerate(oys):
                outer = b.mul(outer, _table_value(kb, tables[a][2], o))
            if static:
                lane_counts = vec.const_vector(last_count[ox0:ox0 + n])
            else:
                lane_counts = vec.const_vector([kw] * n)
            count = b.fmul(vec.splat(b.sitofp(outer, F32), n), lane_counts)
            one = vec.const_vector([1.0] * n)
            count = b.select(b.fcmp_ordered(">", count, one), count, one)
            result = b.fdiv(result, count)
        vec.store(y, y_flat, result, n)
        if indices is not None:
            idx = b.load(idx_slot, typ=idx_ty)
            found = b.icmp_signed(">=", idx, _i64_vector([0] * n))
            final = b.select(found, b.add(idx, splat_i64(mul_i64(kb, nc, in_plane), n)), _i64_vector([-1] * n))
            b.store(final, kb.element_ptr(indices, y_flat), align=8)

    slots: dict[str, ir.Value] = {}

    def kb_alloca(ty):
        key = str(ty)
        if key not in slots:
            slots[key] = entry_alloca(kb, ty)
        return slots[key]

    def splat_i64(value, n):
        undef = ir.Constant(ir.VectorType(I64, 1), ir.Undefined)
        one = b.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
        return b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                        [ir.Constant(ir.IntType(32), 0)] * n))

    with kb.loop(planes, "nc") as nc:
        with kb.loop_nest(out[:-1], "o") as oys:
            bounds = [(_table_value(kb, tables[a][0], o), _table_value(kb, tables[a][1], o))
                      for a, o in enumerate(oys)]
            starts = [add_i64(kb, mul_i64(kb, o, strides[a]), -pads[a]) for a, o in enumerate(oys)]
            emit_tile_groups(kb, tiles, loop_tiles, nr, lambda ox0, n, static, ox_last, _count: emit_tile(
                nc, oys, bounds, starts, ox0, n, static, ox_last))
