"""Kernels shared across layer shapes, for flash-bound targets (`Target.optimise_for == "size"`).

Every other kernel is specialised on its node's static shapes, so N differently shaped layers cost N kernel bodies
(about 0.5-2.4 KB each on Cortex-M4). On a microcontroller under a flash budget that code can outweigh the
compressed weights themselves (digits_mobilenet: 18 KB of code for 7.6 KB of 1-bit codebook weights). Here one
function serves a whole kernel *family*; the shapes, strides, pads and counts come at run time from a small
descriptor in .rodata (int16 fields, then float32 parameters; one per distinct layer, deduplicated, 4-byte aligned),
passed by the entry as the first argument:

    void family(const void *desc, inputs..., outputs...)

Families (`plan` decides whether a node belongs to one; anything else keeps its specialised kernel):
- float convolution (Conv, edgecc.FusedConv; float32, 2-D, dense weights): one scalar multiply-add per tap with
  runtime bounds checks, then the node's bias, residual and activation. None, Relu, Clip and HardSwish are chosen
  at run time (Relu and no activation are the clip to [0, inf] and [-inf, inf]: the same selects as
  `epilogue.clip`, so NaN propagates alike); other activations are part of the family (`epilogue.activate`).
  Sums go in another order than onnxruntime's: float32 tolerance.
- int8 convolution (QLinearConv, 2-D, dense weights): the generic kernel's arithmetic (quant.py): the i32 sum of
  (x - x_zp)(w - w_zp) over the taps inside the map (padding holds x_zp and adds nothing), the bias, and the same
  float32 requantisation (`quant.qlinear_conv_output`), so outputs are bit-identical to it.
- CodebookDecode: each index read from its bit position (bits, count and codebook size at run time); exact.

The family key holds what stays compile-time: element types, which inputs are present, per-tensor vs per-channel
parameters and the activations not chosen at run time; layers differing only in shape share one body. Loops and
indices are i32: i64 arithmetic would double the code on 32-bit cores. Fields are int16 (a layer with a dimension
above 32767 keeps its specialised kernel), indices i32 (tensors above MAX_ELEMENTS keep theirs too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import F32, I8, I16, I32, STORAGE, Buffer, KernelBuilder
from edgecc.ir.core import Node
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.fused import activation_params

CONV_FIELDS = ("N", "C", "H", "W", "M", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW", "G", "act")
"""The convolution descriptor's int16 fields, in order (act: RUNTIME_ACTIVATIONS' code)."""
FLOAT_CONV_FIELDS = CONV_FIELDS + ("bias_half",)
"""The float convolution's: bias_half 1 when its bias is float16 (edgecc.budgets' fp16 settings on a clustered
layer), read as such at run time, so layers with float32 and float16 biases still share one kernel."""
CONV_FLOATS = ("lo", "hi")
"""Its float32 parameters: the clip bounds of a run-time activation."""
CODEBOOK_FIELDS = ("numel_hi", "numel_lo", "bits", "entries")
"""The decode's fields: numel = numel_hi * 2^15 + numel_lo (weights beyond int16's range), bits, codebook size."""
MAX_ELEMENTS = 2 ** 31 // 8
"""Tensors up to this many elements share (bit positions of 8-bit indices and flat indices stay within i32)."""
RUNTIME_ACTIVATIONS = {"": 0, "Relu": 0, "Clip": 0, "HardSwish": 1}
"""Activations of the float convolution family chosen by the descriptor: 0 clip to [lo, hi], 1 HardSwish."""
FIELD_MAX = 2 ** 15 - 1


def pack_descriptor(ints, floats=()) -> np.ndarray | None:
    """The bytes of a descriptor (int16 fields, padded to 4 bytes, then float32 values); None when a field does
    not fit int16."""
    ints = [int(v) for v in ints]
    if any(not -FIELD_MAX <= v <= FIELD_MAX for v in ints):
        return None
    fields = np.array(ints + [0] * (len(ints) % 2 if floats else 0), "<i2").tobytes()
    return np.frombuffer(fields + np.array(floats, "<f4").tobytes(), np.uint8)


@dataclass(frozen=True)
class SharedKernel:
    """A node's place in a family: `family` (hashable: the compile-time part of the kernel, one function per
    distinct value), its `descriptor` (int32, the run-time part, named by `fields`) and `emit`, which writes the
    family's body (`floats`: the names of the float32 values after the fields)."""

    family: tuple
    descriptor: np.ndarray
    fields: tuple[str, ...]
    emit: Callable[["SharedBuilder"], None]
    floats: tuple[str, ...] = ()


class SharedBuilder:
    """A KernelBuilder for a family body: the buffers' types say only element types (shapes belong to the
    descriptor, read with `field`), and loops run over i32 values."""

    def __init__(self, kb: KernelBuilder, desc: ir.Value, shared: SharedKernel):
        self.kb = kb
        self.b = b = kb.b
        self.fields = {name: b.sext(b.load(b.gep(desc, [ir.Constant(I32, k)], inbounds=True, source_etype=I16),
                                           typ=I16, name=name), I32) for k, name in enumerate(shared.fields)}
        first = (len(shared.fields) + 1) // 2  # the floats' first 4-byte word
        self.fields.update({name: b.load(b.gep(desc, [ir.Constant(I32, first + k)], inbounds=True, source_etype=F32),
                                         typ=F32, name=name) for k, name in enumerate(shared.floats)})

    def field(self, name: str) -> ir.Value:
        return self.fields[name]

    @staticmethod
    def i32(value: int) -> ir.Constant:
        return ir.Constant(I32, int(value))

    def add(self, *terms) -> ir.Value:
        acc = terms[0]
        for term in terms[1:]:
            acc = self.b.add(acc, term)
        return acc

    def mul(self, a, c) -> ir.Value:
        return self.b.mul(a, c)

    @contextlib.contextmanager
    def loop(self, count: ir.Value, name: str = "i") -> Iterator[ir.Value]:
        """`for (i = 0; i < count; ++i)` with an i32 i."""
        b = self.b
        pre = b.block
        header, body, done = (b.append_basic_block(f"{name}.{s}") for s in ("head", "body", "done"))
        b.branch(header)
        b.position_at_end(header)
        index = b.phi(I32, name=name)
        index.add_incoming(self.i32(0), pre)
        b.cbranch(b.icmp_signed("<", index, count), body, done)
        b.position_at_end(body)
        yield index
        index.add_incoming(b.add(index, self.i32(1), name=f"{name}.next"), b.block)
        b.branch(header)
        b.position_at_end(done)

    def load(self, buf: Buffer, index: ir.Value) -> ir.Value:
        ptr = self.b.gep(buf.ptr, [index], inbounds=True, source_etype=STORAGE[buf.dtype])
        return self.kb.from_storage(buf.dtype, self.b.load(ptr, typ=STORAGE[buf.dtype]))

    def store(self, buf: Buffer, index: ir.Value, value: ir.Value) -> None:
        ptr = self.b.gep(buf.ptr, [index], inbounds=True, source_etype=STORAGE[buf.dtype])
        self.b.store(self.kb.to_storage(buf.dtype, value), ptr)

    def widen(self, buf: Buffer, value: ir.Value) -> ir.Value:
        """An int8/uint8/int32 value as i32."""
        if value.type.width == 32:
            return value
        return self.b.zext(value, I32) if buf.dtype is DType.uint8 else self.b.sext(value, I32)

    def inside(self, index: ir.Value, size: ir.Value) -> ir.Value:
        """0 <= index < size, one unsigned compare."""
        return self.b.icmp_unsigned("<", index, size)


# ---------------------------------------------------------------------------------------------------------------
# Which nodes share


def plan(node: Node, attrs: dict) -> SharedKernel | None:
    """The family and descriptor of `node`, or None when it keeps its specialised kernel."""
    planner = _PLANNERS.get(node.op)
    return planner(node, attrs) if planner is not None else None


def _types(node: Node) -> tuple:
    return tuple(None if v is None else v.type.dtype for v in node.inputs), tuple(v.type.dtype for v in node.outputs)


def _sparse(value) -> bool:
    return value is not None and value.type.sparse is not None


def _conv_fields(node: Node, attrs: dict, x_index: int, w_index: int) -> list[int] | None:
    """The CONV_FIELDS of a 2-D convolution node but `act`, or None when it is not 2-D."""
    from edgecc.ops.conv import kernel_from_weights, window_geometry
    from edgecc.ops.registry import Call

    x, w, y = node.input(x_index), node.input(w_index), node.outputs[0]
    if x is None or w is None or x.type.rank != 4 or w.type.rank != 4 or y.type.rank != 4 or y.type.size == 0:
        return None
    if max(x.type.size, w.type.size, y.type.size) > MAX_ELEMENTS:
        return None
    call = Call(node.op, [v.type if v is not None else None for v in node.inputs], dict(attrs), 1, where=node.label)
    window = window_geometry(call, x.type.shape[2:], kernel_from_weights(call, w.type.shape))
    n, c, h, wd = x.type.shape
    group = int(attrs.get("group", 1))
    fields = (n, c, h, wd, w.type.shape[0], *window.kernel, *window.strides, *window.pads_begin, *window.dilations,
              *window.out, group)
    return list(fields)


def _plan_float_conv(node: Node, attrs: dict) -> SharedKernel | None:
    ins, outs = _types(node)
    if ins[0] is not DType.float32 or outs != (DType.float32,) or _sparse(node.input(1)) or \
            any(t not in (None, DType.float32, DType.float16) for t in ins[1:3]) or \
            any(t not in (None, DType.float32) for t in ins[3:]):
        return None  # (float16 weights or bias, edgecc.budgets' fp16 settings, are widened as they are loaded)
    fields = _conv_fields(node, attrs, 0, 1)
    activation = attrs.get("activation", "") if node.op == "FusedConv" else ""
    params = activation_params(activation, attrs.get("activation_params")) if activation else {}
    code = RUNTIME_ACTIVATIONS.get(activation)
    bounds = (params.get("min", 0.0), params.get("max", np.inf)) if activation in ("Relu", "Clip") else (-np.inf, np.inf)
    half_bias = len(ins) > 2 and ins[2] is DType.float16
    desc = pack_descriptor(fields + [code or 0, int(half_bias)], bounds) if fields is not None else None
    if desc is None:
        return None
    family = "runtime" if code is not None else (activation, tuple(sorted(params.items())))
    present = tuple(v is not None for v in node.inputs)
    return SharedKernel(("conv_f32", present, ins[1], family), desc, FLOAT_CONV_FIELDS, emit_float_conv,
                        CONV_FLOATS)


def _plan_qlinear_conv(node: Node, attrs: dict) -> SharedKernel | None:
    ins, outs = _types(node)
    if len(node.inputs) < 8 or any(node.input(i) is None for i in (0, 1, 3, 4, 6, 7)) or _sparse(node.input(3)):
        return None
    if node.input(1).type.size != 1 or node.input(6).type.size != 1 or node.input(7).type.size != 1 or \
            (node.input(2) is not None and node.input(2).type.size != 1):
        return None  # per-tensor x and y parameters, as the generic kernel reads them
    bias = node.input(8)
    if bias is not None and bias.type.dtype is not DType.int32:
        return None
    fields = _conv_fields(node, attrs, 0, 3)
    desc = pack_descriptor(fields + [0]) if fields is not None else None
    if desc is None:
        return None
    w_scale, w_zp = node.input(4), node.input(5)
    per_channel = (w_scale.type.size > 1, w_zp is not None and w_zp.type.size > 1)
    return SharedKernel(("qlinear_conv", ins, outs, per_channel), desc, CONV_FIELDS, emit_qlinear_conv)


def _plan_codebook(node: Node, attrs: dict) -> SharedKernel | None:
    bits = int(attrs["bits"])
    codebook, out = node.input(1), node.outputs[0]
    if bits not in (1, 2, 4, 8) or codebook is None or codebook.type.size == 0:
        return None  # the specialised lowering says what is wrong
    numel = out.type.size
    desc = pack_descriptor([numel >> 15, numel & FIELD_MAX, bits, codebook.type.size]) if numel <= MAX_ELEMENTS \
        else None
    return SharedKernel(("codebook",), desc, CODEBOOK_FIELDS, emit_codebook_decode) if desc is not None else None


_PLANNERS = {"Conv": _plan_float_conv, "FusedConv": _plan_float_conv, "QLinearConv": _plan_qlinear_conv,
             "CodebookDecode": _plan_codebook}


# ---------------------------------------------------------------------------------------------------------------
# Family bodies


def conv_taps(sb: SharedBuilder, x_plane: ir.Value, w_plane: ir.Value, oy: ir.Value, ox: ir.Value,
              tap: Callable[[ir.Value, ir.Value], None]) -> None:
    """For each kernel tap inside the input map and each of the `CG = C / G` input channels of a group, calls
    tap(x_index, w_index): the flat input element and weight (x_plane / w_plane: the group's first channel plane
    and the output channel's first weight). Channels are the inner loop, so the bounds are checked once per tap
    and a 1x1 layer's loop is a plain strided dot product (measured on Cortex-M4 under qemu: about 3x fewer
    instructions than channels outside the taps). A branch calling `tap` directly when C / G is 1 (depthwise) was
    measured slower: digits_mobilenet on stm32f4 170.3 -> 187.1 ms, its depthwise layers 26% slower."""
    f, b = sb.field, sb.b
    h, w, kh, kw = f("H"), f("W"), f("KH"), f("KW")
    cg = b.sdiv(f("C"), f("G"))
    plane, taps = sb.mul(h, w), sb.mul(kh, kw)
    iy0 = b.sub(sb.mul(oy, f("SH")), f("PH"))
    ix0 = b.sub(sb.mul(ox, f("SW")), f("PW"))
    with sb.loop(kh, "ky") as ky:
        iy = sb.add(iy0, sb.mul(ky, f("DH")))
        with b.if_then(sb.inside(iy, h)):
            with sb.loop(kw, "kx") as kx:
                ix = sb.add(ix0, sb.mul(kx, f("DW")))
                with b.if_then(sb.inside(ix, w)):
                    x0 = sb.add(sb.mul(x_plane, plane), sb.mul(iy, w), ix)
                    w0 = sb.add(sb.mul(w_plane, taps), sb.mul(ky, kw), kx)
                    with sb.loop(cg, "c") as c:
                        tap(sb.add(x0, sb.mul(c, plane)), sb.add(w0, sb.mul(c, taps)))


def conv_outputs(sb: SharedBuilder, body: Callable[..., None], channel: Callable = lambda m: None) -> None:
    """Loops over batch, output channel and output position: body(m, x_plane, w_plane, oy, ox, y_index, state),
    with `state = channel(m)` computed once per output channel (its bias and requantisation parameters)."""
    f, b = sb.field, sb.b
    cg, mg = b.sdiv(f("C"), f("G")), b.sdiv(f("M"), f("G"))
    with sb.loop(f("N"), "n") as n, sb.loop(f("M"), "m") as m:
        x_plane = sb.add(sb.mul(n, f("C")), sb.mul(b.sdiv(m, mg), cg))  # first input channel of m's group
        w_plane = sb.mul(m, cg)
        y_plane = sb.add(sb.mul(n, f("M")), m)
        state = channel(m)
        with sb.loop(f("OH"), "oy") as oy, sb.loop(f("OW"), "ox") as ox:
            y_index = sb.add(sb.mul(sb.add(sb.mul(y_plane, f("OH")), oy), f("OW")), ox)
            body(m, x_plane, w_plane, oy, ox, y_index, state)


def emit_float_conv(sb: SharedBuilder) -> None:
    from edgecc.backends.kernels.conv import fmuladd
    from edgecc.backends.kernels.epilogue import activate, hard_swish

    kb, b = sb.kb, sb.b
    x, w, bias = kb.inputs[0], kb.inputs[1], kb.optional_input(2)
    residual = kb.optional_input(3)
    y = kb.outputs[0]
    activation = kb.attrs.get("activation", "") if kb.node.op == "FusedConv" else ""
    params = activation_params(activation, kb.attrs.get("activation_params")) if activation else {}
    acc_slot = b.alloca(F32, name="acc")
    lo, hi = sb.field("lo"), sb.field("hi")
    swish = b.icmp_signed("==", sb.field("act"), sb.i32(RUNTIME_ACTIVATIONS["HardSwish"]))

    def finish(value: ir.Value) -> ir.Value:
        if activation not in RUNTIME_ACTIVATIONS:
            return activate(kb, activation, params, value)
        clipped = b.select(b.fcmp_ordered("<", value, lo), lo, value)  # epilogue.clip's selects, bounds at run time
        clipped = b.select(b.fcmp_ordered(">", clipped, hi), hi, clipped)
        return b.select(swish, hard_swish(kb, value), clipped)

    def output(m, x_plane, w_plane, oy, ox, y_index, start) -> None:
        b.store(start, acc_slot)

        def tap(xi, wi) -> None:
            b.store(fmuladd(kb, sb.load(x, xi), sb.load(w, wi), b.load(acc_slot, typ=F32)), acc_slot)

        conv_taps(sb, x_plane, w_plane, oy, ox, tap)
        value = b.load(acc_slot, typ=F32)
        if residual is not None:
            value = b.fadd(value, sb.load(residual, y_index))
        sb.store(y, y_index, finish(value))

    def bias_of(m) -> ir.Value:
        """Bias m, float32 or float16 as the descriptor's bias_half says (one branch per output channel)."""
        if bias is None:
            return ir.Constant(F32, 0.0)
        loaded = []
        with b.if_else(b.icmp_signed("!=", sb.field("bias_half"), sb.i32(0))) as (half, single):
            for arm, dtype in ((half, DType.float16), (single, DType.float32)):
                with arm:
                    loaded.append((sb.load(Buffer(bias.ptr, TensorType(dtype, bias.shape)), m), b.block))
        value = b.phi(F32)
        for v, block in loaded:
            value.add_incoming(v, block)
        return value

    conv_outputs(sb, output, bias_of)


def emit_qlinear_conv(sb: SharedBuilder) -> None:
    from edgecc.backends.kernels.quant import qlinear_conv_output, qlinear_conv_scale

    kb, b = sb.kb, sb.b
    x, x_zp, w, w_zp = kb.inputs[0], kb.inputs[2], kb.inputs[3], kb.optional_input(5)
    bias, y = kb.optional_input(8), kb.outputs[0]
    acc_slot = b.alloca(I32, name="acc")
    xzp = sb.widen(x_zp, sb.load(x_zp, sb.i32(0))) if x_zp is not None else None

    def channel(m) -> tuple:
        """(weight zero point, bias, requantisation) of output channel m (the generic kernel's: quant.py)."""
        wzp = None
        if w_zp is not None:
            wzp = sb.widen(w_zp, sb.load(w_zp, m if w_zp.size > 1 else sb.i32(0)))
        start = sb.load(bias, m) if bias is not None else sb.i32(0)
        return wzp, start, qlinear_conv_scale(kb, b.sext(m, ir.IntType(64)))  # its loads take i64 indices

    def output(m, x_plane, w_plane, oy, ox, y_index, state) -> None:
        wzp, start, scale = state
        b.store(start, acc_slot)

        def tap(xi, wi) -> None:
            xv = sb.widen(x, sb.load(x, xi))
            wv = sb.widen(w, sb.load(w, wi))
            xv = b.sub(xv, xzp) if xzp is not None else xv
            wv = b.sub(wv, wzp) if wzp is not None else wv
            b.store(b.add(b.load(acc_slot, typ=I32), b.mul(xv, wv)), acc_slot)

        conv_taps(sb, x_plane, w_plane, oy, ox, tap)
        sb.store(y, y_index, qlinear_conv_output(kb, b.load(acc_slot, typ=I32), scale))

    conv_outputs(sb, output, channel)


def emit_codebook_decode(sb: SharedBuilder) -> None:
    kb, b = sb.kb, sb.b
    packed, codebook = kb.inputs
    out = kb.outputs[0]
    bits = sb.field("bits")
    mask = b.sub(b.shl(sb.i32(1), bits), sb.i32(1))
    last = b.sub(sb.field("entries"), sb.i32(1))
    numel = b.or_(b.shl(sb.field("numel_hi"), sb.i32(15)), sb.field("numel_lo"))
    with sb.loop(numel, "i") as i:
        position = sb.mul(i, bits)
        byte = b.zext(b.load(b.gep(packed.ptr, [b.lshr(position, sb.i32(3))], inbounds=True, source_etype=I8),
                             typ=I8), I32)
        index = b.and_(b.lshr(byte, b.and_(position, sb.i32(7))), mask)
        index = b.select(b.icmp_unsigned(">", index, last), last, index)  # never past the codebook
        sb.store(out, i, b.load(b.gep(codebook.ptr, [index], inbounds=True, source_etype=F32), typ=F32))
