"""Convolution vectorised over output channels, for feature maps too narrow to fill a vector along a row.

`emit_direct_conv` (conv.py) puts consecutive output positions of one row in a vector: a 7-wide row (ResNet's last
stage) fills 7 of 8 lanes at best, a 49-position pointwise map wastes a whole tile on its last position. Here a
vector holds VL consecutive output channels at one position instead, so lanes are wasted only when the channel
count is not a multiple of VL. The weights are packed at compile time in blocks of MV * VL output channels, each
[C][kh][kw][block] (a tile's weights are one sequential stream); a register tile is MV channel vectors x P
positions of one output row: per input channel and tap it loads MV weight vectors and P input scalars (broadcast) and does MV * P fused multiply-adds. Output (and
the residual of a fused epilogue) are read and written with the channel stride H*W, once per tile.
Row borders use the same static tiles as conv.py (`plan_tiles`): only the taps inside the row are emitted.
"""

from __future__ import annotations

import contextlib

import numpy as np

from edgecc.backends.codegen import Buffer, KernelBuilder, strides_of
from edgecc.backends.kernels.conv import (Accumulators, Vec, _lane_range, add_i64, chunk_width, compute_bits,
                                          emit_tile_groups,
                                          enter_kernel_rows, for_blocks, lanes, mul_i64, plan_tiles, vector_registers)
from edgecc.backends.kernels.epilogue import Epilogue
from edgecc.backends.kernels.linalg import pack_panels


def position_vector_use(width_out: int, vl: int) -> float:
    """Share of useful lanes when rows of `width_out` positions are cut into tiles as conv.py does, every tile
    costing a whole vector of FMAs per weight (a 1-lane remainder tile issues as many as a full one)."""
    nr = chunk_width(width_out, vl)
    return width_out / (-(-width_out // nr) * max(nr, vl))


def prefers_channel_vectors(kb: KernelBuilder, channels_out: int, width_out: int, group: int) -> bool:
    """Use this kernel for constant weights (they are packed) when its lanes are clearly fuller (10 points) and the
    rows are narrow: position vectors at most 70% used, or at most 90% with a reduction of at least 200 multiply-adds
    per output (enough to pay for the per-tile strided stores). Measured on Zen 4, layer by layer: rows of 7, 10,
    13, 14, 27 and 28 and pointwise maps of 49 positions run 8-45% faster here (ResNet-18's last stage 2.8 -> 1.9
    ms per layer); rows of 55 with 16 input channels, and maps of 169 or more positions, run faster in conv.py."""
    w = kb.node.input(1)
    if group != 1 or w is None or not w.is_const or not kb.inputs[0].dtype.is_float:
        return False
    vl = lanes(kb, compute_bits(kb, kb.inputs[0].dtype))
    if vl < 4:
        return False
    channel_use = channels_out / (-(-channels_out // vl) * vl)
    position_use = position_vector_use(width_out, vl)
    depth = int(np.prod(w.type.shape[1:]))
    narrow = position_use <= 0.7 or (position_use <= 0.9 and depth >= 200)
    return narrow and channel_use >= position_use + 0.1


def pack_channel_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """W [M, C, k...] as blocks of `block` output channels (the last one narrower), each [C, k..., width]: a tile's
    weights are one sequential stream, each tap's channel vector contiguous."""
    taps_last = np.moveaxis(w, 0, -1).reshape(-1, w.shape[0])
    return pack_panels(taps_last, block)


def emit_channel_vector_conv(kb: KernelBuilder, x: Buffer, w: Buffer, bias: Buffer | None, y: Buffer, window,
                             epilogue: Epilogue) -> None:
    vec = Vec(kb, x.dtype, native_half=True)
    n_batch, channels = x.shape[:2]
    m_out = w.shape[0]
    spatial, out, kernel = tuple(x.shape[2:]), tuple(window.out), tuple(window.kernel)
    taps = int(np.prod(kernel))
    xs, ys = strides_of(x.shape), strides_of(y.shape)
    width_in, width_out, kw = spatial[-1], out[-1], kernel[-1]
    sx, dx, px = window.strides[-1], window.dilations[-1], window.pads_begin[-1]
    plane = ys[1]  # output channel stride

    vl = lanes(kb, vec.bits)
    budget = vector_registers(kb) * 3 // 4
    mv = max(1, min(4, -(-m_out // vl), budget // min(width_out, 12)))
    p_cap = max(1, min(12, budget // mv))
    p = min(width_out, p_cap)
    packed = kb.packed_input(1, lambda weights: pack_channel_blocks(weights, mv * vl))
    tiles, loop_tiles = plan_tiles(width_out, p, width_in, kw, sx, dx, px)
    accs = Accumulators(kb)

    def emit_tile(n_idx, oys, m0, count: int, ox0, n_pos: int, static: bool) -> None:
        """Output channels m0..m0+count-1 at positions ox0..ox0+n_pos-1 of the row oys."""
        vecs = [(v * vl, min(vl, count - v * vl)) for v in range(-(-count // vl))]
        slots = [(v, q) for v in range(len(vecs)) for q in range(n_pos)]
        for v, q in slots:
            off, width = vecs[v]
            init = vec.load(bias, add_i64(kb, m0, off), width) if bias is not None else vec.zero(width)
            accs.set(("cv", v, q), init)
        x_batch = mul_i64(kb, n_idx, xs[0])
        with contextlib.ExitStack() as stack:
            kys, iys = enter_kernel_rows(kb, stack, window, spatial, oys)
            tap_row = 0
            for a, ky in enumerate(kys):
                tap_row = add_i64(kb, mul_i64(kb, tap_row, int(kernel[a])), ky) if a else ky
            x_base = add_i64(kb, x_batch, *[mul_i64(kb, iy, xs[2 + a]) for a, iy in enumerate(iys)])
            # the block of channels m0..m0+count-1 starts after m0 * channels * taps packed weights
            w_base = add_i64(kb, mul_i64(kb, m0, channels * taps), mul_i64(kb, tap_row, kw * count) if kys else 0)
            with kb.loop(channels, "c") as c:
                xc = add_i64(kb, x_base, mul_i64(kb, c, xs[1]))
                wc = add_i64(kb, w_base, mul_i64(kb, c, taps * count))
                values = {key: accs.get(("cv", *key), vec.ty(vecs[key[0]][1])) for key in slots}
                for kx in range(kw):
                    if static:
                        j0, j1 = _lane_range(ox0, n_pos, kx, sx, dx, px, width_in)
                    else:
                        j0, j1 = 0, n_pos
                    if j1 <= j0:
                        continue
                    weights = [vec.load(packed, add_i64(kb, wc, kx * count + off), width) for off, width in vecs]
                    for q in range(j0, j1):
                        pos = add_i64(kb, xc, mul_i64(kb, ox0, sx), (q * sx) + kx * dx - px)
                        xv = vec.scalar(x, pos)
                        for v, (off, width) in enumerate(vecs):
                            values[v, q] = vec.fma(weights[v], vec.splat(xv, width), values[v, q])
                for key in slots:
                    accs.set(("cv", *key), values[key])
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), *[mul_i64(kb, o, ys[2 + a]) for a, o in enumerate(oys)],
                        ox0)
        for v, q in slots:
            off, width = vecs[v]
            flat = add_i64(kb, y_row, mul_i64(kb, add_i64(kb, m0, off), plane), q)
            value = accs.get(("cv", v, q), vec.ty(width))
            vec.store_strided(y, flat, epilogue.apply(vec, value, flat, width, plane), width, plane)

    with kb.loop(n_batch, "n") as n_idx:
        def block(m_first, count):
            with kb.loop_nest(out[:-1], "oy") as oys:
                emit_tile_groups(kb, tiles, loop_tiles, p, lambda ox0, n, static, _last, _count: emit_tile(
                    n_idx, oys, m_first, count, ox0, n, static))

        for_blocks(kb, m_out, mv * vl, block, "mb")
