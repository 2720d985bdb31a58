"""Gather and GatherElements with run-time indices (negative indices wrap); constant indices small enough to
key the kernel go through movement.py's compile-time index table instead. Also the generated tensors
ConstantOfShape and Range, which reach code generation only when too large to fold (see the section below).

Indices outside [-dim, dim) are an error in the reference. Generated code cannot report it (kernels return
nothing), so such an index is clamped into the axis: memory stays safe, the value is that of the nearest edge.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, F16, F32, F64, I64, STORAGE, KernelBuilder, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.movement import copy_bytes, gather_through_table, index_table
from edgecc.errors import ShapeError
from edgecc.ir.dtypes import DType

TABLE_MAX_ELEMENTS = 1 << 16
"""Constant indices use a compile-time table (4 bytes per output element) up to this output size."""


def load_index(kb: KernelBuilder, idx, flat, dim: int):
    """indices[flat] as an i64 in [0, dim): negatives wrap, out-of-range values are clamped."""
    b = kb.b
    k = kb.convert(idx.dtype, DType.int64, kb.load(idx, flat))
    k = b.select(b.icmp_signed("<", k, kb.i64(0)), b.add(k, kb.i64(dim)), k)
    k = b.select(b.icmp_signed("<", k, kb.i64(0)), kb.i64(0), k)
    return b.select(b.icmp_signed(">", k, kb.i64(dim - 1)), kb.i64(dim - 1), k)


def _axis(kb: KernelBuilder) -> int:
    rank = kb.inputs[0].type.rank
    axis = kb.attrs["axis"]
    return axis + rank if axis < 0 else axis


def _use_table(kb: KernelBuilder) -> bool:
    return kb.const_input(1) is not None and kb.outputs[0].size <= TABLE_MAX_ELEMENTS


def _check_axis(kb: KernelBuilder, dim: int) -> None:
    if dim == 0:
        raise ShapeError(f"{kb.node.op} picks from an empty axis", hint="every index is out of bounds")


def _handled_without_loops(kb: KernelBuilder, dim: int) -> bool:
    """Empty outputs need no code; constant indices go through a compile-time index table (movement.py)."""
    if kb.outputs[0].size == 0:
        return True
    _check_axis(kb, dim)
    if _use_table(kb):
        table, fill = index_table(kb)
        gather_through_table(kb, table, fill)
        return True
    return False


def _operands_needing_loops(kb: KernelBuilder):
    """(data, indices, output, axis, axis size) of Gather/GatherElements, or None when _handled_without_loops
    already emitted the kernel."""
    data, idx = kb.inputs
    axis = _axis(kb)
    if _handled_without_loops(kb, data.shape[axis]):
        return None
    return data, idx, kb.outputs[0], axis, data.shape[axis]


@lowering("Gather")
def lower_gather(kb: KernelBuilder) -> None:
    """out[o, j, i] = data[o, idx[j], i] over (outer, indices, inner): one block copy per index."""
    operands = _operands_needing_loops(kb)
    if operands is None:
        return
    data, idx, out, axis, dim = operands
    outer = int(np.prod(data.shape[:axis], dtype=np.int64))
    inner = int(np.prod(data.shape[axis + 1:], dtype=np.int64))
    count = idx.size
    item = data.dtype.itemsize
    b = kb.b
    ty = STORAGE[data.dtype]
    with kb.loop(outer, "o") as o, kb.loop(count, "j") as j:
        k = load_index(kb, idx, j, dim)
        src = b.mul(b.add(b.mul(o, kb.i64(dim)), k), kb.i64(inner))
        dst = b.mul(b.add(b.mul(o, kb.i64(count)), j), kb.i64(inner))
        if inner == 1:
            b.store(b.load(kb.element_ptr(data, src), typ=ty), kb.element_ptr(out, dst))
        else:
            copy_bytes(kb, kb.element_ptr(out, dst), kb.element_ptr(data, src), inner * item)


@lowering("GatherElements")
def lower_gather_elements(kb: KernelBuilder) -> None:
    """out[p] = data[p with p[axis] replaced by idx[p]] for every index position p."""
    operands = _operands_needing_loops(kb)
    if operands is None:
        return
    data, idx, out, axis, dim = operands
    d_strides = strides_of(data.shape)
    o_strides = strides_of(out.shape)
    b = kb.b
    with kb.loop_nest(out.shape, "d") as pos:
        flat = kb.linear(pos, o_strides)
        k = load_index(kb, idx, flat, dim)
        src = kb.linear([k if a == axis else p for a, p in enumerate(pos)], d_strides)
        b.store(b.load(kb.element_ptr(data, src), typ=STORAGE[data.dtype]), kb.element_ptr(out, flat))


# ---------------------------------------------------------------------------------------------------------------
# Generated tensors. Their inputs are compile-time constants, so fold-constants evaluates them, except when the
# result exceeds its max-elements bound (16M elements): e.g. the model-zoo AlexNet/VGG/ZFNet builds its
# fully-connected weights with ConstantOfShape. Those reach code generation and are filled at run time.


@lowering("ConstantOfShape")
def lower_constant_of_shape(kb: KernelBuilder) -> None:
    """Fill with the one-element `value` attribute (default float32 0): a memset when its bytes are all equal."""
    out = kb.outputs[0]
    if out.size == 0:
        return
    value = kb.attrs.get("value")
    value = np.zeros(1, out.dtype.numpy) if value is None else np.asarray(value).reshape(-1)[:1]
    raw = value.astype(out.dtype.numpy).tobytes()
    b = kb.b
    if len(set(raw)) == 1:
        memset = kb.module.declare_intrinsic("llvm.memset", [out.ptr.type, I64])
        b.call(memset, [out.ptr, ir.Constant(ir.IntType(8), raw[0]), kb.i64(out.type.nbytes),
                        ir.Constant(ir.IntType(1), 0)])
        return
    bits = ir.IntType(8 * len(raw))
    fill = ir.Constant(bits, int.from_bytes(raw, "little"))
    with kb.loop(out.size) as i:
        b.store(fill, b.gep(out.ptr, [i], inbounds=True, source_etype=bits))


@lowering("Range")
def lower_range(kb: KernelBuilder) -> None:
    """start + i * delta: integers in wrapping int64; floats in the reference's precision (float64, or float32
    for float16 with stash_type 1), rounded once to the output type."""
    out = kb.outputs[0]
    if out.size == 0:
        return
    values = [kb.const_input(i) for i in range(3)]
    if any(v is None for v in values):
        raise ShapeError("Range's start, limit and delta must be known at compile time",
                         hint="its output length depends on them")
    start, delta = (np.asarray(values[0]).reshape(-1)[0], np.asarray(values[2]).reshape(-1)[0])
    b = kb.b
    if not out.dtype.is_float:
        width = COMPUTE[out.dtype]
        with kb.loop(out.size) as i:
            v = b.add(kb.i64(int(start)), b.mul(i, kb.i64(int(delta))))
            kb.store(out, i, v if width == I64 else b.trunc(v, width))
        return
    wide = out.dtype is DType.float32 or kb.attrs["stash_type"] != 1
    ty = F64 if wide else F32
    np_ty = np.float64 if wide else np.float32
    first, step = ir.Constant(ty, float(np_ty(start))), ir.Constant(ty, float(np_ty(delta)))
    with kb.loop(out.size) as i:
        v = b.fadd(first, b.fmul(b.sitofp(i, ty), step))  # no fast-math: one rounding per operation
        if out.dtype is DType.float16:
            b.store(b.fptrunc(v, F16), b.gep(out.ptr, [i], inbounds=True, source_etype=F16))
        else:
            kb.store(out, i, b.fptrunc(v, F32) if wide else v)
