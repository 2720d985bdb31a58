"""Reductions and ops that work along an axis: Reduce{L2,Max,Mean,Min,Prod,Sum,SumSquare}, ArgMax/ArgMin,
TopK, CumSum, Softmax/LogSoftmax, GlobalAveragePool/GlobalMaxPool.

Two loop engines, both keeping the innermost loop over contiguous memory:

- `emit_reduce` (the Reduce ops and the global pools) merges adjacent dims into alternating kept / reduced
  groups. When the last group is reduced, each output element is one scalar accumulation whose innermost loop
  runs over contiguous input (a vectorisable reduction). When the last group is kept, outputs are accumulated
  row by row: a block of up to CHUNK contiguous outputs lives in a stack scratch array (float32 for float16
  data) and every reduced row of the input is added into it elementwise.
- `Rows` views a tensor as [outer, n, inner] with a single axis of length n, and keeps per-lane state (one
  value per inner position, in blocks of up to CHUNK lanes) in stack scratch arrays; `along` walks the axis
  with the lanes innermost. With inner == 1 the state is a scalar that LLVM keeps in registers.

TopK keeps a binary heap per row in its outputs (O(n log k)). Float sums accumulate in float32 (float16 too);
integer sums wrap in the integer type; integer ReduceMean and ReduceL2 accumulate in float64 and truncate, like
the NumPy reference. Max/min and the max pass of ArgMax/Softmax track NaN in a separate flag (see `Extremes`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from llvmlite import ir

from edgecc.backends import mathlib
from edgecc.backends.codegen import (COMPUTE, F16, F32, F64, FAST, I1, I8, I64, UNSIGNED, Buffer, KernelBuilder,
                                    strides_of)
from edgecc.backends.kernels import lowering
from edgecc.errors import EdgeccError, ShapeError
from edgecc.ir.dtypes import DType

CHUNK = 128
"""Lanes (contiguous inner positions) per block of stack scratch state."""

# FAST (codegen): float flags of accumulations: reassociation, so LLVM vectorises them, without `nnan`/`ninf`.

EXACT = ("contract",)
"""Float flags of elementwise arithmetic: IEEE results (reassociating (x - max) - log(sum) into
x - (max + log(sum)) loses the digits of x), only fused multiply-adds allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def entry_alloca(kb: KernelBuilder, ty: ir.Type, count: int = 1, name: str = "scratch") -> ir.Value:
    """A stack array of `count` values of `ty`, allocated in the function's entry block (so loops never grow
    the stack, and scalars are promoted to registers)."""
    b = kb.b
    block = b.block
    b.position_at_start(kb.function.entry_basic_block)
    ptr = b.alloca(ty, size=ir.Constant(I64, int(count)), name=name)
    b.position_at_end(block)
    return ptr


class State:
    """A per-lane scratch array of one LLVM type (i1 flags are stored as bytes, which vectorise)."""

    def __init__(self, kb: KernelBuilder, ty: ir.Type, count: int, name: str = "state"):
        self.kb, self.ty = kb, ty
        self.mem = I8 if ty == I1 else ty
        self.ptr = entry_alloca(kb, self.mem, count, name)

    def _at(self, j: ir.Value) -> ir.Value:
        return self.kb.b.gep(self.ptr, [j], inbounds=True, source_etype=self.mem)

    def get(self, j: ir.Value) -> ir.Value:
        raw = self.kb.b.load(self._at(j), typ=self.mem)
        return self.kb.b.trunc(raw, I1) if self.ty == I1 else raw

    def set(self, j: ir.Value, value: ir.Value) -> None:
        self.kb.b.store(self.kb.b.zext(value, I8) if self.ty == I1 else value, self._at(j))


def add(kb: KernelBuilder, dtype: DType, a: ir.Value, c: ir.Value, flags: tuple = FAST) -> ir.Value:
    return kb.b.fadd(a, c, flags=flags) if dtype.is_float else kb.b.add(a, c)


def mul(kb: KernelBuilder, dtype: DType, a: ir.Value, c: ir.Value) -> ir.Value:
    return kb.b.fmul(a, c, flags=FAST) if dtype.is_float else kb.b.mul(a, c)


def intrinsic(kb: KernelBuilder, name: str, *args: ir.Value, fastmath: tuple = ()) -> ir.Value:
    ty = args[0].type
    fn = kb.module.declare_intrinsic(name, [ty], ir.FunctionType(ty, [ty] * len(args)))
    return kb.b.call(fn, list(args), fastmath=fastmath)


def nan_free_max(kb: KernelBuilder, a: ir.Value, c: ir.Value, largest: bool = True) -> ir.Value:
    """maxnum / minnum flagged `nnan` so LLVM vectorises reductions of it. Only for values whose NaNs are
    tracked separately (`is_nan` of the raw input, ORed into a flag that selects NaN at the end): with a NaN
    operand the result is poison, which that final select never picks."""
    return intrinsic(kb, "llvm.maxnum" if largest else "llvm.minnum", a, c, fastmath=("nnan", "nsz"))


def is_nan(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    return kb.b.fcmp_unordered("uno", x, x)


def fconst(value: float, ty: ir.Type = F32) -> ir.Constant:
    return ir.Constant(ty, float(np.float32(value)) if ty == F32 else float(value))


def extreme(dtype: DType, largest: bool) -> ir.Constant:
    """The largest (or smallest) value of `dtype`'s compute type: -inf/+inf, the integer limits, False/True.
    The smallest is the identity of max, the largest that of min."""
    ty = COMPUTE[dtype]
    if dtype.is_float:
        return ir.Constant(ty, float("inf" if largest else "-inf"))
    if dtype is DType.bool:
        return ir.Constant(ty, int(largest))
    info = np.iinfo(dtype.numpy)
    return ir.Constant(ty, int(info.max if largest else info.min))


def to_f64(kb: KernelBuilder, dtype: DType, x: ir.Value) -> ir.Value:
    if dtype.is_float:
        return kb.b.fpext(x, F64)
    return kb.b.uitofp(x, F64) if dtype in UNSIGNED else kb.b.sitofp(x, F64)


def f64_to_int(kb: KernelBuilder, dtype: DType, x: ir.Value) -> ir.Value:
    """float64 -> integer compute type, truncating toward zero."""
    ty = COMPUTE[dtype]
    return kb.b.fptoui(x, ty) if dtype in UNSIGNED else kb.b.fptosi(x, ty)


def const_ints(kb: KernelBuilder, index: int, what: str) -> np.ndarray | None:
    """Input `index` as a flat int64 array; None when absent; ShapeError when not a compile-time constant."""
    value = kb.node.input(index)
    if value is None:
        return None
    const = kb.const_input(index)
    if const is None:
        raise ShapeError(f"{what} (input {index}, '{value.name}') must be known at compile time for the native "
                         f"{kb.node.op} kernel", hint="make it a constant or initializer")
    return np.asarray(const).reshape(-1).astype(np.int64)


def norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < max(rank, 1):
        raise EdgeccError(f"{op} axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def prod(values: Sequence[int]) -> int:
    return int(np.prod(values, dtype=np.int64)) if len(values) else 1


def min_i64(kb: KernelBuilder, a: ir.Value, c: ir.Value) -> ir.Value:
    return kb.b.select(kb.b.icmp_signed("<", a, c), a, c)


# ---------------------------------------------------------------------------------------------------------------
# Engine 1: reductions over any set of axes


@dataclass
class Acc:
    """How to reduce: accumulator types and initial values, a step (accs, x) -> accs on each input value
    (compute type), and a finish accs -> output value (the output's compute type)."""

    types: list[ir.Type]
    init: list[ir.Value]
    step: Callable[[list[ir.Value], ir.Value], list[ir.Value]]
    finish: Callable[[list[ir.Value]], ir.Value]
    load: Callable[[Buffer, ir.Value], ir.Value] | None = None
    """How to read an input element (default: kb.load, the compute type)."""


def merged_groups(shape: Sequence[int], axes: set[int]) -> list[list]:
    """Adjacent dims merged into [size, reduced] groups (size-1 dims dropped)."""
    groups: list[list] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        reduced = d in axes
        if groups and groups[-1][1] == reduced:
            groups[-1][0] *= int(size)
        else:
            groups.append([int(size), reduced])
    return groups


def emit_reduce(kb: KernelBuilder, src: Buffer, dst: Buffer, axes: set[int], acc: Acc) -> None:
    """dst = finish(fold(step, init, src over `axes`)); dst's flat layout is src's kept dims in order."""
    b = kb.b
    if dst.size == 0:
        return
    if src.size == 0:
        with kb.loop(dst.size) as i:
            kb.store(dst, i, acc.finish(list(acc.init)))
        return
    load = acc.load or kb.load
    groups = merged_groups(src.shape, axes)
    in_strides = strides_of([g[0] for g in groups])
    kept = [(g[0], s) for g, s in zip(groups, in_strides) if not g[1]]
    red = [(g[0], s) for g, s in zip(groups, in_strides) if g[1]]
    out_strides = strides_of([k[0] for k in kept])
    if not groups or groups[-1][1]:
        # Last group reduced: one scalar accumulation per output, innermost loop contiguous.
        vars_ = [State(kb, t, 1, "acc") for t in acc.types]
        zero = kb.i64(0)
        with kb.loop_nest([k[0] for k in kept], "k") as kidx:
            o = kb.linear(kidx, out_strides)
            base = kb.linear(kidx, [k[1] for k in kept])
            for v, init in zip(vars_, acc.init):
                v.set(zero, init)
            with kb.loop_nest([r[0] for r in red], "r") as ridx:
                flat = kb.linear(ridx, [r[1] for r in red], base)
                x = load(src, flat)
                for v, new in zip(vars_, acc.step([v.get(zero) for v in vars_], x)):
                    v.set(zero, new)
            kb.store(dst, o, acc.finish([v.get(zero) for v in vars_]))
        return
    # Last group kept: accumulate blocks of contiguous outputs row by row.
    inner = kept[-1][0]
    outer_kept = kept[:-1]
    chunk = min(inner, CHUNK)
    blocks = -(-inner // chunk)
    states = [State(kb, t, chunk, "acc") for t in acc.types]
    with kb.loop_nest([k[0] for k in outer_kept], "k") as kidx:
        o_base = kb.linear(kidx, out_strides[:-1])
        i_base = kb.linear(kidx, [k[1] for k in outer_kept])
        with _blocks(kb, inner, chunk, blocks) as (j0, count):
            with kb.loop(count, "j") as j:
                for s, init in zip(states, acc.init):
                    s.set(j, init)
            with kb.loop_nest([r[0] for r in red], "r") as ridx:
                row = b.add(kb.linear(ridx, [r[1] for r in red], i_base), j0)
                with kb.loop(count, "j") as j:
                    x = load(src, b.add(row, j))
                    for s, new in zip(states, acc.step([s.get(j) for s in states], x)):
                        s.set(j, new)
            out_row = b.add(o_base, j0)
            with kb.loop(count, "j") as j:
                kb.store(dst, b.add(out_row, j), acc.finish([s.get(j) for s in states]))


@contextlib.contextmanager
def _blocks(kb: KernelBuilder, inner: int, chunk: int, blocks: int) -> Iterator[tuple[ir.Value, ir.Value]]:
    """Loop over blocks of `chunk` lanes of `inner`; yields (first lane, lane count) as i64 values."""
    if blocks == 1:
        yield kb.i64(0), kb.i64(inner)
        return
    with kb.loop(blocks, "blk") as blk:
        j0 = kb.b.mul(blk, kb.i64(chunk))
        count = kb.i64(chunk) if inner % chunk == 0 else min_i64(kb, kb.i64(chunk), kb.b.sub(kb.i64(inner), j0))
        yield j0, count


def sum_acc(kb: KernelBuilder, dtype: DType, *, square: bool = False, finish=None) -> Acc:
    """Sum (of squares) in float32 for floats, wrapping in the integer type otherwise."""
    ty = COMPUTE[dtype]

    def step(accs, x):
        v = mul(kb, dtype, x, x) if square else x
        return [add(kb, dtype, accs[0], v)]

    return Acc([ty], [kb.const(dtype, 0)], step, finish or (lambda accs: accs[0]))


def f64_sum_acc(kb: KernelBuilder, dtype: DType, *, square: bool, finish) -> Acc:
    """Sum (of squares) of integers in float64, like the reference's integer ReduceMean / ReduceL2."""

    def step(accs, x):
        v = to_f64(kb, dtype, x)
        if square:
            v = kb.b.fmul(v, v, flags=FAST)
        return [kb.b.fadd(accs[0], v, flags=FAST)]

    return Acc([F64], [ir.Constant(F64, 0.0)], step, finish)


class Extremes:
    """Max or min of one dtype in a domain whose reductions LLVM vectorises well, with NaN tracked apart.

    float32: maxnum/minnum flagged `nnan` (see nan_free_max). float16: the raw bits as an int16 key, sign and
    magnitude turned into two's complement (+0 and -0 share key 0, so key equality is float equality), reduced
    with integer max/min; float16 maxnum would be narrowed by LLVM to half-precision vector ops that x86 can
    only scalarise (slow code, and very slow to compile). Integers: themselves."""

    def __init__(self, kb: KernelBuilder, dtype: DType, largest: bool):
        self.kb, self.dtype, self.largest = kb, dtype, largest
        self.half = dtype is DType.float16
        self.ty = ir.IntType(16) if self.half else COMPUTE[dtype]
        if self.half:
            inf = ir.Constant(self.ty, 0x7C00)
            self.init = ir.Constant(self.ty, -0x7C00) if largest else inf
        else:
            self.init = extreme(dtype, largest=not largest)

    def load(self, buf: Buffer, flat: ir.Value) -> ir.Value:
        kb = self.kb
        if not self.half:
            return kb.load(buf, flat)
        bits = kb.b.load(kb.element_ptr(buf, flat), typ=self.ty)
        mag = kb.b.and_(bits, ir.Constant(self.ty, 0x7FFF))
        negative = kb.b.icmp_signed("<", bits, ir.Constant(self.ty, 0))
        return kb.b.select(negative, kb.b.neg(mag), mag)

    def step(self, acc: ir.Value, v: ir.Value) -> ir.Value:
        kb = self.kb
        if self.dtype is DType.float32:
            return nan_free_max(kb, acc, v, self.largest)
        if self.half:
            return kb.b.select(kb.b.icmp_signed(">" if self.largest else "<", v, acc), v, acc)
        return (kb.select_max if self.largest else kb.select_min)(self.dtype, v, acc)

    def is_nan(self, v: ir.Value) -> ir.Value:
        """Whether a loaded value is NaN (float dtypes only)."""
        kb = self.kb
        if not self.half:
            return is_nan(kb, v)
        mag = kb.b.select(kb.b.icmp_signed("<", v, ir.Constant(self.ty, 0)), kb.b.neg(v), v)
        return kb.b.icmp_signed(">", mag, ir.Constant(self.ty, 0x7C00))

    def value(self, v: ir.Value) -> ir.Value:
        """A domain value in the dtype's compute type."""
        kb = self.kb
        if not self.half:
            return v
        negative = kb.b.icmp_signed("<", v, ir.Constant(self.ty, 0))
        mag = kb.b.select(negative, kb.b.neg(v), v)
        bits = kb.b.or_(mag, kb.b.select(negative, ir.Constant(self.ty, -0x8000), ir.Constant(self.ty, 0)))
        return kb.b.fpext(kb.b.bitcast(bits, F16), F32)

    def equal(self, a: ir.Value, c: ir.Value) -> ir.Value:
        if self.dtype is DType.float32:
            return self.kb.b.fcmp_ordered("==", a, c)
        return self.kb.b.icmp_signed("==", a, c)


def extremum_acc(kb: KernelBuilder, dtype: DType, largest: bool) -> Acc:
    """Max / min; floats carry a has-NaN flag so NaN propagates."""
    ext = Extremes(kb, dtype, largest)
    if dtype.is_float:
        def step(accs, x):
            return [ext.step(accs[0], x), kb.b.or_(accs[1], ext.is_nan(x))]

        def finish(accs):
            return kb.b.select(accs[1], ir.Constant(F32, float("nan")), ext.value(accs[0]))

        return Acc([ext.ty, I1], [ext.init, ir.Constant(I1, 0)], step, finish, ext.load)
    return Acc([ext.ty], [ext.init], lambda accs, x: [ext.step(accs[0], x)], lambda accs: accs[0], ext.load)


def reduce_acc(kb: KernelBuilder, op: str, dtype: DType, count: int) -> Acc:
    b = kb.b
    if op == "ReduceSum":
        return sum_acc(kb, dtype)
    if op == "ReduceSumSquare":
        return sum_acc(kb, dtype, square=True)
    if op == "ReduceProd":
        ty = COMPUTE[dtype]
        return Acc([ty], [kb.const(dtype, 1)], lambda accs, x: [mul(kb, dtype, accs[0], x)], lambda accs: accs[0])
    if op in ("ReduceMax", "ReduceMin"):
        return extremum_acc(kb, dtype, op == "ReduceMax")
    if op == "ReduceL2":
        if dtype.is_float:
            return sum_acc(kb, dtype, square=True, finish=lambda accs: intrinsic(kb, "llvm.sqrt", accs[0]))
        return f64_sum_acc(kb, dtype, square=True,
                           finish=lambda accs: f64_to_int(kb, dtype, intrinsic(kb, "llvm.sqrt", accs[0])))
    if op == "ReduceMean":
        if count == 0:
            # 0/0: NaN (integers: NaN cast to an integer, the type's minimum as NumPy gives on x86)
            nan = ir.Constant(F32, float("nan")) if dtype.is_float else extreme(dtype, largest=False)
            acc = sum_acc(kb, dtype) if dtype.is_float else f64_sum_acc(kb, dtype, square=False,
                                                                               finish=None)
            acc.finish = lambda accs: nan
            return acc
        if dtype.is_float:
            return sum_acc(kb, dtype, finish=lambda accs: b.fdiv(accs[0], fconst(count)))
        return f64_sum_acc(kb, dtype, square=False,
                           finish=lambda accs: f64_to_int(kb, dtype, b.fdiv(accs[0], ir.Constant(F64, count))))
    raise EdgeccError(f"no reduction named {op}")


REDUCE_OPS = ("ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")


@lowering(*REDUCE_OPS)
def lower_reduce(kb: KernelBuilder) -> None:
    src, dst = kb.inputs[0], kb.outputs[0]
    rank = src.type.rank
    axes_value = const_ints(kb, 1, "axes") if len(kb.inputs) > 1 else None
    if axes_value is None or axes_value.size == 0:
        axes = set() if kb.attrs["noop_with_empty_axes"] else set(range(rank))
    else:
        axes = {norm_axis(int(a), rank, kb.node.op) for a in axes_value}
    count = prod([src.shape[a] for a in axes])
    emit_reduce(kb, src, dst, axes, reduce_acc(kb, kb.node.op, src.dtype, count))


@lowering("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(kb: KernelBuilder) -> None:
    src, dst = kb.inputs[0], kb.outputs[0]
    axes = set(range(2, src.type.rank))
    count = prod(src.shape[2:])
    if kb.node.op == "GlobalMaxPool":
        acc = extremum_acc(kb, src.dtype, True)
    elif count == 0:
        acc = sum_acc(kb, src.dtype, finish=lambda accs: ir.Constant(F32, float("nan")))
    else:
        acc = sum_acc(kb, src.dtype, finish=lambda accs: kb.b.fdiv(accs[0], fconst(count)))
    emit_reduce(kb, src, dst, axes, acc)


# ---------------------------------------------------------------------------------------------------------------
# Engine 2: one axis, [outer, n, inner] with per-lane state


class Rows:
    """A tensor of `shape` viewed as [outer, n, inner] around `axis`. Use:

        rows = Rows(kb, shape, axis)
        best = rows.state(F32)
        with rows.each():                       # loops over outer and blocks of lanes
            rows.lanes(lambda j: best.set(j, ...))
            rows.along(lambda i, j, flat: ...)   # i: position on the axis, flat: the element's flat index
            rows.lanes(lambda j: store(out, rows.lane_index(j), ...))
    """

    def __init__(self, kb: KernelBuilder, shape: Sequence[int], axis: int):
        self.kb = kb
        self.outer = prod(shape[:axis])
        self.n = int(shape[axis])
        self.inner = prod(shape[axis + 1:])
        self.chunk = max(1, min(self.inner, CHUNK))
        self.blocks = -(-self.inner // self.chunk) if self.inner else 0
        self.o = self.j0 = self.count = None

    def state(self, ty: ir.Type, name: str = "state") -> State:
        return State(self.kb, ty, self.chunk, name)

    @contextlib.contextmanager
    def each(self) -> Iterator[None]:
        kb = self.kb
        if self.outer == 0 or self.inner == 0:
            # nothing to do; emit the body into an unreachable block so callers need not special-case
            yield from self._dead()
            return
        with kb.loop(self.outer, "o") as o:
            with _blocks(kb, self.inner, self.chunk, self.blocks) as (j0, count):
                self.o, self.j0, self.count = o, j0, count
                yield

    def _dead(self):
        kb = self.kb
        dead = kb.b.append_basic_block("dead")
        after = kb.b.append_basic_block("after.dead")
        kb.b.branch(after)
        kb.b.position_at_end(dead)
        self.o, self.j0, self.count = kb.i64(0), kb.i64(0), kb.i64(0)
        yield
        kb.b.branch(after)
        kb.b.position_at_end(after)

    def lanes(self, fn: Callable[[ir.Value], None]) -> None:
        if self.chunk == 1:
            fn(self.kb.i64(0))
            return
        with self.kb.loop(self.count, "j") as j:
            fn(j)

    def lane_index(self, j: ir.Value, rows: int = 1, row: ir.Value | int = 0) -> ir.Value:
        """Flat index of lane j in a tensor shaped [outer, rows, inner] at `row` (rows=1: the reduced output)."""
        b, kb = self.kb.b, self.kb
        row = kb.i64(row) if isinstance(row, int) else row
        base = b.add(b.mul(self.o, kb.i64(rows * self.inner)), b.mul(row, kb.i64(self.inner)))
        return b.add(b.add(base, self.j0), j)

    def along(self, fn: Callable[[ir.Value, ir.Value, ir.Value], None], reverse: bool = False) -> None:
        kb, b = self.kb, self.kb.b
        with kb.loop(self.n, "i") as step:
            i = b.sub(kb.i64(self.n - 1), step) if reverse else step
            row = b.add(b.add(b.mul(self.o, kb.i64(self.n * self.inner)), b.mul(i, kb.i64(self.inner))), self.j0)
            self.lanes(lambda j: fn(i, j, b.add(row, j)))


def order_ops(kb: KernelBuilder, dtype: DType):
    """(gt, eq) in the total order where NaN is above everything and equal to itself."""
    b = kb.b
    if not dtype.is_float:
        return (lambda a, c: kb.compare(dtype, ">", a, c)), (lambda a, c: kb.compare(dtype, "==", a, c))

    def gt(a, c):
        return b.or_(b.fcmp_ordered(">", a, c), b.and_(is_nan(kb, a), b.not_(is_nan(kb, c))))

    def eq(a, c):
        return b.or_(b.fcmp_ordered("==", a, c), b.and_(is_nan(kb, a), is_nan(kb, c)))

    return gt, eq


@lowering("ArgMax", "ArgMin")
def lower_arg(kb: KernelBuilder) -> None:
    """Two vectorisable passes per row: the extreme value (NaN if the row has one: NumPy's argmax and argmin
    both pick NaN), then the first (or, with select_last_index, the last) index holding it."""
    src, dst = kb.inputs[0], kb.outputs[0]
    b = kb.b
    dtype = src.dtype
    axis = norm_axis(kb.attrs["axis"], src.type.rank, kb.node.op)
    n = src.shape[axis]
    if n == 0:
        raise EdgeccError(f"{kb.node.op} over an empty axis", hint="the reduced axis must be non-empty")
    largest = kb.node.op == "ArgMax"
    last = bool(kb.attrs["select_last_index"])
    rows = Rows(kb, src.shape, axis)
    ext = Extremes(kb, dtype, largest)
    best = rows.state(ext.ty, "best")
    has_nan = rows.state(I1, "has_nan") if dtype.is_float else None
    where = rows.state(I64, "where")
    none = kb.i64(-1 if last else n)

    def extreme(i, j, flat):
        x = ext.load(src, flat)
        best.set(j, ext.step(best.get(j), x))
        if has_nan is not None:
            has_nan.set(j, b.or_(has_nan.get(j), ext.is_nan(x)))

    def locate(i, j, flat):
        x = ext.load(src, flat)
        match = ext.equal(x, best.get(j))
        if has_nan is not None:
            match = b.select(has_nan.get(j), ext.is_nan(x), match)
        candidate = b.select(match, i, none)
        current = where.get(j)
        keep = b.icmp_signed(">" if last else "<", current, candidate)
        where.set(j, b.select(keep, current, candidate))

    def init(j):
        best.set(j, ext.init)
        if has_nan is not None:
            has_nan.set(j, ir.Constant(I1, 0))
        where.set(j, none)

    with rows.each():
        rows.lanes(init)
        rows.along(extreme)
        rows.along(locate)
        rows.lanes(lambda j: kb.store(dst, rows.lane_index(j), where.get(j)))


@lowering("TopK")
def lower_topk(kb: KernelBuilder) -> None:
    """A binary heap of the k best elements per row, kept in the outputs, O(n log k): the first k elements are
    heapified with the worst at the root, each later element that comes before the root replaces it, then a
    heapsort leaves the outputs in order (value descending for largest, ascending otherwise; NaN counts as
    largest; equal values by lower index)."""
    src, values, indices = kb.inputs[0], kb.outputs[0], kb.outputs[1]
    b = kb.b
    dtype = src.dtype
    k_value = const_ints(kb, 1, "K")
    k = int(k_value[0])
    axis = norm_axis(kb.attrs["axis"], src.type.rank, "TopK")
    n = src.shape[axis]
    if not 0 <= k <= n:
        raise EdgeccError(f"TopK K={k} is out of range for axis {axis} of length {n}")
    if k == 0 or values.size == 0:
        return
    largest = bool(kb.attrs["largest"])
    gt, eq = order_ops(kb, dtype)
    outer, inner = prod(src.shape[:axis]), prod(src.shape[axis + 1:])
    pos_var = State(kb, I64, 1, "heap_pos")
    zero = kb.i64(0)

    def before(a, c):
        """Element a = (value, index) comes strictly before c in the output order."""
        first = gt(a[0], c[0]) if largest else gt(c[0], a[0])
        return b.or_(first, b.and_(eq(a[0], c[0]), b.icmp_signed("<", a[1], c[1])))

    with kb.loop_nest([outer, inner], "row") as (o, j):
        src_base = b.add(b.mul(o, kb.i64(n * inner)), j)
        out_base = b.add(b.mul(o, kb.i64(k * inner)), j)

        def slot(p):
            return b.add(out_base, b.mul(p, kb.i64(inner)))

        def get(p):
            at = slot(p)
            return kb.load(values, at), kb.load(indices, at)

        def put(p, e):
            at = slot(p)
            kb.store(values, at, e[0])
            kb.store(indices, at, e[1])

        def sift_down(start, size):
            """Move the element at `start` down until no child in [0, size) is worse than it."""
            pos_var.set(zero, start)
            head = b.append_basic_block("sift.head")
            body = b.append_basic_block("sift.body")
            swap = b.append_basic_block("sift.swap")
            done = b.append_basic_block("sift.done")
            b.branch(head)
            b.position_at_end(head)
            p = pos_var.get(zero)
            left = b.add(b.add(p, p), kb.i64(1))
            b.cbranch(b.icmp_signed("<", left, size), body, done)
            b.position_at_end(body)
            right = b.add(left, kb.i64(1))
            has_right = b.icmp_signed("<", right, size)
            le, re = get(left), get(b.select(has_right, right, left))
            take_right = b.and_(has_right, before(le, re))  # right is worse than left
            child = b.select(take_right, right, left)
            ce = (b.select(take_right, re[0], le[0]), b.select(take_right, re[1], le[1]))
            pe = get(p)
            b.cbranch(before(pe, ce), swap, done)
            b.position_at_end(swap)
            put(p, ce)
            put(child, pe)
            pos_var.set(zero, child)
            b.branch(head)
            b.position_at_end(done)

        with kb.loop(k, "fill") as i:
            put(i, (kb.load(src, b.add(src_base, b.mul(i, kb.i64(inner)))), i))
        with kb.loop(k // 2, "heapify") as step:
            sift_down(b.sub(kb.i64(k // 2 - 1), step), kb.i64(k))
        with kb.loop(n, "scan", start=k) as i:
            e = (kb.load(src, b.add(src_base, b.mul(i, kb.i64(inner)))), i)
            better = b.append_basic_block("scan.better")
            nxt = b.append_basic_block("scan.next")
            b.cbranch(before(e, get(zero)), better, nxt)
            b.position_at_end(better)
            put(zero, e)
            sift_down(zero, kb.i64(k))
            b.branch(nxt)
            b.position_at_end(nxt)
        with kb.loop(k - 1, "sort") as step:
            end = b.sub(kb.i64(k - 1), step)
            root, last = get(zero), get(end)
            put(zero, last)
            put(end, root)
            sift_down(zero, end)


@lowering("CumSum")
def lower_cumsum(kb: KernelBuilder) -> None:
    src, dst = kb.inputs[0], kb.outputs[0]
    dtype = src.dtype
    axis_value = const_ints(kb, 1, "axis")
    if axis_value is None or axis_value.size != 1:
        raise EdgeccError("CumSum needs a single axis")
    axis = norm_axis(int(axis_value[0]), src.type.rank, "CumSum")
    exclusive = bool(kb.attrs["exclusive"])
    rows = Rows(kb, src.shape, axis)
    acc = rows.state(COMPUTE[dtype], "sum")

    def step(i, j, flat):
        total = acc.get(j)
        new = add(kb, dtype, total, kb.load(src, flat), EXACT)
        kb.store(dst, flat, total if exclusive else new)
        acc.set(j, new)

    with rows.each():
        rows.lanes(lambda j: acc.set(j, kb.const(dtype, 0)))
        rows.along(step, reverse=bool(kb.attrs["reverse"]))


@lowering("Softmax", "LogSoftmax")
def lower_softmax(kb: KernelBuilder) -> None:
    src, dst = kb.inputs[0], kb.outputs[0]
    b = kb.b
    dtype = src.dtype
    axis = norm_axis(kb.attrs["axis"], src.type.rank, kb.node.op)
    log = kb.node.op == "LogSoftmax"
    rows = Rows(kb, src.shape, axis)
    if rows.n == 0:
        return
    top = rows.state(F32, "max")
    total = rows.state(F32, "sum")
    keep_exp = not log and dtype is DType.float32  # the float32 output can hold exp(x - max) between passes

    def shifted(j, flat):
        return b.fsub(kb.load(src, flat), top.get(j), flags=EXACT)

    def add_exp(i, j, flat):
        e = mathlib.exp(kb, shifted(j, flat))
        if keep_exp:
            kb.store(dst, flat, e)
        total.set(j, b.fadd(total.get(j), e, flags=FAST))

    def write(i, j, flat):
        if log:
            kb.store(dst, flat, b.fsub(shifted(j, flat), total.get(j), flags=EXACT))
        else:
            e = kb.load(dst, flat) if keep_exp else mathlib.exp(kb, shifted(j, flat))
            kb.store(dst, flat, b.fmul(e, total.get(j), flags=EXACT))

    def finish_lane(j):
        s = total.get(j)
        total.set(j, mathlib.log(kb, s) if log else b.fdiv(fconst(1.0), s, flags=EXACT))

    ext = Extremes(kb, dtype, True)
    key = rows.state(ext.ty, "max_key")
    has_nan = rows.state(I1, "has_nan")

    def find_max(i, j, flat):
        x = ext.load(src, flat)
        key.set(j, ext.step(key.get(j), x))
        has_nan.set(j, b.or_(has_nan.get(j), ext.is_nan(x)))

    def start(j):
        key.set(j, ext.init)
        has_nan.set(j, ir.Constant(I1, 0))

    def finish_max(j):
        # a NaN in the row makes every output of the row NaN, as in the reference
        top.set(j, b.select(has_nan.get(j), ir.Constant(F32, float("nan")), ext.value(key.get(j))))
        total.set(j, fconst(0.0))

    with rows.each():
        rows.lanes(start)
        rows.along(find_max)
        rows.lanes(finish_max)
        rows.along(add_exp)
        rows.lanes(finish_lane)
        rows.along(write)
