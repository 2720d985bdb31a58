"""Elementwise ops: one generic broadcasting loop, and per op a scalar function in the compute type.

The loop runs flat (one vectorisable loop) when every input has the output's shape or is a scalar; otherwise
it nests over the output's dims with broadcast strides (0 along broadcast axes).
"""

from __future__ import annotations

from typing import Callable

from llvmlite import ir

from edgecc.backends.codegen import KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.kernels import lowering
from edgecc.ir.dtypes import DType

ScalarFn = Callable[[KernelBuilder, DType, list], ir.Value]


def emit_elementwise(kb: KernelBuilder, scalar: ScalarFn, input_dtype: DType | None = None) -> None:
    """out[i] = scalar(kb, dtype, [in_k[broadcast(i)] ...]) for every output element."""
    out = kb.outputs[0]
    ins = [buf for buf in kb.inputs if buf is not None]
    dtype = input_dtype or (ins[0].dtype if ins else out.dtype)
    if out.size == 0:
        return
    flat_ok = all(buf.shape == out.shape or buf.size == 1 for buf in ins)
    if flat_ok:
        with kb.loop(out.size) as i:
            values = [kb.load(buf, i if buf.size == out.size else kb.i64(0)) for buf in ins]
            kb.store(out, i, scalar(kb, dtype, values))
        return
    all_strides = [broadcast_strides(buf.shape, out.shape) for buf in ins]
    out_strides = strides_of(out.shape)
    with kb.loop_nest(out.shape) as idx:
        values = [kb.load(buf, kb.linear(idx, strides)) for buf, strides in zip(ins, all_strides)]
        kb.store(out, kb.linear(idx, out_strides), scalar(kb, dtype, values))


def elementwise(*ops: str):
    """Register `fn(kb, dtype, values)` as the scalar function of elementwise ops."""

    def wrap(fn: ScalarFn) -> ScalarFn:
        @lowering(*ops)
        def lower(kb: KernelBuilder) -> None:
            emit_elementwise(kb, fn)

        return fn

    return wrap


@elementwise("Relu")
def relu(kb, dtype, values):
    (x,) = values
    zero = kb.const(dtype, 0)
    return kb.b.select(kb.compare(dtype, ">", x, zero), x, zero)


@elementwise("Add")
def add(kb, dtype, values):
    return kb.add(dtype, *values)


@elementwise("Sub")
def sub(kb, dtype, values):
    return kb.sub(dtype, *values)


@elementwise("Mul")
def mul(kb, dtype, values):
    return kb.mul(dtype, *values)
