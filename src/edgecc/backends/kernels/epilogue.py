"""Kernel epilogues: what a Conv or Gemm kernel applies to each output vector before storing it (the residual Add
and activation of edgecc.FusedConv / edgecc.FusedGemm), so they cost no extra pass over memory.

The float activations here take a float32 scalar or `<N x float>` vector and are shared with the elementwise
kernels of the same ops, so a fused activation rounds exactly like the unfused op (same float32 operations in the
same order, no contraction) and NaN propagates the same way.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from edgecc.backends import mathlib
from edgecc.backends.codegen import F16, F32, Buffer, KernelBuilder
from edgecc.ops.fused import activation_params


def fconst(value: float, like: ir.Value) -> ir.Constant:
    """A float32 constant (rounded like np.float32(value)) of `like`'s type: a scalar or a splat vector; float16
    (rounded like np.float16) when `like` is half (kernels computing in half, see conv.half_arithmetic)."""
    element = like.type.element if isinstance(like.type, ir.VectorType) else like.type
    if isinstance(element, ir.HalfType):
        scalar = ir.Constant(F16, float(np.float16(value)))
    else:
        scalar = ir.Constant(F32, float(np.float32(value)))
    if isinstance(like.type, ir.VectorType):
        return ir.Constant(like.type, [scalar] * like.type.count)
    return scalar


def relu(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    zero = fconst(0, x)
    return kb.b.select(kb.b.fcmp_ordered("<", x, zero), zero, x)  # NaN stays NaN, like np.maximum


def clip(kb: KernelBuilder, x: ir.Value, lo: float, hi: float) -> ir.Value:
    """np.clip(x, lo, hi), NaN staying NaN."""
    b = kb.b
    if lo > -np.inf:
        x = b.select(b.fcmp_ordered("<", x, fconst(lo, x)), fconst(lo, x), x)
    if hi < np.inf:
        x = b.select(b.fcmp_ordered(">", x, fconst(hi, x)), fconst(hi, x), x)
    return x


def leaky_relu(kb: KernelBuilder, x: ir.Value, alpha: float) -> ir.Value:
    b = kb.b
    return b.select(b.fcmp_ordered(">=", x, fconst(0, x)), x, b.fmul(x, fconst(alpha, x)))


def hard_sigmoid(kb: KernelBuilder, x: ir.Value, alpha: float, beta: float) -> ir.Value:
    b = kb.b
    return clip(kb, b.fadd(b.fmul(fconst(alpha, x), x), fconst(beta, x)), 0, 1)


def hard_swish(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    b = kb.b
    return b.fmul(x, clip(kb, b.fadd(b.fmul(x, fconst(1 / 6, x)), fconst(0.5, x)), 0, 1))


def activate(kb: KernelBuilder, name: str, params: dict[str, float], x: ir.Value) -> ir.Value:
    """Activation `name` (see edgecc.ops.fused.ACTIVATIONS) of a float32 scalar or vector."""
    if name == "Relu":
        return relu(kb, x)
    if name == "Clip":
        return clip(kb, x, params["min"], params["max"])
    if name == "LeakyRelu":
        return leaky_relu(kb, x, params["alpha"])
    if name == "HardSigmoid":
        return hard_sigmoid(kb, x, params["alpha"], params["beta"])
    if name == "HardSwish":
        return hard_swish(kb, x)
    if name in WIDE_ACTIVATIONS:
        return _in_float32(kb, WIDE_ACTIVATIONS[name], x)
    raise ValueError(f"no epilogue for activation {name!r}")


WIDE_ACTIVATIONS = {"Sigmoid": mathlib.sigmoid, "Tanh": mathlib.tanh, "Gelu": mathlib.gelu}
"""Activations computed by edgecc's float32 math library (half values are widened for them and rounded back)."""


def _in_float32(kb: KernelBuilder, fn, x: ir.Value) -> ir.Value:
    if not isinstance(x.type, ir.VectorType) or not isinstance(x.type.element, ir.HalfType):
        return fn(kb, x)
    wide = ir.VectorType(F32, x.type.count)
    return kb.b.fptrunc(fn(kb, kb.b.fpext(x, wide)), ir.VectorType(F16, x.type.count))


class Epilogue:
    """The residual Add and activation of a fused node (nothing for plain Conv/Gemm): `apply(vec, value, flat, n)`
    returns the n-lane compute-type `value` destined for output elements flat, flat + stride, ..., finished."""

    def __init__(self, kb: KernelBuilder, residual: Buffer | None = None):
        self.kb = kb
        self.residual = residual
        self.activation = kb.attrs.get("activation", "")
        self.params = activation_params(self.activation, kb.attrs.get("activation_params")) if self.activation else {}

    def apply(self, vec, value: ir.Value, flat, n: int, stride: int = 1) -> ir.Value:
        """`stride`: the output elements of the n lanes are flat + j * stride."""
        if self.residual is not None:
            value = self.kb.b.fadd(value, vec.load(self.residual, flat, n, stride))
        if self.activation:
            value = activate(self.kb, self.activation, self.params, value)
        return value
