"""Convolution kernels: Conv (direct, register-blocked, explicit SIMD vectors) and ConvTranspose.

Conv is computed directly from X and W (no im2col buffer: kernels get no scratch memory). The output is cut
into tiles of MR output channels x NR consecutive output positions along the last spatial axis; the tile's
accumulators are MR vectors of NR float32 lanes kept in registers while the kernel loops over the outer kernel
taps (a cheap per-row bounds check), the input channels (a runtime loop) and the last-axis kernel taps
(unrolled). Each step is one (possibly strided) vector load of input, MR broadcast weights and MR fused
multiply-adds. The window geometry (output size, pads) comes from the reference's `window_geometry` at compile
time; tiles that touch the padded borders are emitted separately with compile-time lane masks (only the valid
lanes are loaded, the rest are zero), interior tiles run in a runtime loop with no checks at all. The loop
order (output rows outside or inside the channel blocks) streams whichever of weights and input is smaller.
Float16 is loaded, widened and accumulated in float32, and rounded once on the store.

ConvTranspose uses the same tiles after splitting the last output axis by stride phase: the outputs
o = r + s * q of phase r all take the same taps, each a stride-1 contiguous read of the input, so each phase is
an ordinary correlation over q, stored with stride s (see `emit_transposed_conv`).

The vector helpers here (`Vec`, `fmuladd`, `entry_alloca`, `lanes`) are shared with the pool and linalg kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from llvmlite import ir

from edgecc.backends.codegen import COMPUTE, F16, F32, FAST, I32, STORAGE, Buffer, KernelBuilder, strides_of
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.epilogue import Epilogue
from edgecc.errors import EdgeccError
from edgecc.ir.dtypes import DType
from edgecc.ops.conv import Window, _transpose_geometry, kernel_from_weights, window_geometry
from edgecc.ops.registry import Call

# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def node_call(kb: KernelBuilder) -> Call:
    """A reference-style Call over the node's input types, for reusing the reference's geometry helpers."""
    return Call(kb.node.op, [None if buf is None else buf.type for buf in kb.inputs], dict(kb.attrs),
                len(kb.outputs), where=kb.node.label)


def lanes(kb: KernelBuilder, bits: int = 32) -> int:
    """Elements of `bits` bits in one SIMD register of the target."""
    return max(1, kb.target.vector_bits // bits)


def half_arithmetic(kb: KernelBuilder, dtype: DType) -> bool:
    """float16 data is computed in half precision: the target has half arithmetic (AArch64 +fullfp16: `fmla v.8h`,
    twice the lanes of float32). Elsewhere float16 is widened to float32 at load (F16C vcvtph2ps, fcvtl)."""
    return dtype is DType.float16 and "+fullfp16" in kb.target.features.split(",")


def compute_bits(kb: KernelBuilder, dtype: DType) -> int:
    """Bits of one lane of `dtype`'s arithmetic in the Conv/Gemm kernels (see half_arithmetic)."""
    if dtype.is_float:
        return 16 if half_arithmetic(kb, dtype) else 32
    return COMPUTE[dtype].width


def vector_registers(kb: KernelBuilder) -> int:
    """SIMD registers of the target (AVX-512 and AArch64 have 32, SSE/AVX2/ARMv7 NEON 16)."""
    if kb.target.vector_bits >= 512 or kb.target.triple.startswith(("aarch64", "arm64")):
        return 32
    return 16


def choose_block(size: int, cap: int) -> int:
    """A block size <= cap for a dimension of `size`: all of it if it fits, else a divisor of at least cap/2 (no
    remainder block), else cap."""
    cap = max(1, cap)
    if size <= cap:
        return max(1, size)
    for d in range(cap, (cap + 1) // 2 - 1, -1):
        if d >= 1 and size % d == 0:
            return d
    return cap


def chunk_width(size: int, vl: int, max_vectors: int = 1) -> int:
    """Tile width along a contiguous axis: at most max_vectors registers, chunks balanced and rounded to vl.
    (One register is the default: accumulators of two registers with an odd lane count, e.g. <24 x float> on
    AVX-512, legalise badly and ran ~10x slower; several rows of one register each do the same work well.)"""
    if size <= 0:
        return 1
    if max_vectors > 1 and size > vl:  # whole registers only: the remainder gets its own, narrower tile
        return min(max_vectors, size // vl) * vl
    cap = max_vectors * vl
    chunks = -(-size // cap)
    width = -(-size // chunks)
    width = -(-width // vl) * vl
    return max(1, min(width, size, cap))


def entry_alloca(kb: KernelBuilder, ty: ir.Type) -> ir.Value:
    """A stack slot at the top of the function's entry block (promoted to registers by LLVM)."""
    block = kb.function.entry_basic_block
    builder = ir.IRBuilder(block)
    builder.position_at_start(block)
    slot = builder.alloca(ty)
    if kb.b.block is block:  # kb.b appends to the entry block: keep it at the end after the insertion above
        kb.b.position_at_end(block)
    return slot


def _type_suffix(ty: ir.Type) -> str:
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{_type_suffix(ty.element)}"
    if isinstance(ty, ir.FloatType):
        return "f32"
    if isinstance(ty, ir.DoubleType):
        return "f64"
    if isinstance(ty, ir.HalfType):
        return "f16"
    return f"i{ty.width}"


def intrinsic(kb: KernelBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    fn = kb.module.globals.get(name)
    if fn is None:
        fn = ir.Function(kb.module, ir.FunctionType(ret, args), name=name)
    return fn


def i32_vector(values) -> ir.Constant:
    values = [int(v) for v in values]
    return ir.Constant(ir.VectorType(I32, len(values)), [ir.Constant(I32, v) for v in values])


class Vec:
    """SIMD vectors of `dtype`'s compute type (float16 and float32 compute as f32): loads, stores, splats, FMA.
    With `native_half`, float16 computes as f16 where the target has half arithmetic (see half_arithmetic); loads
    and stores convert between each buffer's storage type and the compute type, so float16-stored weights serve
    float32 data too."""

    def __init__(self, kb: KernelBuilder, dtype: DType, native_half: bool = False):
        self.kb = kb
        self.b = kb.b
        self.dtype = dtype
        self.elem = F16 if native_half and half_arithmetic(kb, dtype) else COMPUTE[dtype]
        self.is_float = dtype.is_float

    @property
    def bits(self) -> int:
        """Bits of one lane: kernels size their vectors by lanes(kb, vec.bits)."""
        return 16 if isinstance(self.elem, ir.HalfType) else 32 if self.is_float else self.elem.width

    def scalar(self, buf: Buffer, flat: ir.Value) -> ir.Value:
        """buf[flat] in the compute type (a broadcast weight or input; LLVM folds f16 -> f32 -> f16 away)."""
        value = self.kb.load(buf, flat)
        return self.b.fptrunc(value, F16) if isinstance(self.elem, ir.HalfType) and value.type != F16 else value

    def ty(self, n: int) -> ir.VectorType:
        return ir.VectorType(self.elem, n)

    def zero(self, n: int) -> ir.Constant:
        zero = 0.0 if self.is_float else 0
        return ir.Constant(self.ty(n), [ir.Constant(self.elem, zero)] * n)

    def splat(self, value: ir.Value, n: int) -> ir.Value:
        undef = ir.Constant(self.ty(1), ir.Undefined)
        one = self.b.insert_element(undef, value, ir.Constant(I32, 0))
        return self.b.shuffle_vector(one, undef, i32_vector([0] * n))

    def load(self, buf: Buffer, flat: ir.Value, n: int, stride: int = 1, wide_ok: bool = False) -> ir.Value:
        """n lanes buf[flat + j * stride], converted to the compute type. `wide_ok`: reading up to
        flat + n * stride - 1 stays inside the buffer (lets strided loads read one full span)."""
        b, kb = self.b, self.kb
        st = STORAGE[buf.dtype]
        align = buf.dtype.numpy.itemsize
        if stride == 0:
            return self.splat(self.scalar(buf, flat), n)
        if n == 1 or stride == 1:
            raw = b.load(kb.element_ptr(buf, flat), typ=ir.VectorType(st, n), align=align)
        elif stride <= 4:
            span = n * stride if wide_ok else (n - 1) * stride + 1
            wide = b.load(kb.element_ptr(buf, flat), typ=ir.VectorType(st, span), align=align)
            raw = b.shuffle_vector(wide, ir.Constant(ir.VectorType(st, span), ir.Undefined),
                                   i32_vector(j * stride for j in range(n)))
        else:
            raw = ir.Constant(ir.VectorType(st, n), ir.Undefined)
            for j in range(n):
                ptr = kb.element_ptr(buf, b.add(flat, kb.i64(j * stride)) if j else flat)
                raw = b.insert_element(raw, b.load(ptr, typ=st, align=align), ir.Constant(I32, j))
        return self.widen(buf.dtype, raw, n)

    def widen(self, dtype: DType, raw: ir.Value, n: int) -> ir.Value:
        """n lanes loaded from storage of `dtype`, in the compute type."""
        if dtype is DType.float16 and self.elem is not STORAGE[dtype]:
            return self.b.fpext(raw, ir.VectorType(F32, n))
        if dtype is DType.float32 and isinstance(self.elem, ir.HalfType):
            return self.b.fptrunc(raw, ir.VectorType(F16, n))
        return raw

    def store(self, buf: Buffer, flat: ir.Value, value: ir.Value, n: int) -> None:
        b = self.b
        if buf.dtype is DType.float16 and value.type.element != STORAGE[buf.dtype]:
            value = b.fptrunc(value, ir.VectorType(STORAGE[buf.dtype], n))
        elif buf.dtype is DType.float32 and isinstance(value.type.element, ir.HalfType):
            value = b.fpext(value, ir.VectorType(F32, n))
        b.store(value, self.kb.element_ptr(buf, flat), align=buf.dtype.numpy.itemsize)

    def const_vector(self, values) -> ir.Constant:
        values = list(values)
        if self.is_float:  # rounded to the lane type first: LLVM rejects inexact float constants
            rounding = np.float16 if isinstance(self.elem, ir.HalfType) else np.float32
            cast = lambda v: float(rounding(v))  # noqa: E731
        else:
            cast = int
        return ir.Constant(self.ty(len(values)), [ir.Constant(self.elem, cast(v)) for v in values])

    def store_strided(self, buf: Buffer, flat: ir.Value, value: ir.Value, n: int, stride: int) -> None:
        """buf[flat + j * stride] = value[j] for the n lanes."""
        if stride == 1:
            self.store(buf, flat, value, n)
            return
        b, kb = self.b, self.kb
        if isinstance(self.elem, ir.HalfType):  # kb.store takes float32 compute values
            value = b.fpext(value, ir.VectorType(F32, n))
        for j in range(n):
            lane = b.extract_element(value, ir.Constant(I32, j))
            kb.store(buf, b.add(flat, kb.i64(j * stride)) if j else flat, lane)

    def place(self, value: ir.Value, count: int, first: int, n: int, fill=0) -> ir.Value:
        """A vector of n lanes holding `value` (count lanes) at lanes first..first+count-1, `fill` elsewhere."""
        if count == n:
            return value
        mask = [j - first if first <= j < first + count else count for j in range(n)]
        return self.b.shuffle_vector(value, self.const_vector([fill] * count), i32_vector(mask))

    def fma(self, a: ir.Value, x: ir.Value, acc: ir.Value) -> ir.Value:
        """a * x + acc (llvm.fmuladd for floats, wrapping integer arithmetic otherwise)."""
        if self.is_float:
            return fmuladd(self.kb, a, x, acc)
        return self.b.add(self.b.mul(a, x), acc)

    def add(self, a, c):
        return self.b.fadd(a, c, flags=FAST) if self.is_float else self.b.add(a, c)

    def mul(self, a, c):
        return self.b.fmul(a, c, flags=FAST) if self.is_float else self.b.mul(a, c)


def fmuladd(kb: KernelBuilder, a: ir.Value, x: ir.Value, acc: ir.Value) -> ir.Value:
    """a * x + acc, one fused instruction on targets that have one (see Target.has_fma)."""
    ty = acc.type
    name = "llvm.fma" if kb.target.has_fma else "llvm.fmuladd"
    fn = intrinsic(kb, f"{name}.{_type_suffix(ty)}", ty, [ty, ty, ty])
    return kb.b.call(fn, [a, x, acc], fastmath=FAST)


class Accumulators:
    """Named stack slots for loop-carried accumulators (LLVM turns them into registers)."""

    def __init__(self, kb: KernelBuilder):
        self.kb = kb
        self._slots: dict[tuple, ir.Value] = {}

    def slot(self, key, ty: ir.Type) -> ir.Value:
        full = (key, str(ty))
        if full not in self._slots:
            self._slots[full] = entry_alloca(self.kb, ty)
        return self._slots[full]

    def get(self, key, ty):
        return self.kb.b.load(self.slot(key, ty), typ=ty)

    def set(self, key, value):
        self.kb.b.store(value, self.slot(key, value.type))


def add_i64(kb: KernelBuilder, *terms) -> ir.Value:
    """Sum of i64 values and Python ints (constants folded)."""
    const = sum(int(t) for t in terms if isinstance(t, (int, np.integer)))
    acc = None
    for t in terms:
        if isinstance(t, (int, np.integer)):
            continue
        acc = t if acc is None else kb.b.add(acc, t)
    if acc is None:
        return kb.i64(const)
    return kb.b.add(acc, kb.i64(const)) if const else acc


def mul_i64(kb: KernelBuilder, value, factor: int):
    if isinstance(value, (int, np.integer)):
        return int(value) * factor
    if factor == 0:
        return 0
    return value if factor == 1 else kb.b.mul(value, kb.i64(factor))


# ---------------------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------------------


def float_conv_operands(kb: KernelBuilder, op: str) -> tuple[Buffer, Buffer, Buffer | None, Buffer, Call]:
    """(X, W, B, Y, call) of a Conv-family node, which the kernels take in float16 or float32 only."""
    x, w, bias = kb.inputs[0], kb.inputs[1], kb.optional_input(2)
    if not x.dtype.is_float:
        raise EdgeccError(f"{op} kernel needs float16 or float32 input, got {x.dtype.name}")
    return x, w, bias, kb.outputs[0], node_call(kb)


def check_output_spatial(op: str, y: Buffer, out, geometry: str) -> None:
    if tuple(y.shape[2:]) != tuple(out):
        raise EdgeccError(f"{op} output shape {list(y.shape)} disagrees with the {geometry} {list(out)}")


@lowering("Conv", "FusedConv")
def lower_conv(kb: KernelBuilder) -> None:
    """Conv, and edgecc.FusedConv: the same kernel finishing each output vector with the epilogue."""
    x, w, bias, y, call = float_conv_operands(kb, "Conv")
    window = window_geometry(call, x.shape[2:], kernel_from_weights(call, w.shape))
    check_output_spatial("Conv", y, window.out, "window geometry")
    if y.size == 0:
        return
    x, w, y, window = pointwise_as_1d(x, w, y, window)
    epilogue = Epilogue(kb, kb.optional_input(3))
    group = int(kb.attrs["group"])
    # imported here: these modules build on this one's helpers
    from edgecc.backends.kernels.conv_channels import emit_channel_vector_conv, prefers_channel_vectors
    from edgecc.backends.kernels.depthwise import emit_depthwise_rows, suits_depthwise_rows
    from edgecc.backends.kernels.sparse import sparse_direct_conv, sparse_pointwise_conv

    if sparse_pointwise_conv(kb, x, y, bias, window, epilogue) or sparse_direct_conv(kb, x, y, bias, window, epilogue):
        return

    if suits_depthwise_rows(x, w, window, group):
        emit_depthwise_rows(kb, x, w, bias, y, window, epilogue)
    elif prefers_channel_vectors(kb, w.shape[0], window.out[-1], group):
        emit_channel_vector_conv(kb, x, w, bias, y, window, epilogue)
    else:
        emit_direct_conv(kb, x, w, bias, y, window, group, epilogue)


def pointwise_as_1d(x: Buffer, w: Buffer, y: Buffer, window):
    """A 1x1, stride-1, unpadded convolution reads each output position's own input pixel: view its spatial axes
    as one (H*W) so the register tiles run across rows (a 7x7 map is one row of 49, not 7 rows of 7)."""
    if len(window.kernel) < 2 or set(window.kernel) != {1} or set(window.strides) != {1} or \
            any(window.pads_begin) or any(window.pads_end):
        return x, w, y, window
    flat = int(np.prod(window.out))

    def view(buf: Buffer, shape) -> Buffer:
        return Buffer(buf.ptr, dataclasses.replace(buf.type, shape=tuple(shape)))

    return (view(x, (*x.shape[:2], flat)), view(w, (*w.shape[:2], 1)), view(y, (*y.shape[:2], flat)),
            Window((1,), (1,), (1,), (0,), (0,), (flat,)))


def _lane_range(ox0: int, n: int, kx: int, sx: int, dx: int, px: int, width: int) -> tuple[int, int]:
    """Lanes j in [j0, j1) of the tile starting at output ox0 whose input ((ox0 + j) * sx + kx * dx - px) lies
    inside [0, width)."""
    valid = [j for j in range(n) if 0 <= (ox0 + j) * sx + kx * dx - px < width]
    return (valid[0], valid[-1] + 1) if valid else (0, 0)


def load_row_inside(kb: KernelBuilder, vec: Vec, x: Buffer, row, ox0: int, n: int, kx: int, sx: int, dx: int,
                    px: int, width_in: int, allow_wide: bool = False, fill=0) -> ir.Value | None:
    """The n-lane tile at output ox0 for kernel column kx, read from the input row starting at flat index `row`:
    lanes whose input lies outside [0, width_in) hold `fill` (compile-time masks); None if no lane is inside.
    `allow_wide`: a strided load may read one full span when that stays inside the row (see strided_span_ok)."""
    j0, j1 = _lane_range(ox0, n, kx, sx, dx, px, width_in)
    if j1 <= j0:
        return None
    wide = allow_wide and strided_span_ok(ox0 + j0, j1 - j0, kx, sx, dx, px, width_in)
    xv = vec.load(x, add_i64(kb, row, (ox0 + j0) * sx + kx * dx - px), j1 - j0, sx, wide)
    return vec.place(xv, j1 - j0, j0, n, fill)


def enter_kernel_rows(kb: KernelBuilder, stack: contextlib.ExitStack, window, spatial, oys) -> tuple[list, list]:
    """Loops over the kernel's taps on every spatial axis but the last, entered on `stack`, for the output rows
    `oys`: returns (kys, iys), the taps and the input rows they read. What is emitted after runs only when every
    input row is inside the input (a padded row contributes nothing)."""
    b = kb.b
    kys = [stack.enter_context(kb.loop(int(k), f"ky{a}")) for a, k in enumerate(window.kernel[:-1])]
    valid, iys = None, []
    for a, ky in enumerate(kys):
        iy = add_i64(kb, mul_i64(kb, oys[a], window.strides[a]), mul_i64(kb, ky, window.dilations[a]),
                     -window.pads_begin[a])
        inside = b.icmp_unsigned("<", iy, kb.i64(spatial[a]))
        valid = inside if valid is None else b.and_(valid, inside)
        iys.append(iy)
    if valid is not None:
        stack.enter_context(b.if_then(valid))
    return kys, iys


def plan_tiles(width_out: int, nr: int, width_in: int, kw: int, sx: int, dx: int, px: int):
    """Cut the last output axis into tiles of nr positions: (tiles [(ox0, n)], (t0, t1)), the tiles t0..t1-1
    being full-width interior tiles (every last-axis tap reads inside the input row) run by one runtime loop;
    the others (borders, the short last tile) are emitted statically with compile-time lane masks."""
    ox_lo = -(-px // sx)
    ox_hi = (width_in - 1 - (kw - 1) * dx + px) // sx + 1
    return plan_tiles_between(width_out, nr, ox_lo, ox_hi)


def plan_tiles_between(width_out: int, nr: int, ox_lo: int, ox_hi: int):
    """`plan_tiles` given the interior output range [ox_lo, ox_hi) directly."""
    tiles = [(ox0, min(nr, width_out - ox0)) for ox0 in range(0, width_out, nr)]
    interior = [ox0 >= ox_lo and ox0 + n <= ox_hi and n == nr for ox0, n in tiles]
    best, run = (0, 0), None
    for t, ok in enumerate(interior + [False]):
        if ok and run is None:
            run = t
        elif not ok and run is not None:
            if t - run > best[1] - best[0]:
                best = (run, t)
            run = None
    return tiles, (best if best[1] - best[0] >= 2 else (0, 0))


def for_blocks(kb: KernelBuilder, count: int, block: int, body, name: str = "mb") -> None:
    """body(first, size) for each block of `block` items out of `count` (a loop over the full blocks, then the
    rest): output channels of a convolution, rows of a matrix product."""
    full_blocks, rest = divmod(count, block)
    if full_blocks == 1:
        body(0, block)
    elif full_blocks > 1:
        with kb.loop(full_blocks, name) as mb:
            body(mul_i64(kb, mb, block), block)
    if rest:
        body(full_blocks * block, rest)


def emit_tile_groups(kb: KernelBuilder, tiles, loop_tiles, nr: int, emit, group: int = 1) -> None:
    """Call emit(ox0, n, static, ox_last, count) for every tile: a runtime loop over the interior run, `group`
    consecutive tiles per iteration (ox0 an i64, ox_last the run's last tile start; the run's last
    count % group tiles come one by one), static calls (ox0 an int, count 1) for the others."""
    t = 0
    while t < len(tiles):
        if t == loop_tiles[0] and loop_tiles[1] > loop_tiles[0]:
            count = loop_tiles[1] - loop_tiles[0]
            first = tiles[t][0]
            ox_last = first + (count - 1) * nr
            steps, rest = divmod(count, group)
            if steps == 1:
                emit(first, nr, False, ox_last, group)
            elif steps > 1:
                with kb.loop(steps, "tile") as ti:
                    emit(add_i64(kb, mul_i64(kb, ti, nr * group), first), nr, False, ox_last, group)
            for k in range(rest):
                emit(first + (steps * group + k) * nr, nr, False, ox_last, 1)
            t = loop_tiles[1]
            continue
        ox0, n = tiles[t]
        emit(ox0, n, True, ox0, 1)
        t += 1


def strided_span_ok(ox_last: int, n: int, kx: int, sx: int, dx: int, px: int, width_in: int) -> bool:
    """A strided load of n lanes from output ox_last on may read a full n * sx span (stays inside the row)."""
    return (ox_last + n - 1) * sx + kx * dx - px + sx - 1 <= width_in - 1


def emit_direct_conv(kb: KernelBuilder, x: Buffer, w: Buffer, bias: Buffer | None, y: Buffer, window,
                     group: int, epilogue: Epilogue) -> None:
    vec = Vec(kb, x.dtype, native_half=True)
    n_batch, channels = x.shape[:2]
    m_out = w.shape[0]
    cg, mg = channels // group, m_out // group
    spatial, out, kernel = tuple(x.shape[2:]), tuple(window.out), tuple(window.kernel)
    xs, ws, ys = strides_of(x.shape), strides_of(w.shape), strides_of(y.shape)
    width_in, width_out, kw = spatial[-1], out[-1], kernel[-1]
    sx, dx, px = window.strides[-1], window.dilations[-1], window.pads_begin[-1]

    vl = lanes(kb, vec.bits)
    nr = chunk_width(width_out, vl)
    nvec = -(-nr // vl)
    budget = vector_registers(kb) * 3 // 4
    mr = choose_block(mg, min(16, budget // nvec))
    # Few output channels per group (depthwise: one) leave too few independent FMA chains to hide the FMA
    # latency: accumulate several consecutive tiles at once instead.
    tiles_per_step = max(1, min(6, budget // (mr * nvec)))

    tiles, loop_tiles = plan_tiles(width_out, nr, width_in, kw, sx, dx, px)

    def wide_ok(ox_last: int, n: int, kx: int) -> bool:
        return strided_span_ok(ox_last, n, kx, sx, dx, px, width_in)

    accs = Accumulators(kb)

    def emit_tile(n_idx, g_idx, oys, m0, rows: int, ox0, n: int, static: bool, ox_last: int, count: int) -> None:
        """Accumulate and store output channels m0..m0+rows-1 at last-axis positions ox0..ox0+count*n-1 (`count`
        tiles of n lanes, each its own accumulators)."""
        ty = vec.ty(n)
        slots = [(r, t) for t in range(count) for r in range(rows)]
        for r, t in slots:
            if bias is not None:
                init = vec.splat(vec.scalar(bias, add_i64(kb, m0, r)), n)
            else:
                init = vec.zero(n)
            accs.set(("conv", r, t), init)
        x_batch = add_i64(kb, mul_i64(kb, n_idx, xs[0]), mul_i64(kb, g_idx, cg * xs[1]))
        with contextlib.ExitStack() as stack:
            kys, iys = enter_kernel_rows(kb, stack, window, spatial, oys)
            x_base = add_i64(kb, x_batch, *[mul_i64(kb, iy, xs[2 + a]) for a, iy in enumerate(iys)])
            w_base = add_i64(kb, mul_i64(kb, m0, ws[0]), *[mul_i64(kb, ky, ws[2 + a]) for a, ky in enumerate(kys)])
            with kb.loop(cg, "c") as c:
                xc = add_i64(kb, x_base, mul_i64(kb, c, xs[1]))
                wc = add_i64(kb, w_base, mul_i64(kb, c, ws[1]))
                values = {key: accs.get(("conv", *key), ty) for key in slots}
                for kx in range(kw):
                    weights = [vec.splat(vec.scalar(w, add_i64(kb, wc, r * ws[0] + kx)), n) for r in range(rows)]
                    for t in range(count):
                        if static:
                            xv = load_row_inside(kb, vec, x, xc, ox0, n, kx, sx, dx, px, width_in, allow_wide=True)
                            if xv is None:
                                continue
                        else:
                            start = add_i64(kb, xc, mul_i64(kb, ox0, sx), (t * n * sx) + kx * dx - px)
                            xv = vec.load(x, start, n, sx, wide_ok(ox_last, n, kx))
                        for r in range(rows):
                            values[r, t] = vec.fma(weights[r], xv, values[r, t])
                for key in slots:
                    accs.set(("conv", *key), values[key])
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), *[mul_i64(kb, o, ys[2 + a]) for a, o in enumerate(oys)],
                        ox0)
        for r, t in slots:
            flat = add_i64(kb, y_row, mul_i64(kb, add_i64(kb, m0, r), ys[1]), t * n)
            vec.store(y, flat, epilogue.apply(vec, accs.get(("conv", r, t), ty), flat, n), n)

    def emit_tiles(n_idx, g_idx, oys, m0, rows: int) -> None:
        emit_tile_groups(kb, tiles, loop_tiles, nr, lambda ox0, n, static, ox_last, count: emit_tile(
            n_idx, g_idx, oys, m0, rows, ox0, n, static, ox_last, count), tiles_per_step)

    # Loop order for cache reuse: the rows outside the channel blocks re-read every weight once per output row,
    # channel blocks outside the rows re-read the input once per block; stream whichever is smaller.
    weights_outer = mg * cg * int(np.prod(kernel)) > cg * int(np.prod(spatial))

    def channel_blocks(body) -> None:
        for_blocks(kb, mg, mr, body)

    with kb.loop(n_batch, "n") as n_idx, kb.loop(group, "g") as g_idx:
        g_base = mul_i64(kb, g_idx, mg)
        if weights_outer:
            def rows_of_block(m_first, rows):
                with kb.loop_nest(out[:-1], "oy") as oys:
                    emit_tiles(n_idx, g_idx, oys, add_i64(kb, g_base, m_first), rows)

            channel_blocks(rows_of_block)
        else:
            with kb.loop_nest(out[:-1], "oy") as oys:
                channel_blocks(lambda m_first, rows: emit_tiles(n_idx, g_idx, oys, add_i64(kb, g_base, m_first),
                                                                rows))


# ---------------------------------------------------------------------------------------------------------------
# ConvTranspose
# ---------------------------------------------------------------------------------------------------------------


@lowering("ConvTranspose")
def lower_conv_transpose(kb: KernelBuilder) -> None:
    x, w, bias, y, call = float_conv_operands(kb, "ConvTranspose")
    kernel = kernel_from_weights(call, w.shape)
    strides, dilations, begin, out = _transpose_geometry(call, x.shape[2:], kernel)
    check_output_spatial("ConvTranspose", y, out, "geometry")
    if y.size == 0:
        return
    emit_transposed_conv(kb, x, w, bias, y, tuple(kernel), strides, dilations, begin, tuple(out),
                         int(kb.attrs["group"]))


def emit_transposed_conv(kb: KernelBuilder, x: Buffer, w: Buffer, bias: Buffer | None, y: Buffer, kernel, strides,
                         dilations, begin, out, group: int) -> None:
    """Gather form, split by stride phase: output o (canvas position o + pad) receives x[i] * w[k] for the taps
    with o + pad = i * s + k * d. On the last axis the outputs o = r + s * q of one phase r (0 <= r < s) all use
    the same taps, reading i = q + c_k with c_k = (r + pad - k * d) / s: a stride-1 correlation over q with
    contiguous input loads, computed in register tiles like Conv and stored with stride s. Outer axes check per
    row which taps divide evenly. Each output element is written exactly once (bias when no tap reaches it)."""
    b = kb.b
    vec = Vec(kb, x.dtype, native_half=True)
    n_batch, channels = x.shape[:2]
    spatial = tuple(x.shape[2:])
    cg, mg = channels // group, w.shape[1]
    xs, ws, ys = strides_of(x.shape), strides_of(w.shape), strides_of(y.shape)
    width_in, width_out, kw = spatial[-1], out[-1], kernel[-1]
    sx, dx, px = strides[-1], dilations[-1], begin[-1]
    vl = lanes(kb, vec.bits)
    budget = vector_registers(kb) * 3 // 4
    mr = choose_block(mg, min(16, budget))
    accs = Accumulators(kb)

    phases = []
    for r in range(min(sx, width_out)):
        taps = [(k, (r + px - k * dx) // sx) for k in range(kw) if (r + px - k * dx) % sx == 0]
        count = len(range(r, width_out, sx))
        nr = chunk_width(count, vl)
        if taps:
            q_lo = max(0, -min(c for _, c in taps))
            q_hi = min(count, width_in - max(c for _, c in taps))
        else:
            q_lo, q_hi = 0, count
        tiles, loop_tiles = plan_tiles_between(count, nr, q_lo, q_hi)
        phases.append((r, taps, nr, tiles, loop_tiles))

    def emit_tile(n_idx, g_idx, oys, m_first, rows: int, r: int, taps, q0, n: int, static: bool) -> None:
        ty = vec.ty(n)
        m_local = m_first  # output channel within the group
        for rr in range(rows):
            if bias is not None:
                init = vec.splat(vec.scalar(bias, add_i64(kb, mul_i64(kb, g_idx, mg), m_local, rr)), n)
            else:
                init = vec.zero(n)
            accs.set(("convt", rr), init)
        x_batch = add_i64(kb, mul_i64(kb, n_idx, xs[0]), mul_i64(kb, g_idx, cg * xs[1]))
        w_group = add_i64(kb, mul_i64(kb, g_idx, cg * ws[0]), mul_i64(kb, m_local, ws[1]))
        with contextlib.ExitStack() as stack:
            kys = [stack.enter_context(kb.loop(int(k), f"ky{a}")) for a, k in enumerate(kernel[:-1])]
            valid = None
            x_row, w_row = [x_batch], [w_group]
            for a, ky in enumerate(kys):
                t = add_i64(kb, oys[a], mul_i64(kb, ky, -dilations[a]), begin[a])
                s = strides[a]
                if s == 1:
                    iy = t
                    ok = b.icmp_unsigned("<", t, kb.i64(spatial[a]))
                else:
                    nonneg = b.icmp_signed(">=", t, kb.i64(0))
                    safe = b.select(nonneg, t, kb.i64(0))
                    iy = b.udiv(safe, kb.i64(s))
                    whole = b.icmp_unsigned("==", b.urem(safe, kb.i64(s)), kb.i64(0))
                    ok = b.and_(b.and_(nonneg, whole), b.icmp_unsigned("<", iy, kb.i64(spatial[a])))
                valid = ok if valid is None else b.and_(valid, ok)
                x_row.append(mul_i64(kb, iy, xs[2 + a]))
                w_row.append(mul_i64(kb, ky, ws[2 + a]))
            if valid is not None:
                stack.enter_context(b.if_then(valid))
            x_base = add_i64(kb, *x_row)
            w_base = add_i64(kb, *w_row)
            if taps:
                with kb.loop(cg, "c") as c:
                    xc = add_i64(kb, x_base, mul_i64(kb, c, xs[1]))
                    wc = add_i64(kb, w_base, mul_i64(kb, c, ws[0]))
                    values = [accs.get(("convt", rr), ty) for rr in range(rows)]
                    for k, ck in taps:
                        if static:
                            ok_lanes = [j for j in range(n) if 0 <= q0 + j + ck < width_in]
                            if not ok_lanes:
                                continue
                            j0, j1 = ok_lanes[0], ok_lanes[-1] + 1
                            xv = vec.place(vec.load(x, add_i64(kb, xc, q0 + j0 + ck), j1 - j0), j1 - j0, j0, n)
                        else:
                            xv = vec.load(x, add_i64(kb, xc, q0, ck), n)
                        for rr in range(rows):
                            wv = vec.scalar(w, add_i64(kb, wc, rr * ws[1] + k))
                            values[rr] = vec.fma(vec.splat(wv, n), xv, values[rr])
                    for rr in range(rows):
                        accs.set(("convt", rr), values[rr])
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), *[mul_i64(kb, o, ys[2 + a]) for a, o in enumerate(oys)],
                        mul_i64(kb, q0, sx), r)
        for rr in range(rows):
            m = add_i64(kb, mul_i64(kb, g_idx, mg), m_local, rr)
            vec.store_strided(y, add_i64(kb, y_row, mul_i64(kb, m, ys[1])), accs.get(("convt", rr), ty), n, sx)


    def channel_blocks(body) -> None:
        for_blocks(kb, mg, mr, body)

    with kb.loop(n_batch, "n") as n_idx, kb.loop(group, "g") as g_idx:
        with kb.loop_nest(out[:-1], "oy") as oys:
            def block(m_first, rows):
                for r, taps, nr, tiles, loop_tiles in phases:
                    emit_tile_groups(kb, tiles, loop_tiles, nr, lambda q0, n, static, _last, _count: emit_tile(
                        n_idx, g_idx, oys, m_first, rows, r, taps, q0, n, static))

            channel_blocks(block)
