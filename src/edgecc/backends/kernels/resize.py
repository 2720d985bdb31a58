"""Resize and Upsample. Scales, sizes and roi are compile-time constants (inference needs them), so the whole
sampling pattern is known when the kernel is built:

- nearest: movement.py's compile-time index table (the reference run on an index tensor). The table of a
  resize is separable (the source index along each axis depends only on the output index along that axis),
  so it is factored into one small table per axis (an output-size table would cost 4 bytes per output
  element); a table that does not factor (never seen) is used whole.
- linear / cubic (with antialias, exclude_outside, every coordinate mode): per resized axis a table of
  (input index, weight) taps per output index, the nonzero entries of the reference's interpolation matrix,
  applied separably per output element: innermost the first axis the reference resamples, as it does.
  Float data is interpolated in f32 (the reference uses float64: a few f32 ulp apart); 8/16-bit integers in
  f32 and int32/int64 in f64, then rounded half to even and saturated as the reference does.
  The tables come from the reference's own helpers in edgecc.ops.resize; each kernel's tables are checked
  against the reference on a random probe of the real shape (up to VERIFY_MAX_ELEMENTS outputs).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import F32, F64, I8, I32, I64, KernelBuilder, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.movement import copy_bytes, gather_through_table, index_table
from edgecc.backends.kernels.quant import at, clamp_float, entry_alloca, fconst, nan_to_zero, node_call, \
    round_half_even, to_float
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from edgecc.ops.apply import evaluate_node

VERIFY_MAX_ELEMENTS = 1 << 20
"""Interpolation tables are checked against the reference for outputs up to this size."""

_BITS = {1: I8, 2: ir.IntType(16), 4: I32, 8: I64}


@lowering("Resize", "Upsample")
def lower_resize(kb: KernelBuilder) -> None:
    if kb.outputs[0].size == 0:
        return
    if kb.attrs["mode"] == "nearest":
        _lower_nearest(kb)
    else:
        _lower_interpolating(kb)


# ---------------------------------------------------------------------------------------------------------------
# nearest


def factor_table(table: np.ndarray, in_shape, out_shape) -> list[np.ndarray] | None:
    """Per output axis, the source index along that axis for each output index (-1: outside, the fill value),
    such that table == sum_a tables[a][o_a] * in_stride[a] (or -1 when any is -1); None if no such factoring.
    Each axis is read off one line through the first element that has a source, then the whole table is
    checked against the factors."""
    out_shape = tuple(int(d) for d in out_shape)
    inside_flat = table >= 0
    if not inside_flat.any() or not in_shape:
        return None
    grid = table.reshape(out_shape)
    first = np.unravel_index(int(np.argmax(inside_flat)), out_shape)
    in_strides = strides_of(in_shape)
    tables = []
    for a in range(len(out_shape)):
        line = grid[tuple(slice(None) if k == a else int(i) for k, i in enumerate(first))]
        tables.append(np.where(line >= 0, (line // in_strides[a]) % in_shape[a], -1).astype(np.int64))
    rebuilt = np.zeros(out_shape, np.int64)
    inside = np.ones(out_shape, bool)
    for a, (t, stride) in enumerate(zip(tables, in_strides)):
        shape = [1] * len(out_shape)
        shape[a] = out_shape[a]
        rebuilt += (np.maximum(t, 0) * stride).reshape(shape)
        inside &= (t >= 0).reshape(shape)
    np.putmask(rebuilt, ~inside, -1)
    return tables if np.array_equal(rebuilt.reshape(-1), table) else None


def _fill_bits(dtype: DType, fill: float) -> int:
    """The bit pattern of the fill value in `dtype` (the reference's np.asarray(fill).astype(dtype))."""
    value = np.asarray(fill).astype(dtype.numpy).reshape(1)
    return int(value.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize])[0])


def _lower_nearest(kb: KernelBuilder) -> None:
    x, out = kb.inputs[0], kb.outputs[0]
    table, fill = index_table(kb)
    tables = factor_table(table, x.shape, out.shape)
    if tables is None:
        gather_through_table(kb, table, fill)
        return
    if np.array_equal(table, np.arange(table.size)):
        copy_bytes(kb, out.ptr, x.ptr, out.type.nbytes)
        return
    b = kb.b
    bits = _BITS[x.dtype.itemsize]
    fill_value = ir.Constant(bits, _fill_bits(x.dtype, fill))
    in_strides = strides_of(x.shape)
    ptrs = [None if np.array_equal(t, np.arange(t.size)) else kb.table(t.astype(np.int32), "rsz")
            for t in tables]
    may_fill = [bool((t < 0).any()) for t in tables]

    def source(a, o):
        """(index along axis a, inside?) for output index o."""
        if ptrs[a] is None:
            return o, None
        s = b.sext(b.load(at(kb, ptrs[a], I32, o), typ=I32), I64)
        return s, (b.icmp_signed(">=", s, kb.i64(0)) if may_fill[a] else None)

    def both(p, q):
        return q if p is None else p if q is None else b.and_(p, q)

    with kb.loop_nest(out.shape[:-1], "o") as lead:
        base, inside = kb.i64(0), None
        for a, o in enumerate(lead):
            s, ok = source(a, o)
            base = b.add(base, b.mul(s, kb.i64(in_strides[a])))
            inside = both(inside, ok)
        row = kb.linear(lead, strides_of(out.shape)[:-1])
        with kb.loop(out.shape[-1], "w") as j:
            s, ok = source(len(lead), j)
            ok = both(inside, ok)
            src = b.add(base, s)
            if ok is not None:
                src = b.select(ok, src, kb.i64(0))
            value = b.load(at(kb, x.ptr, bits, src), typ=bits)
            if ok is not None:
                value = b.select(ok, value, fill_value)
            b.store(value, at(kb, out.ptr, bits, b.add(row, j)))


# ---------------------------------------------------------------------------------------------------------------
# linear and cubic


class _AxisTaps:
    """One resized axis: taps[o, t] input indices and weights[o, t], and the outputs outside the roi."""

    def __init__(self, axis: int, taps: np.ndarray, weights: np.ndarray, outside: np.ndarray | None):
        self.axis, self.taps, self.weights, self.outside = axis, taps, weights, outside


def axis_taps(kb: KernelBuilder) -> tuple[list[_AxisTaps], dict]:
    """The resized axes in the order the reference resamples them, with their taps; and the attributes."""
    from edgecc.ops import resize as ref

    call = node_call(kb)
    if kb.node.op == "Upsample":
        call = ref._upsample_call(call)
        mode, coord, shape, plans = ref._resize_plan(call, scales_input=1, sizes_input=None, roi_input=None)
    else:
        mode, coord, shape, plans = ref._resize_plan(call, scales_input=2, sizes_input=3, roi_input=1)
    if tuple(shape) != kb.outputs[0].shape:
        raise EdgeccError(f"internal: Resize plan gives shape {list(shape)}, the IR says "
                          f"{list(kb.outputs[0].shape)}")
    in_shape = kb.inputs[0].shape
    result = []
    for p in plans:
        in_len = in_shape[p.axis]
        if ref._is_identity(coord, p, in_len):
            continue
        src, outside = ref._source_coords(coord, p, in_len)
        matrix = ref._interpolation_matrix(src, in_len, mode, p.scale, call.attrs)
        count = max(int((matrix != 0).sum(axis=1).max(initial=0)), 1)
        order = np.argsort(matrix == 0, axis=1, kind="stable")[:, :count]
        result.append(_AxisTaps(p.axis, order.astype(np.int32), np.take_along_axis(matrix, order, axis=1),
                                outside if outside is not None and outside.any() else None))
    return result, call.attrs


def _apply_numpy(x: np.ndarray, axes: list[_AxisTaps], fill: float, out_dtype) -> np.ndarray:
    """The kernel's computation in NumPy float64 (to check the tables against the reference)."""
    y = x.astype(np.float64)
    outside = np.zeros((), bool)
    for ax in axes:
        shape = [1] * y.ndim
        shape[ax.axis] = ax.taps.shape[0]
        acc = 0.0
        for t in range(ax.taps.shape[1]):
            acc = acc + ax.weights[:, t].reshape(shape) * np.take(y, ax.taps[:, t], axis=ax.axis)
        y = acc
        if ax.outside is not None:
            outside = outside | ax.outside.reshape(shape)
    y = np.where(outside, fill, y)
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        y = np.clip(np.round(y), info.min, info.max)
    return y.astype(out_dtype)


def _verify(kb: KernelBuilder, axes: list[_AxisTaps], fill: float) -> None:
    x, out = kb.inputs[0], kb.outputs[0]
    if out.size > VERIFY_MAX_ELEMENTS or x.size > VERIFY_MAX_ELEMENTS:
        return
    rng = np.random.default_rng(0)
    dtype = x.dtype.numpy
    if x.dtype.is_float:
        probe = rng.standard_normal(x.shape).astype(dtype)
    else:
        lo = 0 if x.dtype is DType.uint8 else -100
        probe = rng.integers(lo, lo + 200, size=x.shape).astype(dtype)
    arrays = [probe] + [None if v is None else v.const for v in kb.node.inputs[1:]]
    with np.errstate(all="ignore"):
        want = evaluate_node(kb.node, arrays)[0].astype(np.float64)
        got = _apply_numpy(probe, axes, fill, dtype).astype(np.float64)
    tol = 1 if not x.dtype.is_float else 1e-3 * (1 + np.abs(want))
    if want.shape != got.shape or not np.all(np.abs(want - got) <= tol):
        raise EdgeccError(f"internal: the {kb.node.op} interpolation tables disagree with the reference",
                          hint="edgecc.ops.resize changed; update edgecc.backends.kernels.resize.axis_taps")


def _lower_interpolating(kb: KernelBuilder) -> None:
    x, out = kb.inputs[0], kb.outputs[0]
    axes, attrs = axis_taps(kb)
    fill = float(attrs.get("extrapolation_value", 0.0))
    _verify(kb, axes, fill)
    if not axes:
        copy_bytes(kb, out.ptr, x.ptr, out.type.nbytes)
        return
    ct = F64 if x.dtype in (DType.int32, DType.int64) else F32
    wdtype = np.float64 if ct == F64 else np.float32
    b = kb.b
    in_strides = strides_of(x.shape)
    resized = {ax.axis for ax in axes}
    ptrs = [(kb.table(ax.taps.reshape(-1), "rtap"), kb.table(ax.weights.reshape(-1).astype(wdtype), "rw"))
            for ax in axes]
    masks = [None if ax.outside is None else kb.table(ax.outside.astype(np.uint8), "rout") for ax in axes]
    accs = [entry_alloca(kb, ct, name=f"acc{level}") for level in range(len(axes))]

    with kb.loop_nest(out.shape, "o") as pos:
        base = kb.linear([p for a, p in enumerate(pos) if a not in resized],
                         [s for a, s in enumerate(in_strides) if a not in resized])

        def level(lv: int, offset: ir.Value) -> ir.Value:
            ax = axes[lv]
            count = ax.taps.shape[1]
            taps_ptr, w_ptr = ptrs[lv]
            acc = accs[lv]
            b.store(fconst(ct, 0.0), acc)
            row = b.mul(pos[ax.axis], kb.i64(count))
            with kb.loop(count, f"t{lv}") as t:
                e = b.add(row, t)
                src = b.sext(b.load(at(kb, taps_ptr, I32, e), typ=I32), I64)
                weight = b.load(at(kb, w_ptr, ct, e), typ=ct)
                where = b.add(offset, b.mul(src, kb.i64(in_strides[ax.axis])))
                if lv == 0:
                    inner = to_float(kb, x.dtype, kb.load(x, where), ct)
                else:
                    inner = level(lv - 1, where)
                b.store(b.fadd(b.load(acc, typ=ct), b.fmul(weight, inner, flags=("fast",)), flags=("fast",)), acc)
            return b.load(acc, typ=ct)

        value = level(len(axes) - 1, base)
        outside = None
        for ax, mask in zip(axes, masks):
            if mask is not None:
                flag = b.icmp_unsigned("!=", b.load(at(kb, mask, I8, pos[ax.axis]), typ=I8), ir.Constant(I8, 0))
                outside = flag if outside is None else b.or_(outside, flag)
        if outside is not None:
            value = b.select(outside, fconst(ct, fill), value)
        flat = kb.linear(pos, strides_of(out.shape))
        if out.dtype.is_float:
            kb.store(out, flat, value if ct == F32 else b.fptrunc(value, F32))
        else:
            info = np.iinfo(out.dtype.numpy)
            hi = float(info.max) if info.max < 2 ** 53 else float(np.nextafter(np.float64(2.0 ** 63), 0))
            q = clamp_float(kb, nan_to_zero(kb, round_half_even(kb, value)), float(info.min), hi)
            width = out.dtype.itemsize * 8
            kb.store(out, flat, b.fptoui(q, ir.IntType(width)) if out.dtype is DType.uint8
                     else b.fptosi(q, ir.IntType(width)))
