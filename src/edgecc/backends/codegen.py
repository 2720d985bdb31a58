"""Kernel-building blocks on top of llvmlite.ir: element types, buffers, loops, loads/stores, arithmetic.

A lowering (see `edgecc.backends.kernels`) receives a `KernelBuilder` positioned inside a fresh kernel function
`void k(ptr noalias in0, ..., ptr noalias out0, ...)` whose shapes are all static, and emits loops with it.
Values are computed in a "compute type" per dtype: float16 and float32 compute in f32, bool in i1, integers in
their own width; loads and stores convert from and to the storage type.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from llvmlite import ir

from edgecc.ir.core import Node
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
PTR = ir.PointerType()
FAST = ("reassoc", "nsz", "arcp", "contract")
"""Float flags that let LLVM reassociate sums (so reductions vectorise) and fuse multiply-adds, without
`nnan`/`ninf`: NaN and infinity inputs must propagate as the reference says, not become poison."""

STORAGE = {DType.float32: F32, DType.float16: F16, DType.int8: I8, DType.uint8: I8, DType.int16: I16,
           DType.int32: I32, DType.int64: I64, DType.bool: I8}
COMPUTE = {DType.float32: F32, DType.float16: F32, DType.int8: I8, DType.uint8: I8, DType.int16: I16,
           DType.int32: I32, DType.int64: I64, DType.bool: I1}
UNSIGNED = {DType.uint8, DType.bool}
KEYED_CONST_MAX = 4096
"""Constant inputs up to this many elements are part of a kernel's identity (see KernelBuilder.const_input)."""


def strides_of(shape: Sequence[int]) -> list[int]:
    """Row-major strides in elements."""
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= int(dim)
    return list(reversed(strides))


def broadcast_strides(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Strides (elements) to read `in_shape` at output indices of `out_shape` under numpy broadcasting."""
    in_shape = [1] * (len(out_shape) - len(in_shape)) + list(in_shape)
    return [0 if d == 1 and o != 1 else s for d, o, s in zip(in_shape, out_shape, strides_of(in_shape))]


@dataclass
class Buffer:
    """A tensor in memory: a pointer and its static type."""

    ptr: ir.Value
    type: TensorType

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def size(self) -> int:
        return self.type.size


class KernelBuilder:
    """Everything a lowering needs to emit one kernel."""

    def __init__(self, module: "ir.Module", function: ir.Function, node: Node, attrs: dict,
                 inputs: list[Buffer | None], outputs: list[Buffer], target, globals_: "GlobalPool"):
        self.module = module
        self.function = function
        self.node = node
        self.attrs = attrs
        self.inputs = inputs
        self.outputs = outputs
        self.target = target
        self.globals = globals_
        self.const_reads: set[int] = set()
        """Constant inputs whose values the lowering looked at: the kernel is only reused where they match."""
        self.packings: dict[int, Callable[[np.ndarray], np.ndarray]] = {}
        """Constant inputs the kernel reads pre-packed: input index -> the packing function (see packed_input)."""
        self.packed: dict[int, np.ndarray] = {}
        """This node's packed constants, so the entry does not pack them again."""
        self.b = ir.IRBuilder(function.append_basic_block("entry"))

    def optional_input(self, index: int) -> Buffer | None:
        """Input `index`, or None when the node has fewer inputs (or leaves it out)."""
        return self.inputs[index] if index < len(self.inputs) else None

    # -- compile-time knowledge -------------------------------------------------------------------------
    def const_input(self, index: int) -> np.ndarray | None:
        """The value of input `index` if it is a compile-time constant of at most KEYED_CONST_MAX elements, else
        None. The kernel may build the value into its code: it is then reused only for nodes whose input `index`
        holds the same value. Larger constants (weights) are only ever read through their pointer, so
        same-shaped layers share one kernel."""
        value = self.node.input(index)
        if value is None or not value.is_const or value.type.size > KEYED_CONST_MAX:
            return None
        self.const_reads.add(index)
        return value.const

    def packed_input(self, index: int, pack: Callable[[np.ndarray], np.ndarray]) -> Buffer | None:
        """Input `index` (a constant, e.g. weights) re-laid-out at compile time by `pack` into the order the
        kernel reads it; None if the input is not a constant. The kernel's argument for this input then points
        at the packed copy (the entry passes it), so the kernel stays shared by layers of the same shape and the
        original layout is not stored unless another kernel reads it. `pack` must depend only on the array."""
        value = self.node.input(index)
        if value is None or not value.is_const:
            return None
        self.packings[index] = pack
        packed = self.packed[index] = pack(value.const)
        return Buffer(self.inputs[index].ptr, TensorType(DType.from_numpy(packed.dtype), packed.shape))

    # -- constants --------------------------------------------------------------------------------------
    def i64(self, value: int) -> ir.Constant:
        return ir.Constant(I64, int(value))

    def const(self, dtype: DType, value) -> ir.Constant:
        """A constant in `dtype`'s compute type."""
        ty = COMPUTE[dtype]
        if isinstance(ty, ir.FloatType):
            return ir.Constant(ty, float(np.float32(value)))
        if ty is I1:
            return ir.Constant(I1, int(bool(value)))
        return ir.Constant(ty, int(value))

    def table(self, array: np.ndarray, name: str = "table") -> ir.Value:
        """A read-only global holding `array` (deduplicated by content); returns its pointer."""
        return self.globals.constant(array, name)

    # -- memory -----------------------------------------------------------------------------------------
    def element_ptr(self, buf: Buffer, flat: ir.Value) -> ir.Value:
        return self.b.gep(buf.ptr, [flat], inbounds=True, source_etype=STORAGE[buf.dtype])

    def load(self, buf: Buffer, flat: ir.Value) -> ir.Value:
        raw = self.b.load(self.element_ptr(buf, flat), typ=STORAGE[buf.dtype])
        return self.from_storage(buf.dtype, raw)

    def store(self, buf: Buffer, flat: ir.Value, value: ir.Value) -> None:
        self.b.store(self.to_storage(buf.dtype, value), self.element_ptr(buf, flat))

    def from_storage(self, dtype: DType, raw: ir.Value) -> ir.Value:
        if dtype is DType.float16:
            return self.b.fpext(raw, F32)
        if dtype is DType.bool:
            return self.b.icmp_unsigned("!=", raw, ir.Constant(I8, 0))
        return raw

    def to_storage(self, dtype: DType, value: ir.Value) -> ir.Value:
        if dtype is DType.float16:
            return self.b.fptrunc(value, F16)
        if dtype is DType.bool:
            return self.b.zext(value, I8)
        return value

    # -- loops ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def loop(self, count: int | ir.Value, name: str = "i", start: int | ir.Value = 0) -> Iterator[ir.Value]:
        """`with kb.loop(n) as i:` emits `for (i = start; i < n; ++i)`; i is an i64."""
        b = self.b
        count = self.i64(count) if isinstance(count, int) else count
        start = self.i64(start) if isinstance(start, int) else start
        pre = b.block
        header = b.append_basic_block(f"{name}.head")
        body = b.append_basic_block(f"{name}.body")
        done = b.append_basic_block(f"{name}.done")
        b.branch(header)
        b.position_at_end(header)
        index = b.phi(I64, name=name)
        index.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", index, count), body, done)
        b.position_at_end(body)
        yield index
        nxt = b.add(index, self.i64(1), name=f"{name}.next")
        index.add_incoming(nxt, b.block)
        b.branch(header)
        b.position_at_end(done)

    @contextlib.contextmanager
    def loop_nest(self, shape: Sequence[int], name: str = "d") -> Iterator[list[ir.Value]]:
        """Nested loops over `shape` (outermost first); yields the list of indices."""
        with contextlib.ExitStack() as stack:
            indices = [stack.enter_context(self.loop(int(n), f"{name}{k}")) for k, n in enumerate(shape)]
            yield indices

    def linear(self, indices: Sequence[ir.Value], strides: Sequence[int], offset: int | ir.Value = 0) -> ir.Value:
        """offset + sum(indices[k] * strides[k]), skipping zero strides."""
        acc = self.i64(offset) if isinstance(offset, int) else offset
        for index, stride in zip(indices, strides):
            if stride == 0:
                continue
            term = index if stride == 1 else self.b.mul(index, self.i64(stride))
            acc = self.b.add(acc, term)
        return acc

    # -- arithmetic by dtype ----------------------------------------------------------------------------
    def add(self, dtype: DType, a, c):
        return self.b.fadd(a, c, flags=FAST) if dtype.is_float else self.b.add(a, c)

    def sub(self, dtype: DType, a, c):
        return self.b.fsub(a, c, flags=FAST) if dtype.is_float else self.b.sub(a, c)

    def mul(self, dtype: DType, a, c):
        return self.b.fmul(a, c, flags=FAST) if dtype.is_float else self.b.mul(a, c)

    def compare(self, dtype: DType, op: str, a, c) -> ir.Value:
        """op in < <= > >= == !=; ordered for floats, unsigned for uint8/bool."""
        if dtype.is_float:
            return self.b.fcmp_ordered(op, a, c)
        if dtype in UNSIGNED:
            return self.b.icmp_unsigned(op, a, c)
        return self.b.icmp_signed(op, a, c)

    def select_max(self, dtype: DType, a, c):
        return self.b.select(self.compare(dtype, ">", a, c), a, c)

    def select_min(self, dtype: DType, a, c):
        return self.b.select(self.compare(dtype, "<", a, c), a, c)

    def convert(self, src: DType, dst: DType, value: ir.Value) -> ir.Value:
        """Numeric conversion between compute types like NumPy's astype: float->int truncates toward zero (out of
        range and NaN handled without poison, see conversions.float_to_int)."""
        from edgecc.backends import conversions

        if src.is_float and dst.is_integer:
            return conversions.float_to_int(self, value, dst)
        if src is DType.int64 and dst.is_float and conversions.narrow_target(self):
            return conversions.i64_to_f32_bits(self.b, value)
        b = self.b
        s, d = COMPUTE[src], COMPUTE[dst]
        if src.is_float and dst.is_float:
            return value
        if dst is DType.bool:
            zero = ir.Constant(s, 0.0 if src.is_float else 0)
            return b.fcmp_unordered("!=", value, zero) if src.is_float else b.icmp_unsigned("!=", value, zero)
        if src.is_float:
            return b.fptoui(value, d) if dst in UNSIGNED else b.fptosi(value, d)
        if dst.is_float:
            return b.uitofp(value, d) if src in UNSIGNED else b.sitofp(value, d)
        if s.width == d.width:
            return value
        if s.width > d.width:
            return b.trunc(value, d)
        return b.zext(value, d) if src in UNSIGNED else b.sext(value, d)


_HEX = np.array([list(f"\\{b:02x}".encode()) for b in range(256)], dtype=np.uint8)


class _ByteString:
    """An i8 array constant printed as c"\\00\\01..." by NumPy: llvmlite's own escaping goes byte by byte in
    Python (2 s for ResNet-18's 47 MB of weights, a fifth of its compile)."""

    def __init__(self, ty: ir.ArrayType, data: bytes):
        self.type = ty
        self._data = data

    def get_reference(self) -> str:
        escaped = _HEX[np.frombuffer(self._data, dtype=np.uint8)].tobytes().decode("ascii")
        return f'c"{escaped}"'

    __str__ = get_reference


class GlobalPool:
    """Read-only globals of one LLVM module, deduplicated by content (weights, index tables)."""

    def __init__(self, module: ir.Module):
        self.module = module
        self._by_key: dict[tuple, ir.GlobalVariable] = {}

    def constant(self, array: np.ndarray, name: str = "const", align: int = 64) -> ir.GlobalVariable:
        """`align`: 64 (a cache line) for arrays kernels stream through; small per-call records (a shared kernel's
        descriptor) take less, so that padding does not cost more flash than they hold."""
        array = np.ascontiguousarray(array)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        key = (array.dtype.str, data, align)
        found = self._by_key.get(key)
        if found is not None:
            return found
        ty = ir.ArrayType(I8, len(data))
        var = ir.GlobalVariable(self.module, ty, name=f"{name}.{len(self._by_key)}")
        var.global_constant = True
        var.linkage = "private"
        var.unnamed_addr = True
        var.align = align
        var.initializer = _ByteString(ty, data)
        self._by_key[key] = var
        return var


LoweringFn = Callable[[KernelBuilder], None]
