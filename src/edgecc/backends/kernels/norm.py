"""Normalisations: LayerNormalization, InstanceNormalization, BatchNormalization (inference and training mode)
and LRN. Statistics are computed in float32 (float16 data too) with two passes (mean, then the mean of squared
deviations), innermost loops over contiguous memory.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends import mathlib
from edgecc.backends.codegen import F16, F32, Buffer, KernelBuilder, broadcast_strides, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.reduce import CHUNK, EXACT, FAST, State, _blocks, fconst, intrinsic, norm_axis, prod
from edgecc.ir.dtypes import DType

NAN = float("nan")


def _mean_var(kb: KernelBuilder, src: Buffer, count: int, rows):
    """Emit mean and population variance (float32) of the elements `rows` yields: rows(fn) calls fn(flat) for each
    element (any loop structure). Returns (mean, var) values; NaN for an empty set."""
    b = kb.b
    zero = kb.i64(0)
    if count == 0:
        return fconst(NAN), fconst(NAN)
    acc = State(kb, F32, 1, "sum")
    acc.set(zero, fconst(0.0))
    rows(lambda flat: acc.set(zero, b.fadd(acc.get(zero), kb.load(src, flat), flags=FAST)))
    mean = b.fdiv(acc.get(zero), fconst(count))
    acc.set(zero, fconst(0.0))

    def square(flat):
        d = b.fsub(kb.load(src, flat), mean, flags=EXACT)
        acc.set(zero, b.fadd(acc.get(zero), b.fmul(d, d, flags=FAST), flags=FAST))

    rows(square)
    return mean, b.fdiv(acc.get(zero), fconst(count))


def _inv_std(kb: KernelBuilder, var: ir.Value, epsilon: float) -> ir.Value:
    b = kb.b
    return b.fdiv(fconst(1.0), intrinsic(kb, "llvm.sqrt", b.fadd(var, fconst(epsilon))))


def _flat_rows(kb: KernelBuilder, base: ir.Value, n: int):
    def rows(fn):
        with kb.loop(n, "i") as i:
            fn(kb.b.add(base, i))

    return rows


def _round_to(kb: KernelBuilder, dtype: DType, v: ir.Value) -> ir.Value:
    """v rounded to `dtype` and back to float32 (float16 arithmetic emulated in float32 is exact after rounding)."""
    if dtype is DType.float16:
        return kb.b.fpext(kb.b.fptrunc(v, F16), F32)
    return v


@lowering("LayerNormalization")
def lower_layer_norm(kb: KernelBuilder) -> None:
    """Y = ((X - Mean) * InvStdDev rounded to X's dtype) * Scale + B, each product and sum rounded to X's dtype
    as the reference does; Mean and InvStdDev (float32, normalised axes kept as 1) when asked for."""
    b = kb.b
    x, scale, bias = kb.inputs[0], kb.inputs[1], kb.optional_input(2)
    y = kb.outputs[0]
    mean_out = kb.outputs[1] if len(kb.outputs) > 1 else None
    inv_out = kb.outputs[2] if len(kb.outputs) > 2 else None
    dtype = x.dtype
    shape = x.shape
    axis = norm_axis(kb.attrs["axis"], len(shape), "LayerNormalization")
    outer_shape, inner_shape = shape[:axis], shape[axis:]
    n = prod(inner_shape)
    if prod(outer_shape) == 0:
        return
    eps = float(kb.attrs["epsilon"])
    inner_strides = strides_of(inner_shape)
    params = [p for p in (scale, bias) if p is not None]
    p_strides = {id(p): broadcast_strides(p.shape, shape) for p in params}
    flat_ok = all(p_strides[id(p)][axis:] in (inner_strides, [0] * len(inner_shape)) for p in params)

    if n == 0:
        for out in (mean_out, inv_out):
            if out is not None:
                with kb.loop(out.size) as i:
                    kb.store(out, i, fconst(NAN))
        return
    with kb.loop_nest(outer_shape, "o") as oidx:
        o = kb.linear(oidx, strides_of(outer_shape))
        base = b.mul(o, kb.i64(n))
        mean, var = _mean_var(kb, x, n, _flat_rows(kb, base, n))
        inv = _inv_std(kb, var, eps)
        if mean_out is not None:
            kb.store(mean_out, o, mean)
        if inv_out is not None:
            kb.store(inv_out, o, inv)
        p_base = {id(p): kb.linear(oidx, p_strides[id(p)][:axis]) for p in params}

        def element(flat, p_index):
            v = _round_to(kb, dtype, b.fmul(b.fsub(kb.load(x, flat), mean, flags=EXACT), inv, flags=EXACT))
            v = _round_to(kb, dtype, b.fmul(v, kb.load(scale, p_index(scale)), flags=EXACT))
            if bias is not None:
                v = b.fadd(v, kb.load(bias, p_index(bias)), flags=EXACT)
            kb.store(y, flat, v)

        if flat_ok:
            with kb.loop(n, "i") as i:
                element(b.add(base, i), lambda p: b.add(p_base[id(p)], i)
                        if p_strides[id(p)][axis:] == inner_strides else p_base[id(p)])
        else:
            with kb.loop_nest(inner_shape, "i") as iidx:
                element(kb.linear(iidx, inner_strides, base),
                        lambda p: kb.linear(iidx, p_strides[id(p)][axis:], p_base[id(p)]))


def _channels(x: Buffer) -> tuple[int, int, int]:
    """(N, C, spatial size) of an N x C x D1 ... tensor (rank 1: C = 1)."""
    shape = x.shape
    return int(shape[0]), (int(shape[1]) if len(shape) >= 2 else 1), prod(shape[2:])


@lowering("InstanceNormalization")
def lower_instance_norm(kb: KernelBuilder) -> None:
    b = kb.b
    x, scale, bias = kb.inputs
    y = kb.outputs[0]
    batch, channels, spatial = _channels(x)
    if y.size == 0:
        return
    eps = float(kb.attrs["epsilon"])
    with kb.loop_nest([batch, channels], "nc") as (nn, c):
        base = b.mul(b.add(b.mul(nn, kb.i64(channels)), c), kb.i64(spatial))
        mean, var = _mean_var(kb, x, spatial, _flat_rows(kb, base, spatial))
        a = b.fmul(kb.load(scale, c), _inv_std(kb, var, eps), flags=EXACT)
        shift = kb.load(bias, c)
        with kb.loop(spatial, "s") as s:
            flat = b.add(base, s)
            v = b.fmul(b.fsub(kb.load(x, flat), mean, flags=EXACT), a, flags=EXACT)
            kb.store(y, flat, b.fadd(v, shift, flags=EXACT))


@lowering("BatchNormalization")
def lower_batch_norm(kb: KernelBuilder) -> None:
    """Y = (X - mean) * (scale / sqrt(var + epsilon)) + B per channel (axis 1). Training mode uses the batch's
    mean and population variance and writes the running statistics input * momentum + batch * (1 - momentum)."""
    b = kb.b
    x, scale, bias, mean_in, var_in = kb.inputs
    y = kb.outputs[0]
    batch, channels, spatial = _channels(x)
    eps = float(kb.attrs["epsilon"])
    if not kb.attrs["training_mode"]:
        if y.size == 0:
            return
        with kb.loop_nest([batch, channels], "nc") as (nn, c):
            a = b.fdiv(kb.load(scale, c), intrinsic(kb, "llvm.sqrt", b.fadd(kb.load(var_in, c), fconst(eps))))
            mean, shift = kb.load(mean_in, c), kb.load(bias, c)
            base = b.mul(b.add(b.mul(nn, kb.i64(channels)), c), kb.i64(spatial))
            with kb.loop(spatial, "s") as s:
                flat = b.add(base, s)
                v = b.fmul(b.fsub(kb.load(x, flat), mean, flags=EXACT), a, flags=EXACT)
                kb.store(y, flat, b.fadd(v, shift, flags=EXACT))
        return

    momentum = float(np.float32(kb.attrs["momentum"]))
    keep = float(np.float32(1) - np.float32(momentum))
    count = batch * spatial

    def per_channel(c):
        def rows(fn):
            with kb.loop(batch, "n") as nn:
                base = b.mul(b.add(b.mul(nn, kb.i64(channels)), c), kb.i64(spatial))
                with kb.loop(spatial, "s") as s:
                    fn(b.add(base, s))

        return rows

    with kb.loop(channels, "c") as c:
        rows = per_channel(c)
        mean, var = _mean_var(kb, x, count, rows)
        for out_index, (running, batch_stat) in ((1, (mean_in, mean)), (2, (var_in, var))):
            if len(kb.outputs) > out_index:
                value = b.fadd(b.fmul(kb.load(running, c), fconst(momentum)), b.fmul(batch_stat, fconst(keep)))
                kb.store(kb.outputs[out_index], c, value)
        if count:
            a = b.fdiv(kb.load(scale, c), intrinsic(kb, "llvm.sqrt", b.fadd(var, fconst(eps))))
            shift = kb.load(bias, c)

            def write(flat):
                v = b.fmul(b.fsub(kb.load(x, flat), mean, flags=EXACT), a, flags=EXACT)
                kb.store(y, flat, b.fadd(v, shift, flags=EXACT))

            rows(write)


def _pow(kb: KernelBuilder, base: ir.Value, exponent: float) -> ir.Value:
    """base ** exponent for base > 0; exact square-root forms for the common exponents."""
    b = kb.b
    if exponent == 1.0:
        return base
    if exponent == 0.5:
        return intrinsic(kb, "llvm.sqrt", base)
    if exponent == 0.75:
        root = intrinsic(kb, "llvm.sqrt", base)
        return b.fmul(root, intrinsic(kb, "llvm.sqrt", root))
    if exponent == 0.0:
        return fconst(1.0)
    return mathlib.pow(kb, base, fconst(exponent))


@lowering("LRN")
def lower_lrn(kb: KernelBuilder) -> None:
    """y = x / (bias + alpha / size * sum of x^2 over the channel window) ** beta; the window sum is
    accumulated in blocks of contiguous spatial positions."""
    b = kb.b
    x, y = kb.inputs[0], kb.outputs[0]
    batch, channels, spatial = _channels(x)
    if y.size == 0:
        return
    size = int(kb.attrs["size"])
    before = (size - 1) // 2
    after = size - 1 - before
    bias = float(np.float32(kb.attrs["bias"]))
    coeff = float(np.float32(kb.attrs["alpha"] / size))
    beta = float(np.float32(kb.attrs["beta"]))
    chunk = min(spatial, CHUNK)
    blocks = -(-spatial // chunk)
    acc = State(kb, F32, chunk, "square_sum")
    with kb.loop_nest([batch, channels], "nc") as (nn, c):
        lo = b.sub(c, kb.i64(before))
        lo = b.select(b.icmp_signed("<", lo, kb.i64(0)), kb.i64(0), lo)
        hi = b.add(c, kb.i64(after + 1))
        hi = b.select(b.icmp_signed(">", hi, kb.i64(channels)), kb.i64(channels), hi)
        n_base = b.mul(nn, kb.i64(channels * spatial))
        here = b.add(n_base, b.mul(c, kb.i64(spatial)))
        with _blocks(kb, spatial, chunk, blocks) as (j0, count):
            with kb.loop(count, "j") as j:
                acc.set(j, fconst(0.0))
            with kb.loop(hi, "w", start=lo) as w:
                row = b.add(b.add(n_base, b.mul(w, kb.i64(spatial))), j0)
                with kb.loop(count, "j") as j:
                    v = kb.load(x, b.add(row, j))
                    acc.set(j, b.fadd(acc.get(j), b.fmul(v, v, flags=FAST), flags=FAST))
            out_row = b.add(here, j0)
            with kb.loop(count, "j") as j:
                flat = b.add(out_row, j)
                denom = b.fadd(fconst(bias), b.fmul(fconst(coeff), acc.get(j), flags=EXACT), flags=EXACT)
                kb.store(y, flat, b.fdiv(kb.load(x, flat), _pow(kb, denom, beta), flags=EXACT))
