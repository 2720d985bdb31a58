"""Data-movement ops. With static shapes and constant parameters, every output element of a pure data-movement
op is one input element (or a fill value): the map is computed at compile time by running the op's NumPy
reference on an index tensor, and the kernel is one gather loop through that table. Reshape-like ops copy."""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import I32, I64, KernelBuilder
from edgecc.backends.kernels import lowering
from edgecc.errors import ShapeError
from edgecc.ops.apply import evaluate_node


def copy_bytes(kb: KernelBuilder, dst, src, nbytes: int) -> None:
    memcpy = kb.module.declare_intrinsic("llvm.memcpy", [dst.type, src.type, I64])
    kb.b.call(memcpy, [dst, src, kb.i64(nbytes), ir.Constant(ir.IntType(1), 0)])


@lowering("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
def lower_copy(kb: KernelBuilder) -> None:
    """Same bytes, new shape: one memcpy (the memory planner may later alias instead)."""
    copy_bytes(kb, kb.outputs[0].ptr, kb.inputs[0].ptr, kb.outputs[0].type.nbytes)


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
    fill = 0.0
    saved = dict(node.attrs)
    try:
        if node.op in FILL_ATTR:
            fill = float(kb.attrs.get(FILL_ATTR[node.op], 0.0))
            node.attrs[FILL_ATTR[node.op]] = 0.0
        result = evaluate_node(node, arrays)[output_index]
    finally:
        node.attrs = saved
    if node.op in FILL_INPUT:
        const = kb.const_input(FILL_INPUT[node.op])
        fill = float(const.reshape(-1)[0]) if const is not None and const.size else 0.0
    return (result.astype(np.int64) - 1).reshape(-1), fill


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


@lowering("Transpose", "Slice", "Tile", "Expand", "Pad", "DepthToSpace", "SpaceToDepth", "Trilu", "Split")
def lower_by_table(kb: KernelBuilder) -> None:
    for out_index in range(len(kb.outputs)):
        table, fill = index_table(kb, out_index)
        gather_through_table(kb, table, fill, out_index)


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
