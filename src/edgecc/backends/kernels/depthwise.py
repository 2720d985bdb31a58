"""Depthwise 2-D convolution (group = channels = output channels), several output rows at a time.

A depthwise layer does only kh * kw multiply-adds per output, so the general kernel (conv.py), which walks one
output row at a time with a runtime loop over kernel rows and one accumulator per tile, is bound by loop and
bounds bookkeeping, FMA latency and reloading each input row for every output row that reads it. Here a block of R
output rows of one channel is computed together: every input row the block touches is loaded once per kernel
column (lanes outside the row masked at compile time) and added, with the right weight, into each of the block's
rows that reads it. Which output row uses which input row and tap is known at compile time; only whether an input
row lies inside the map (top and bottom padding) is checked at run time, by a select.
"""

from __future__ import annotations

from edgecc.backends.codegen import Buffer, KernelBuilder, strides_of
from edgecc.backends.kernels.conv import Accumulators, Vec, add_i64, chunk_width, lanes, load_row_inside, mul_i64, \
    vector_registers
from edgecc.backends.kernels.epilogue import Epilogue


def suits_depthwise_rows(x: Buffer, w: Buffer, window, group: int) -> bool:
    """2-D, one output channel per input channel, float; stride 1, or rows of at most 16 outputs (measured on
    Zen 4: 1.7-2.5x faster than conv.py on MobileNet-v2's stride-1 layers, 1.1-1.3x on its narrow stride-2 ones,
    slower on wide stride-2 rows, whose strided loads conv.py shares between tiles)."""
    channels = x.shape[1]
    return (len(window.kernel) == 2 and group == channels == w.shape[0] and w.shape[1] == 1
            and x.dtype.is_float and (window.strides[-1] == 1 or window.out[-1] <= 16))


def emit_depthwise_rows(kb: KernelBuilder, x: Buffer, w: Buffer, bias: Buffer | None, y: Buffer, window,
                        epilogue: Epilogue) -> None:
    b = kb.b
    vec = Vec(kb, x.dtype, native_half=True)
    n_batch, channels, height, width_in = x.shape
    (kh, kw), (sy, sx), (dy, dx) = window.kernel, window.strides, window.dilations
    (py, px), (out_h, out_w) = window.pads_begin, window.out
    xs, ws, ys = strides_of(x.shape), strides_of(w.shape), strides_of(y.shape)
    vl = lanes(kb, vec.bits)
    nr = chunk_width(out_w, vl)
    tiles = [(ox0, min(nr, out_w - ox0)) for ox0 in range(0, out_w, nr)]
    budget = vector_registers(kb) * 3 // 4
    rows = max(1, min(8, out_h, budget // len(tiles)))
    accs = Accumulators(kb)

    def block(n_idx, c, oy0, count: int) -> None:
        """Output rows oy0..oy0+count-1 of channel c."""
        for r in range(count):
            for t, (_, n) in enumerate(tiles):
                init = vec.splat(vec.scalar(bias, c), n) if bias is not None else vec.zero(n)
                accs.set(("dw", r, t), init)
        values = {(r, t): accs.get(("dw", r, t), vec.ty(n)) for r in range(count) for t, (_, n) in enumerate(tiles)}
        plane = add_i64(kb, mul_i64(kb, n_idx, xs[0]), mul_i64(kb, c, xs[1]))
        w_plane = mul_i64(kb, c, ws[0])
        first_row = add_i64(kb, mul_i64(kb, oy0, sy), -py)
        for j in range((count - 1) * sy + (kh - 1) * dy + 1):  # input rows the block reads, relative to first_row
            users = [(r, (j - r * sy) // dy) for r in range(count)
                     if (j - r * sy) % dy == 0 and 0 <= (j - r * sy) // dy < kh]
            if not users:
                continue
            iy = add_i64(kb, first_row, j)
            inside = b.icmp_unsigned("<", iy, kb.i64(height))
            row = add_i64(kb, plane, mul_i64(kb, b.select(inside, iy, kb.i64(0)), xs[2]))
            for kx in range(kw):
                weights = {ky: vec.scalar(w, add_i64(kb, w_plane, ky * ws[2] + kx)) for _, ky in users}
                for t, (ox0, n) in enumerate(tiles):
                    xv = load_row_inside(kb, vec, x, row, ox0, n, kx, sx, dx, px, width_in)
                    if xv is None:
                        continue
                    xv = b.select(inside, xv, vec.zero(n))
                    for r, ky in users:
                        values[r, t] = vec.fma(vec.splat(weights[ky], n), xv, values[r, t])
        for r in range(count):
            y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), mul_i64(kb, c, ys[1]), mul_i64(kb, add_i64(kb, oy0, r), ys[2]))
            for t, (ox0, n) in enumerate(tiles):
                flat = add_i64(kb, y_row, ox0)
                vec.store(y, flat, epilogue.apply(vec, values[r, t], flat, n), n)

    full, rest = divmod(out_h, rows)
    with kb.loop(n_batch, "n") as n_idx, kb.loop(channels, "c") as c:
        if full:
            with kb.loop(full, "rb") as rb:
                block(n_idx, c, mul_i64(kb, rb, rows), rows)
        if rest:
            block(n_idx, c, full * rows, rest)
