"""Data-movement ops as structured copy loops. With static shapes and constant parameters, each of these ops
moves boxes of elements: the kernel is a loop nest over the output whose innermost rows are copied by memcpy
wherever they are contiguous on both sides. The parameters come from the op's own plan function (the one its
inference and NumPy reference share, in edgecc.ops.tensor), so the kernel follows the reference's semantics
(negative and out-of-range starts, clamping, default perms, equal splits) by construction.

What each op compiles to (a "strided copy" drops unit dims, merges dims that stay adjacent in both layouts, loops
over the output in its own order and copies the innermost run by memcpy when it is contiguous on both sides; when
it is contiguous only in the output and another dim is contiguous in the input, a 2-D transpose, it copies square
blocks through vector registers (`copy_transposed`); else element by element with the input stride):
- Transpose: a strided copy with the permuted input strides (channel shuffle [1,2,58,28,28] perm [0,2,1,3,4]:
  58 x 2 row copies of 28*28 elements; NCHW to NHWC: 8x8 float blocks on AVX2/AVX-512, 4x4 on NEON/SSE).
- DepthToSpace, SpaceToDepth: the Transpose of the reference's 6-D view (Reshape+Transpose+Reshape).
- Slice: a strided copy from the first selected element with strides step * input stride (steps of any sign).
- Split: one strided copy per output from its first element (a channel split: one memcpy per output and outer
  index).
- Expand: a strided copy with stride 0 on broadcast dims (a broadcast innermost dim stores one loaded value).
- Tile: a strided copy over the output viewed as (repeat, dim) pairs, stride 0 on the repeat dims.
- Pad (mode constant, any pads, negative ones crop): per output dim, the fill before the data, the data (a loop
  into the next dim; at the last dim one memcpy) and the fill after it, each fill written directly (memset
  when the fill value's bytes are all equal, else a store loop), dims padded nowhere merged into the one before.
- Concat: one block copy per input and outer index. Reshape, Flatten, Squeeze, Unsqueeze, Identity: one memcpy.
Elements are copied as raw storage values (no conversion; float16 stays half, bool stays a byte).

The compile-time index table (`index_table` / `gather_through_table`: out.flat[i] = in.flat[table[i]], a 4-byte
table entry and a gather per element) remains only for Pad in modes edge, reflect and wrap, for Trilu (a mask,
not a move), and for constant-index Gather/GatherElements and nearest Resize (gather.py, resize.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import I8, I32, I64, STORAGE, Buffer, KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.kernels import lowering
from edgecc.errors import ShapeError
from edgecc.ops import tensor as tensor_ops
from edgecc.ops.apply import evaluate_node
from edgecc.ops.registry import Call

Offset = int | ir.Value


def copy_bytes(kb: KernelBuilder, dst, src, nbytes: int) -> None:
    memcpy = kb.module.declare_intrinsic("llvm.memcpy", [dst.type, src.type, I64])
    kb.b.call(memcpy, [dst, src, kb.i64(nbytes), ir.Constant(ir.IntType(1), 0)])


@lowering("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
def lower_copy(kb: KernelBuilder) -> None:
    """Same bytes, new shape: one memcpy (the memory planner may later alias instead)."""
    copy_bytes(kb, kb.outputs[0].ptr, kb.inputs[0].ptr, kb.outputs[0].type.nbytes)


# ----------------------------------------------------------------------------------------------------------
# Building blocks: strided copies and fills
# ----------------------------------------------------------------------------------------------------------

def merge_dims(shape: Sequence[int], *strides: Sequence[int]) -> list[tuple[int, list[int]]] | None:
    """The loop dims of a copy over `shape` whose element k sits at sum(index[k] * strides[j][k]) in operand j:
    [(count, [stride per operand])], outermost first, unit dims dropped and a dim merged into the one before it
    where they stay adjacent in every operand. None when the box is empty."""
    if any(int(n) == 0 for n in shape):
        return None
    dims: list[tuple[int, list[int]]] = []
    for k, n in enumerate(shape):
        n, inner = int(n), [int(s[k]) for s in strides]
        if n == 1:
            continue
        if dims and all(outer == s * n for outer, s in zip(dims[-1][1], inner)):
            dims[-1] = (dims[-1][0] * n, inner)
        else:
            dims.append((n, inner))
    return dims


def copy_strided(kb: KernelBuilder, dst: Buffer, dst_offset: Offset, dst_strides: Sequence[int],
                 src: Buffer, src_offset: Offset, src_strides: Sequence[int], shape: Sequence[int]) -> None:
    """dst[dst_offset + sum(i_k * dst_strides[k])] = src[src_offset + sum(i_k * src_strides[k])] for every index
    i of `shape` (element units; strides may be negative or 0). Loops in the order of the dims after
    `merge_dims`; the innermost run is one memcpy when both strides are 1, a block transpose when it is contiguous
    only in dst and another dim is contiguous in src (see `copy_transposed`), else an element loop."""
    dims = merge_dims(shape, dst_strides, src_strides)
    if dims is None:
        return
    *outer, (count, (d_step, s_step)) = dims or [(1, [1, 1])]
    side = transpose_block(kb, src.dtype.itemsize)
    across = [k for k, (n, (_, s)) in enumerate(outer) if s == 1 and n >= side]
    if d_step == 1 and s_step not in (0, 1) and count >= side > 1 and across:
        copy_transposed(kb, dst, dst_offset, src, src_offset, outer, across[-1], count, s_step, side)
        return
    ty = STORAGE[src.dtype]
    with kb.loop_nest([n for n, _ in outer], "d") as idx:
        d = kb.linear(idx, [s[0] for _, s in outer], dst_offset)
        s = kb.linear(idx, [s[1] for _, s in outer], src_offset)
        if d_step == 1 and s_step == 1:
            copy_bytes(kb, kb.element_ptr(dst, d), kb.element_ptr(src, s), count * src.dtype.itemsize)
        else:
            splat = kb.b.load(kb.element_ptr(src, s), typ=ty) if s_step == 0 else None
            with kb.loop(count, "e") as e:
                value = splat or kb.b.load(kb.element_ptr(src, kb.linear([e], [s_step], s)), typ=ty)
                kb.b.store(value, kb.element_ptr(dst, kb.linear([e], [d_step], d)))


def transpose_block(kb: KernelBuilder, itemsize: int) -> int:
    """Side of the square blocks transposed in vector registers: the target's lanes of this element size, at
    most 8; 1 (no blocks) below 4 lanes."""
    lanes = min(kb.target.vector_bits // (8 * itemsize), 8)
    return lanes if lanes >= 4 else 1


def copy_transposed(kb: KernelBuilder, dst: Buffer, dst_offset: Offset, src: Buffer, src_offset: Offset,
                    outer: list[tuple[int, list[int]]], j: int, count: int, s_step: int, side: int) -> None:
    """The copy of `copy_strided` whose innermost dim i (`count`, contiguous in dst, `s_step` apart in src) and
    outer dim `j` (contiguous in src) form a 2-D transpose: side x side blocks, each `side` vector loads along j,
    a transpose in registers and `side` vector stores along i; the remainder strips element by element."""
    n_j, (d_j, _) = outer[j]
    rest = outer[:j] + outer[j + 1:]
    vec = ir.VectorType(ir.IntType(8 * src.dtype.itemsize), side)
    align = src.dtype.itemsize
    full_i, full_j = count // side * side, n_j // side * side
    with kb.loop_nest([n for n, _ in rest], "d") as idx:
        d = kb.linear(idx, [s[0] for _, s in rest], dst_offset)
        s = kb.linear(idx, [s[1] for _, s in rest], src_offset)
        with kb.loop(full_j // side, "jb") as jb, kb.loop(full_i // side, "ib") as ib:
            j0, i0 = kb.b.mul(jb, kb.i64(side)), kb.b.mul(ib, kb.i64(side))
            first_s = kb.linear([i0, j0], [s_step, 1], s)
            first_d = kb.linear([j0, i0], [d_j, 1], d)
            rows = [kb.b.load(kb.element_ptr(src, kb.b.add(first_s, kb.i64(r * s_step))), typ=vec, align=align)
                    for r in range(side)]
            for c, column in enumerate(transpose_registers(kb, rows)):
                kb.b.store(column, kb.element_ptr(dst, kb.b.add(first_d, kb.i64(c * d_j))), align=align)
        # the strips the blocks leave: i from full_i on (every j), then j from full_j on (i before full_i)
        copy_strided(kb, dst, kb.b.add(d, kb.i64(full_i)), [d_j, 1], src, kb.b.add(s, kb.i64(full_i * s_step)),
                     [1, s_step], [n_j, count - full_i])
        copy_strided(kb, dst, kb.b.add(d, kb.i64(full_j * d_j)), [d_j, 1], src, kb.b.add(s, kb.i64(full_j)),
                     [1, s_step], [n_j - full_j, full_i])


def transpose_registers(kb: KernelBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The columns of the square matrix whose rows are the vectors `rows` (a power of two of them): log2(n)
    rounds of interleaving row k with row k + n/2 (low halves give row 2k, high halves row 2k + 1)."""
    n = len(rows)
    half = n // 2
    masks = [ir.Constant(ir.VectorType(I32, n), [k + part * half + lane * n for k in range(half) for lane in (0, 1)])
             for part in (0, 1)]
    for _ in range(n.bit_length() - 1):
        rows = [kb.b.shuffle_vector(rows[k], rows[k + half], mask) for k in range(half) for mask in masks]
    return rows


def copy_view(kb: KernelBuilder, src_offset: int, src_strides: Sequence[int], shape: Sequence[int] | None = None,
              out_index: int = 0) -> None:
    """Fill output `out_index` in row-major order (viewed as `shape`, default its own) from the input view
    src[src_offset + sum(i_k * src_strides[k])]."""
    out = kb.outputs[out_index]
    shape = out.shape if shape is None else shape
    copy_strided(kb, out, 0, strides_of(shape), kb.inputs[0], src_offset, src_strides, shape)


def fill(kb: KernelBuilder, buf: Buffer, offset: Offset, count: int, pattern: bytes) -> None:
    """`count` elements of `buf` from `offset` set to the element whose storage bytes are `pattern`: one memset
    when those bytes are all equal, else a store loop."""
    if count <= 0:
        return
    ptr = kb.element_ptr(buf, offset if isinstance(offset, ir.Value) else kb.i64(offset))
    if len(set(pattern)) == 1:
        memset = kb.module.declare_intrinsic("llvm.memset", [ptr.type, I64])
        kb.b.call(memset, [ptr, ir.Constant(I8, pattern[0]), kb.i64(count * len(pattern)),
                           ir.Constant(ir.IntType(1), 0)])
        return
    ty = ir.IntType(8 * len(pattern))
    value = ir.Constant(ty, int.from_bytes(pattern, "little"))
    with kb.loop(count, "f") as i:
        kb.b.store(value, kb.b.gep(ptr, [i], inbounds=True, source_etype=ty))


# ----------------------------------------------------------------------------------------------------------
# Parameters: the op's plan function on the kernel's node
# ----------------------------------------------------------------------------------------------------------

def plan_call(kb: KernelBuilder) -> Call:
    """The node as its op's inference sees it: input types, parameter inputs (1..) by value when they are
    compile-time constants (reading them keys the kernel on them), completed attributes. The plan functions
    fail with the op's own message when a parameter they need is not a constant."""
    node = kb.node
    types = [None if v is None else v.type for v in node.inputs]
    values = [None] + [kb.const_input(i) for i in range(1, len(node.inputs))]
    return Call(node.op, types, kb.attrs, len(node.outputs), values=values)


def transposed(in_shape: Sequence[int], perm: Sequence[int]) -> tuple[list[int], list[int]]:
    """(output shape, input strides per output dim) of transposing a row-major `in_shape` by `perm`."""
    strides = strides_of(in_shape)
    return [int(in_shape[p]) for p in perm], [strides[p] for p in perm]


@lowering("Transpose")
def lower_transpose(kb: KernelBuilder) -> None:
    shape, strides = transposed(kb.inputs[0].shape, tensor_ops._perm(plan_call(kb)))
    copy_view(kb, 0, strides, shape)


@lowering("DepthToSpace", "SpaceToDepth")
def lower_depth_space(kb: KernelBuilder) -> None:
    """The reference's Reshape to 6-D, Transpose, Reshape to 4-D: a Transpose of the 6-D view."""
    to_space = kb.node.op == "DepthToSpace"
    mode, b, _ = tensor_ops._depth_space_plan(plan_call(kb), to_space)
    n, c, h, w = kb.inputs[0].shape
    if to_space:
        view, perm = ((n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)) if mode == "DCR" else \
            ((n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3))
    else:
        view = (n, c, h // b, b, w // b, b)
        perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    shape, strides = transposed(view, perm)
    copy_view(kb, 0, strides, shape)


@lowering("Slice")
def lower_slice(kb: KernelBuilder) -> None:
    """Per axis the clamped (start, step) of the plan: from the first selected element, step * stride apart."""
    in_shape = kb.inputs[0].shape
    picked = [range(int(d))[s] for d, s in zip(in_shape, tensor_ops._slice_plan(plan_call(kb)))]
    if any(len(r) == 0 for r in picked):
        return
    strides = strides_of(in_shape)
    offset = sum(r.start * s for r, s in zip(picked, strides))
    copy_view(kb, offset, [r.step * s for r, s in zip(picked, strides)])


@lowering("Split")
def lower_split(kb: KernelBuilder) -> None:
    """Output j is the input from (the sizes of the outputs before j) along the axis, with the input's strides.
    The sizes are the outputs' (inferred by the plan), so the kernel does not read the split input."""
    in_shape = kb.inputs[0].shape
    axis = kb.attrs["axis"] % len(in_shape)
    strides = strides_of(in_shape)
    start = 0
    for j, out in enumerate(kb.outputs):
        copy_view(kb, start * strides[axis], strides, out_index=j)
        start += out.shape[axis]


@lowering("Expand")
def lower_expand(kb: KernelBuilder) -> None:
    """Stride 0 on broadcast dims (the output type holds the broadcast shape: the shape input is not read)."""
    copy_view(kb, 0, broadcast_strides(kb.inputs[0].shape, kb.outputs[0].shape))


@lowering("Tile")
def lower_tile(kb: KernelBuilder) -> None:
    """The output viewed as (repeat r_k, dim d_k) pairs reads input index i_k whatever the repeat (r_k is the
    ratio of the output and input dims: the repeats input is not read)."""
    in_shape, out = kb.inputs[0].shape, kb.outputs[0]
    if out.size == 0:
        return
    view = [n for d, o in zip(in_shape, out.shape) for n in (o // d, d)]
    copy_view(kb, 0, [n for s in strides_of(in_shape) for n in (0, s)], view)


@lowering("Pad")
def lower_pad(kb: KernelBuilder) -> None:
    call = plan_call(kb)
    mode, plan, out_shape = tensor_ops._pad_plan(call)
    if mode != "constant":
        lower_by_table(kb)
        return
    x, out = kb.inputs[0], kb.outputs[0]
    value = call.value(2)
    value = 0 if value is None or value.size == 0 else value.reshape(-1)[0]
    pattern = np.asarray(value, dtype=x.dtype.numpy).tobytes()
    # per dim as in the reference: the kept input range [start, start + count) lands at output index `at`
    dims = []
    for d, (begin, end), o in zip(x.shape, plan, out_shape):
        start = max(-begin, 0)
        count = max(max(d + min(end, 0), 0) - start, 0)
        dims.append([int(o), max(begin, 0), count, start, int(d)])
    pad_dims(kb, out, x, merge_unpadded(dims) or [[1, 0, 1, 0, 1]], pattern)  # a scalar: one element


def merge_unpadded(dims: list[list[int]]) -> list[list[int]]:
    """[out dim, at, count, start, in dim] per dim, each dim that copies its whole input unpadded merged into the
    one before it (same layout in both: the data of the outer dim's index is a contiguous run in both)."""
    merged = [list(dims[0])] if dims else []
    for o, at, count, start, d in dims[1:]:
        if at == 0 and start == 0 and count == o == d:
            merged[-1] = [n * o for n in merged[-1]]
        else:
            merged.append([o, at, count, start, d])
    return merged


def pad_dims(kb: KernelBuilder, out: Buffer, x: Buffer, dims: list[list[int]], pattern: bytes) -> None:
    """Write the output of constant Pad: along each dim the fill before the data, the data (the next dim's loop,
    at the last dim one run copy) and the fill after it."""
    if any(count == 0 for _, _, count, _, _ in dims):
        fill(kb, out, 0, out.size, pattern)
        return
    out_strides = strides_of([o for o, *_ in dims])
    in_strides = strides_of([d for *_, d in dims])

    def level(k: int, d_off: ir.Value, s_off: ir.Value) -> None:
        o, at, count, start, _ = dims[k]
        inner = out_strides[k]
        fill(kb, out, d_off, at * inner, pattern)
        first_d = kb.b.add(d_off, kb.i64(at * inner))
        first_s = kb.b.add(s_off, kb.i64(start * in_strides[k]))
        if k == len(dims) - 1:
            copy_strided(kb, out, first_d, [1], x, first_s, [1], [count])
        else:
            with kb.loop(count, f"p{k}") as i:
                level(k + 1, kb.linear([i], [inner], first_d), kb.linear([i], [in_strides[k]], first_s))
        fill(kb, out, kb.b.add(d_off, kb.i64((at + count) * inner)), (o - at - count) * inner, pattern)

    level(0, kb.i64(0), kb.i64(0))


# ----------------------------------------------------------------------------------------------------------
# Fallback: the compile-time index table
# ----------------------------------------------------------------------------------------------------------

FILL_ATTR = {"Resize": "extrapolation_value"}
FILL_INPUT = {"Pad": 2}


def index_table(kb: KernelBuilder, output_index: int = 0) -> tuple[np.ndarray, float]:
    """(table, fill): out.flat[i] = in.flat[table[i]] where table[i] >= 0, else fill."""
    node = kb.node
    data = node.inputs[0]
    arrays = []
    for i, value in enumerate(node.inputs):
        if value is None:
            arrays.append(None)
        elif i == 0:
            arrays.append(np.arange(1, data.type.size + 1, dtype=np.int64).reshape(data.type.shape))
        elif kb.const_input(i) is not None:
            # the fill value is applied by the kernel; in index space it is 0 (the "no source" marker)
            arrays.append(np.zeros(value.const.shape, np.int64) if FILL_INPUT.get(node.op) == i else value.const)
        else:
            raise ShapeError(f"input {i} ('{value.name}') must be known at compile time for this kernel",
                             hint="its value decides which elements move; make it an initializer")
    fill_value = 0.0
    saved = dict(node.attrs)
    try:
        if node.op in FILL_ATTR:
            fill_value = float(kb.attrs.get(FILL_ATTR[node.op], 0.0))
            node.attrs[FILL_ATTR[node.op]] = 0.0
        result = evaluate_node(node, arrays)[output_index]
    finally:
        node.attrs = saved
    if node.op in FILL_INPUT:
        const = kb.const_input(FILL_INPUT[node.op])
        fill_value = float(const.reshape(-1)[0]) if const is not None and const.size else 0.0
    return (result.astype(np.int64) - 1).reshape(-1), fill_value


def gather_through_table(kb: KernelBuilder, table: np.ndarray, fill: float, out_index: int = 0) -> None:
    src, dst = kb.inputs[0], kb.outputs[out_index]
    if table.size == 0:
        return
    if np.array_equal(table, np.arange(table.size)):
        copy_bytes(kb, dst.ptr, src.ptr, dst.type.nbytes)
        return
    has_fill = bool((table < 0).any())
    table_ptr = kb.table(table.astype(np.int32), "idx")
    with kb.loop(table.size) as i:
        j = kb.b.sext(kb.b.load(kb.b.gep(table_ptr, [i], source_etype=I32), typ=I32), I64)
        if has_fill:
            inside = kb.b.icmp_signed(">=", j, kb.i64(0))
            safe = kb.b.select(inside, j, kb.i64(0))
            value = kb.b.select(inside, kb.load(src, safe), kb.const(src.dtype, fill))
        else:
            value = kb.load(src, j)
        kb.store(dst, i, value)


@lowering("Trilu")
def lower_by_table(kb: KernelBuilder) -> None:
    for out_index in range(len(kb.outputs)):
        table, fill_value = index_table(kb, out_index)
        gather_through_table(kb, table, fill_value, out_index)


@lowering("Concat")
def lower_concat(kb: KernelBuilder) -> None:
    """Copy each input's contiguous block per outer index."""
    out = kb.outputs[0]
    axis = kb.attrs["axis"] % out.type.rank
    outer = int(np.prod(out.shape[:axis], dtype=np.int64))
    inner_out = int(np.prod(out.shape[axis:], dtype=np.int64)) * out.type.dtype.itemsize
    offset = 0
    for buf in kb.inputs:
        if buf is None or buf.size == 0:
            continue
        block = int(np.prod(buf.shape[axis:], dtype=np.int64)) * buf.type.dtype.itemsize
        with kb.loop(outer) as o:
            dst = kb.b.gep(out.ptr, [kb.b.add(kb.b.mul(o, kb.i64(inner_out)), kb.i64(offset))],
                           source_etype=ir.IntType(8))
            src = kb.b.gep(buf.ptr, [kb.b.mul(o, kb.i64(block))], source_etype=ir.IntType(8))
            copy_bytes(kb, dst, src, block)
        offset += block
