"""Sparse-weight kernels: Gemm / MatMul with an encoded constant B, Conv (group 1) with an encoded W (float32).

The Gemm, MatMul and Conv lowerings hand a node over here when its weight's type carries a SparseEncoding (see
edgecc.ops.sparse for the stored layout: per column block of V outputs, a list of entries [k, V values]). The
weights are packed at compile time into one int32 array (`KernelBuilder.packed_input`), and the kernel walks
the offsets it reads at run time, so the pattern is data and same-shaped layers share one kernel.

- Matrix product (`emit_sparse_matmul`): output-stationary over column blocks. For MR rows of A and one column
  block, MR accumulators of V lanes; each stored entry is one V-lane load of weights, MR broadcasts of A[i, k] and MR
  fused multiply-adds. The entry loop is unrolled U times into U independent accumulator sets (summed at the
  end), so a matrix-vector product (M = 1) is not bound by the FMA latency of one chain.
- 1x1 convolution (`sparse_pointwise_conv`), after Elsen et al. 2019 ("Fast Sparse ConvNets"): output
  positions in vectors. A step covers T strips of lanes consecutive positions; for each column block
  (V output channels) the kernel walks its entries: one input load per strip for channel k, reused by the V
  channels' broadcast weights (V x T FMAs). Strided 1x1 convolutions (ResNet's downsampling) read strided lanes.
- KxK convolution (`sparse_direct_conv`): the same walk per kernel tap, the taps unrolled (each tap's entries
  are their own column blocks), so padding is a compile-time row check and lane mask per tap, as in conv.py.
  Strided convolutions (also 1x1) first copy each output row's input rows into a stack band split by column
  phase, so every tap reads contiguous strips (strided loads made them 0.5-0.95 of dense at 90%; now 0.07-0.47;
  ops.sparse.BAND_BYTES).
- Many-row products with narrow entries (`_emit_rows_in_vectors`): A's rows in vectors, the 1x1 Conv walk.

All finish each output vector with the same epilogue code as the dense kernels (bias / C, residual,
activation), so fused nodes stay fused.
"""

from __future__ import annotations

from llvmlite import ir

from edgecc.backends.codegen import F32, I32, I64, Buffer, KernelBuilder, strides_of
from edgecc.backends.kernels.conv import (Accumulators, Vec, add_i64, choose_block, entry_alloca, for_blocks,
                                          i32_vector, intrinsic, lanes, mul_i64, vector_registers)
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.sparse import (PERMUTED_LANES, PERMUTED_OVERFLOW_GROUP, PERMUTED_UNIT_WORDS, ROW_TILE_BYTES,
                               SLICE_LANES, WEIGHT_INPUT, banded, matrix_view, pack, pack_permuted, pack_sliced,
                               permuted_main_group, permuted_main_words, permuted_product,
                               permuted_run_words, PERMUTED_RUN_SLICES, rows_in_vectors,
                               sliced_index_bytes, sliced_product, sparse_capable)


def sparse_weights(kb: KernelBuilder) -> tuple[Buffer, int, int, int] | None:
    """(packed weights, V, J, K) when the node's weight is encoded and a sparse kernel computes it, else None (the
    dense kernel runs: the constant's array is the dense weight either way)."""
    value = kb.node.input(WEIGHT_INPUT)
    if value is None or value.type is None or value.type.sparse is None or sparse_capable(kb.node) is not None:
        return None
    width = value.type.sparse.width
    view = matrix_view(kb.node)
    packed = kb.packed_input(WEIGHT_INPUT, lambda w: pack(view(w), width))
    k, n = view(value.const).shape
    return packed, width, -(-n // width), k


class _Entries:
    """Reads the packed entries: the offset range of a column block, an entry's k and its V weights."""

    def __init__(self, kb: KernelBuilder, words: Buffer, width: int, blocks: int):
        self.kb, self.words, self.width, self.base = kb, words, width, blocks + 1

    def word(self, flat) -> ir.Value:
        return self.kb.b.sext(self.kb.load(self.words, add_i64(self.kb, flat)), I64)

    def span(self, block) -> tuple[ir.Value, ir.Value]:
        return self.word(block), self.word(add_i64(self.kb, block, 1))

    def record(self, entry) -> ir.Value:
        return add_i64(self.kb, mul_i64(self.kb, entry, 1 + self.width), self.base)

    def k(self, record) -> ir.Value:
        return self.word(record)

    def weights(self, record, count: int | None = None) -> ir.Value:
        """The entry's first `count` (default V) weights as a float vector."""
        count = count or self.width
        ptr = self.kb.element_ptr(self.words, add_i64(self.kb, record, 1))
        return self.kb.b.load(ptr, typ=ir.VectorType(F32, count), align=4)

    def weight(self, record, c: int) -> ir.Value:
        ptr = self.kb.element_ptr(self.words, add_i64(self.kb, record, 1 + c))
        return self.kb.b.load(ptr, typ=F32, align=4)


def stack_limit(kb: KernelBuilder, limit: int) -> int:
    """Stack bytes a kernel may take for scratch: `limit` on hosted targets, none on microcontrollers (as the int8
    kernels' bands, see qconv.emit_fast_qlinear_conv)."""
    return limit if kb.target.large_scratch else 0


def sparse_entries(kb: KernelBuilder) -> _Entries | None:
    """The node's packed entries (see sparse_weights), or None."""
    found = sparse_weights(kb)
    return None if found is None else _Entries(kb, *found[:3])


def for_column_blocks(kb: KernelBuilder, n: int, width: int, body) -> None:
    """body(jb, cols) for the column blocks of n outputs, V = width each: a loop over the full ones, then the
    narrower last (jb an i64, or an int for the last)."""
    full, tail = divmod(n, width)
    if full:
        with kb.loop(full, "jb") as jb:
            body(jb, width)
    if tail:
        body(full, tail)


def _first_lanes(kb: KernelBuilder, value: ir.Value, count: int) -> ir.Value:
    if value.type.count == count:
        return value
    return kb.b.shuffle_vector(value, ir.Constant(value.type, ir.Undefined), i32_vector(range(count)))


# ---------------------------------------------------------------------------------------------------------------
# Matrix product
# ---------------------------------------------------------------------------------------------------------------


def emit_sparse_matmul(kb: KernelBuilder, found: tuple[Buffer, int, int, int], a: Buffer, a_off, sam: int,
                       sak: int, m: int, n: int, epilogue) -> None:
    """C = A @ B for B the node's encoded weight (`found` = sparse_weights(kb), B's [K, N] view), C handed to
    `epilogue(i, j0, width, values)` in row segments like linalg.emit_matmul's."""
    if m == 0 or n == 0:
        return
    words, width, blocks, k = found
    if sak == 1 and kb.target.triple.startswith("x86_64") and \
            "+avx2" in kb.target.features.split(",") and \
            permuted_product(width, m, k, n, lanes(kb), kb.target.large_scratch):  # (vpermps)
        emit_permuted_rows(kb, a, a_off, sam, m, k, n, epilogue)
        return
    if sak == 1 and kb.target.triple.startswith("x86_64") and \
            sliced_product(width, m, k, n, lanes(kb), kb.target.large_scratch):  # (measured on x86 only)
        emit_sliced_rows(kb, a, a_off, sam, m, k, n, epilogue)
        return
    entries = _Entries(kb, words, width, blocks)
    tile = rows_in_vectors(m, k, width, lanes(kb), vector_registers(kb) * 3 // 4, stack_limit(kb, ROW_TILE_BYTES))
    if tile:
        _emit_rows_in_vectors(kb, entries, a, a_off, sam, sak, m, n, k, tile, epilogue)
        return
    vec = Vec(kb, DType.float32)
    b = kb.b
    budget = vector_registers(kb) * 3 // 4
    nvec = -(-width // lanes(kb))
    mr = choose_block(m, max(1, min(4, budget // nvec)))
    unroll = max(1, min(4, budget // (mr * nvec)))
    accs = Accumulators(kb)
    ty = vec.ty(width)

    def step(record, rows_a, u: int, rows: int) -> None:
        kk = entries.k(record)
        wv = entries.weights(record)
        for r in range(rows):
            av = vec.scalar(a, add_i64(kb, rows_a[r], b.mul(kk, kb.i64(sak)) if sak != 1 else kk))
            accs.set(("sp", u, r), vec.fma(vec.splat(av, width), wv, accs.get(("sp", u, r), ty)))

    def column_block(i0, rows: int, jb, cols: int) -> None:
        rows_a = [add_i64(kb, a_off, mul_i64(kb, add_i64(kb, i0, r), sam)) for r in range(rows)]
        for u in range(unroll):
            for r in range(rows):
                accs.set(("sp", u, r), vec.zero(width))
        first, end = entries.span(jb)
        count = b.sub(end, first)
        if unroll > 1:
            steps = b.udiv(count, kb.i64(unroll))
            with kb.loop(steps, "e") as s:
                e0 = add_i64(kb, first, mul_i64(kb, s, unroll))
                for u in range(unroll):
                    step(entries.record(add_i64(kb, e0, u)), rows_a, u, rows)
            first = add_i64(kb, first, b.mul(steps, kb.i64(unroll)))
        with kb.loop(end, "er", start=first) as e:
            step(entries.record(e), rows_a, 0, rows)
        for r in range(rows):
            total = accs.get(("sp", 0, r), ty)
            for u in range(1, unroll):
                total = vec.add(total, accs.get(("sp", u, r), ty))
            epilogue(add_i64(kb, i0, r), add_i64(kb, mul_i64(kb, jb, width)), cols, _first_lanes(kb, total, cols))

    def row_block(i0, rows: int) -> None:
        for_column_blocks(kb, n, width, lambda jb, cols: column_block(i0, rows, jb, cols))

    for_blocks(kb, m, mr, row_block, "ib")


def emit_sliced_rows(kb: KernelBuilder, a: Buffer, a_off, sam: int, m: int, k: int, n: int, epilogue) -> None:
    """C = A @ B for few rows of A and a CSR B repacked in slices of 16 columns (ops.sparse.pack_sliced). A CSR
    matrix-vector product is bound by its loads and branches: per nonzero an index, a weight and an element of A,
    and a loop of its own per column, whose exit mispredicts (0.56-0.96 of the dense kernel at 90% zeros on a Zen
    3). Here each step of a slice is, for each of its two vectors of 8 columns, one vector load of 8 weights, one
    64-bit load of 8 uint8 k (two of 8 uint16 k when K > 256), 8 scalar loads of A put in a vector (an AVX2 gather
    measured slower on Zen 3) and one FMA; one loop serves 16 columns. The sums go to their columns in a stack row
    (the slices hold columns sorted by nonzeros), then through the epilogue in order."""
    vl, per_slice = lanes(kb), SLICE_LANES
    view = matrix_view(kb.node)
    words = kb.packed_input(WEIGHT_INPUT, lambda w: pack_sliced(view(w), per_slice))
    b, vec = kb.b, Vec(kb, DType.float32)
    slices = -(-n // per_slice)
    index_bytes = sliced_index_bytes(k)
    columns0, steps0, step_words = slices + 1, slices + 1 + slices * per_slice, (4 + index_bytes) * per_slice // 4
    ks_per_word = 8 // index_bytes
    fty = vec.ty(vl)
    row_out = Buffer(b.gep(entry_alloca(kb, ir.ArrayType(F32, slices * per_slice)), [kb.i64(0), kb.i64(0)],
                           inbounds=True), TensorType(DType.float32, (slices * per_slice,)))
    accs = Accumulators(kb)

    def step(row_ptr, t) -> None:
        """Step t (counted over all slices) into the slice's accumulators."""
        record = add_i64(kb, steps0, mul_i64(kb, t, step_words))
        for v in range(per_slice // vl):
            values = b.load(kb.element_ptr(words, add_i64(kb, record, v * vl)), typ=fty, align=4)
            quads = []
            for half in range(vl // 4):
                quad = ir.Constant(vec.ty(4), ir.Undefined)
                for q in range(4):
                    lane = 4 * half + q
                    if lane % ks_per_word == 0:  # the next 64 bits of k
                        word = b.load(kb.element_ptr(words, add_i64(
                            kb, record, per_slice + (v * vl + lane) * index_bytes // 4)), typ=I64, align=4)
                    shift = 8 * index_bytes * (lane % ks_per_word)
                    kq = b.and_(b.lshr(word, kb.i64(shift)) if shift else word, kb.i64((1 << 8 * index_bytes) - 1))
                    quad = b.insert_element(quad, b.load(b.gep(row_ptr, [kq], source_etype=F32), typ=F32, align=4),
                                            ir.Constant(I32, q))
                quads.append(quad)
            x = b.shuffle_vector(quads[0], quads[1], i32_vector(range(8))) if len(quads) == 2 else quads[0]
            accs.set(("s", v), vec.fma(x, values, accs.get(("s", v), fty)))

    def row(i) -> None:
        row_ptr = kb.element_ptr(a, add_i64(kb, a_off, mul_i64(kb, i, sam)))
        with kb.loop(slices, "sl") as s:
            for v in range(per_slice // vl):
                accs.set(("s", v), vec.zero(vl))
            with kb.loop(b.sext(kb.load(words, add_i64(kb, s, 1)), I64), "st",
                         start=b.sext(kb.load(words, s), I64)) as t:
                step(row_ptr, t)
            for v in range(per_slice // vl):
                total = accs.get(("s", v), fty)
                for j in range(vl):
                    column = kb.load(words, add_i64(kb, columns0, mul_i64(kb, s, per_slice), v * vl + j))
                    kb.store(row_out, b.sext(column, I64), b.extract_element(total, ir.Constant(I32, j)))
        for_column_blocks(kb, n, vl, lambda jb, cols: epilogue(
            i, add_i64(kb, mul_i64(kb, jb, vl)), cols, vec.load(row_out, add_i64(kb, mul_i64(kb, jb, vl)), cols)))

    with kb.loop(m, "si") as i:
        row(i)


def emit_permuted_rows(kb: KernelBuilder, a: Buffer, a_off, sam: int, m: int, k: int, n: int, epilogue) -> None:
    """C = A @ B for few rows of A and a CSR B repacked in 8 x 8 blocks (ops.sparse.pack_permuted). The sliced
    kernel builds A's vectors from scalar loads and inserts (16 loads and 14 inserts per 16 slots). Here vpermps moves
    each lane's element of A's 8-element chunk into place: per chunk of a pair of slices' main run, one load of the
    chunk, one index vector (shifted for each slice and step) and four vectors of weights into four FMAs; the pair's
    loop runs K / 8 times whatever the pattern, with eight accumulators so the FMA latency is hidden. A block's steps
    past its first two are its slice's overflow units (about a quarter of the units at 90% zeros), two at a time,
    each reading its chunk's row from its index vector. Each slice's sum is 8 consecutive outputs, straight into the
    epilogue.

    Measured on a Zen 3 at 90% zeros (one row; tools/bench_sparse.py --only): 128 -> 10 0.28 of dense (sliced 0.44),
    256 -> 128 0.59-0.60 (sliced 0.66). There about 35% of the slots hold a nonzero (a block's steps are its fullest
    column's count) and vpermps is the bound: the same code with the in-lane vpermilps instead (wrong sums) took 0.44.
    Variants measured slower: units of one block each with their chunk's row (0.64), an 8-byte index expanded by
    vpmovzxbd and BMI2 pext (0.79: fewer bytes, more vector uops), a broadcast 64-bit header and vpsrlvd (0.73),
    units pairing the odd last steps of two blocks (0.74), main runs of 4 slices (0.60), vpermilps on each 128-bit
    half and on the swapped halves (0.62: one uop a step, but a column's nonzeros split by half need more steps)."""
    lanes_ = PERMUTED_LANES
    view = matrix_view(kb.node)
    words = kb.packed_input(WEIGHT_INPUT, lambda w: pack_permuted(view(w)))
    b, vec = kb.b, Vec(kb, DType.float32)
    slices = -(-n // lanes_)
    chunks, group = k // lanes_, permuted_main_group(k)
    units0 = -(-(slices + 1) // lanes_) * lanes_
    overflow0 = units0 + permuted_run_words(slices, chunks)
    fty, ity = vec.ty(lanes_), ir.VectorType(I32, lanes_)
    permps = intrinsic(kb, "llvm.x86.avx2.permps", fty, [fty, ity])
    accs = Accumulators(kb)

    def overflow_unit(row_ptr, record, key) -> None:
        """Overflow unit `record` (a word offset) into the accumulators `key`: its chunk's row is its first word's
        bits 6 and up."""
        index = b.load(kb.element_ptr(words, record), typ=ity, align=32)
        k0 = b.zext(b.lshr(b.extract_element(index, ir.Constant(I32, 0)), ir.Constant(I32, 6)), I64)
        chunk = b.load(b.gep(row_ptr, [k0], source_etype=F32), typ=fty, align=4)
        for step in range(2):
            values = b.load(kb.element_ptr(words, add_i64(kb, record, lanes_ * (1 + step))), typ=fty, align=32)
            lane_index = b.lshr(index, i32_vector([3] * lanes_)) if step else index
            acc = (*key, step)
            accs.set(acc, vec.fma(b.call(permps, [chunk, lane_index]), values, accs.get(acc, fty)))

    def slices_(i, row_ptr, s0, widths: list[int]) -> None:
        """Slice pair s0, s0 + 1 (or the last slice alone; `widths` their output columns): the pair's main run in
        one loop over the chunks, each chunk of A and each index vector loaded once for both; then each slice's
        overflow units."""
        s0 = add_i64(kb, s0)
        keys = [(j, u, step) for j in range(len(widths)) for u in range(group) for step in range(2)]
        for key in keys:
            accs.set(key, vec.zero(lanes_))
        run_words = permuted_main_words(len(widths))
        run = add_i64(kb, units0, mul_i64(kb, b.udiv(s0, kb.i64(PERMUTED_RUN_SLICES)),
                                          chunks * permuted_main_words(PERMUTED_RUN_SLICES)))
        with kb.loop(chunks // group, "pc") as g:
            c0 = mul_i64(kb, g, group)
            for u in range(group):
                c = add_i64(kb, c0, u)
                record = add_i64(kb, run, mul_i64(kb, c, run_words))
                chunk = b.load(b.gep(row_ptr, [mul_i64(kb, c, lanes_)], source_etype=F32), typ=fty, align=4)
                index = b.load(kb.element_ptr(words, record), typ=ity, align=32)
                for j in range(len(widths)):
                    for step in range(2):
                        shift = 6 * j + 3 * step
                        values = b.load(kb.element_ptr(words, add_i64(kb, record, lanes_ * (1 + 2 * j + step))),
                                        typ=fty, align=32)
                        lane_index = b.lshr(index, i32_vector([shift] * lanes_)) if shift else index
                        acc = (j, u, step)
                        accs.set(acc, vec.fma(b.call(permps, [chunk, lane_index]), values, accs.get(acc, fty)))
        for j in range(len(widths)):
            s = add_i64(kb, s0, j)
            first = b.sext(kb.load(words, s), I64)
            pairs = b.udiv(b.sub(b.sext(kb.load(words, add_i64(kb, s, 1)), I64), first),
                           kb.i64(PERMUTED_OVERFLOW_GROUP))
            start = add_i64(kb, overflow0, mul_i64(kb, first, PERMUTED_UNIT_WORDS))
            with kb.loop(pairs, "po") as q:
                pair = add_i64(kb, start, mul_i64(kb, q, PERMUTED_OVERFLOW_GROUP * PERMUTED_UNIT_WORDS))
                for u in range(PERMUTED_OVERFLOW_GROUP):
                    overflow_unit(row_ptr, add_i64(kb, pair, u * PERMUTED_UNIT_WORDS), (j, u % group))
        for j, cols in enumerate(widths):
            sums = [accs.get(key, fty) for key in keys if key[0] == j]
            while len(sums) > 1:
                sums = [vec.add(sums[t], sums[t + 1]) for t in range(0, len(sums), 2)]
            epilogue(i, mul_i64(kb, add_i64(kb, s0, j), lanes_), cols, _first_lanes(kb, sums[0], cols))

    def row(i) -> None:
        row_ptr = kb.element_ptr(a, add_i64(kb, a_off, mul_i64(kb, i, sam)))
        tail = n % lanes_
        widths = [lanes_] * (n // lanes_) + [tail] * (tail > 0)
        runs = PERMUTED_RUN_SLICES
        full_runs = slices // runs - (slices % runs == 0 and tail > 0)
        if full_runs:
            with kb.loop(full_runs, "pp") as p:
                slices_(i, row_ptr, mul_i64(kb, p, runs), [lanes_] * runs)
        if runs * full_runs < slices:
            slices_(i, row_ptr, runs * full_runs, widths[runs * full_runs:])

    with kb.loop(m, "pi") as i:
        row(i)


def _emit_rows_in_vectors(kb: KernelBuilder, entries: _Entries, a: Buffer, a_off, sam: int, sak: int, m: int, n: int,
                          k: int, tile: int, epilogue) -> None:
    """The product with rows of A in vectors (see ops.sparse.rows_in_vectors): for each tile of rows, A's tile is
    transposed into a K x tile stack array, each column block walks its entries like the 1x1 Conv kernel (one
    vector load per strip of rows, shared by the block's V columns), and the column vectors go through a small
    stack tile back to row segments of lanes columns for the epilogue."""
    vec = Vec(kb, DType.float32)
    vl, width, b = lanes(kb), entries.width, kb.b
    group = max(1, vl // width)  # column blocks per row segment
    segment = group * width

    def stack(count: int) -> Buffer:
        first = b.gep(entry_alloca(kb, ir.ArrayType(F32, count)), [kb.i64(0), kb.i64(0)], inbounds=True)
        return Buffer(first, TensorType(DType.float32, (count,)))  # scalar stores and vector loads only

    at, ct = stack(k * tile), stack(tile * segment)

    def copy_scalar(i0, row_range, k_start: int) -> None:
        if not row_range or k_start >= k:
            return
        with kb.loop(k, "kt", start=k_start) as kk:
            a_k = add_i64(kb, a_off, mul_i64(kb, kk, sak))
            for r in row_range:
                value = kb.load(a, add_i64(kb, a_k, mul_i64(kb, add_i64(kb, i0, r), sam)))
                kb.store(at, add_i64(kb, mul_i64(kb, kk, tile), r), value)

    def fill_tile(i0, rows: int) -> None:
        """at[k * tile + r] = A[i0 + r, k]: vl x vl blocks transposed in registers where A's rows run along k,
        element by element elsewhere."""
        strips = rows // vl if sak == 1 and vl > 1 else 0
        chunks = k // vl if strips else 0
        if chunks:
            vector_ptr = ir.PointerType(vec.ty(vl))
            with kb.loop(chunks, "kc") as kc:
                k0 = mul_i64(kb, kc, vl)
                for s0 in range(0, strips * vl, vl):
                    rows_v = [vec.load(a, add_i64(kb, a_off, mul_i64(kb, add_i64(kb, i0, s0 + r), sam), k0), vl)
                              for r in range(vl)]
                    for j, column in enumerate(transpose_square(kb, rows_v)):
                        ptr = kb.element_ptr(at, add_i64(kb, mul_i64(kb, add_i64(kb, k0, j), tile), s0))
                        b.store(column, b.bitcast(ptr, vector_ptr), align=4)
        copy_scalar(i0, range(strips * vl, rows), 0)
        copy_scalar(i0, range(strips * vl), chunks * vl)

    def row_block(i0, rows: int) -> None:
        fill_tile(i0, rows)
        widths = strip_widths(rows, vl)
        offsets = [sum(widths[:t]) for t in range(len(widths))]

        def columns(block0, count: int, cols_total: int) -> None:
            for blk in range(count):
                cols = min(width, cols_total - blk * width)

                def finish(c, t, w, value, blk=blk):
                    for j in range(w):
                        lane = b.extract_element(value, ir.Constant(I32, j))
                        kb.store(ct, kb.i64((offsets[t] + j) * segment + blk * width + c), lane)

                walk_entries(kb, entries, at, tile, 0, 1, add_i64(kb, block0, blk), cols, widths,
                             lambda c, t, w: vec.zero(w), finish)
            for r in range(rows):
                epilogue(add_i64(kb, i0, r), add_i64(kb, mul_i64(kb, block0, width)), cols_total,
                         vec.load(ct, kb.i64(r * segment), cols_total))

        full = n // segment
        if full:
            with kb.loop(full, "jg") as g:
                columns(mul_i64(kb, g, group), group, segment)
        if n % segment:
            columns(full * group, -(-(n % segment) // width), n % segment)

    for_blocks(kb, m, tile, row_block, "it")


# ---------------------------------------------------------------------------------------------------------------
# 1x1 convolution
# ---------------------------------------------------------------------------------------------------------------


def accumulate_entries(kb: KernelBuilder, entries: _Entries, accs: Accumulators, block, group: range,
                       widths: list[int], load_strip) -> None:
    """acc[c][t] += weight[c] * load_strip(k, t, w) over the entries of column `block`, for the outputs c in
    `group` and strips t of widths[t] lanes (load_strip may return None: that strip reads nothing)."""
    vec = Vec(kb, DType.float32)
    first, end = entries.span(block)
    with kb.loop(end, "e", start=first) as e:
        record = entries.record(e)
        kk = entries.k(record)
        weights = [vec.splat(entries.weight(record, c), max(widths)) for c in group]
        for t, w in enumerate(widths):
            sv = load_strip(kk, t, w)
            if sv is None:
                continue
            for c, wsplat in zip(group, weights):
                accs.set(("walk", c, t), vec.fma(_first_lanes(kb, wsplat, w), sv, accs.get(("walk", c, t), vec.ty(w))))


def walk_blocks(kb: KernelBuilder, entries: _Entries, cols: int, widths: list[int], init, accumulate, finish) -> None:
    """The outputs-by-vectors walk of the convolution kernels and the rows-in-vectors product: for chunks of the
    `cols` outputs c of a column block (within the register budget), acc[c][t] = init(c, t, w), then
    accumulate(accs, group) (calls of accumulate_entries), then finish(c, t, w, acc[c][t])."""
    vec = Vec(kb, DType.float32)
    accs = Accumulators(kb)
    chunk = min(entries.width, vector_registers(kb) * 3 // 4)
    for c0 in range(0, cols, chunk):
        group = range(c0, min(cols, c0 + chunk))
        for c in group:
            for t, w in enumerate(widths):
                accs.set(("walk", c, t), init(c, t, w))
        accumulate(accs, group)
        for c in group:
            for t, w in enumerate(widths):
                finish(c, t, w, accs.get(("walk", c, t), vec.ty(w)))


def walk_entries(kb: KernelBuilder, entries: _Entries, src: Buffer, k_stride: int, src_row, step: int, jb,
                 cols: int, widths: list[int], init, finish) -> None:
    """walk_blocks over one column block jb whose entries read strips src[src_row + k * k_stride + lane * step]
    (consecutive strips after each other)."""
    vec = Vec(kb, DType.float32)
    offsets = [sum(widths[:t]) for t in range(len(widths))]

    def strip(kk, t, w):
        return vec.load(src, add_i64(kb, src_row, kb.b.mul(kk, kb.i64(k_stride)), offsets[t] * step), w, step)

    walk_blocks(kb, entries, cols, widths, init,
                lambda accs, group: accumulate_entries(kb, entries, accs, jb, group, widths, strip), finish)


def transpose_square(kb: KernelBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The columns of n vectors of n lanes (n a power of two): log2(n) rounds of interleaving row i with row
    i + n/2 (unpacklo/unpackhi, zip1/zip2)."""
    n = len(rows)
    lo = i32_vector(j // 2 + (j % 2) * n for j in range(n))
    hi = i32_vector(n // 2 + j // 2 + (j % 2) * n for j in range(n))
    for _ in range(n.bit_length() - 1):
        pairs = [(rows[i], rows[i + n // 2]) for i in range(n // 2)]
        rows = [kb.b.shuffle_vector(x, y, mask) for x, y in pairs for mask in (lo, hi)]
    return rows


def conv_ends(kb: KernelBuilder, y: Buffer, bias: Buffer | None, epilogue, jb, width: int, y_row, offsets):
    """(init, finish) of walk_blocks for a convolution's column block jb: accumulators start at the channel's bias;
    strip t of channel c goes through the epilogue to Y[y_row + (jb * V + c) * C-stride + offsets[t]]."""
    vec = Vec(kb, DType.float32)
    channel_stride = strides_of(y.shape)[1]

    def init(c, t, w):
        return vec.splat(vec.scalar(bias, add_i64(kb, mul_i64(kb, jb, width), c)), w) if bias is not None \
            else vec.zero(w)

    def finish(c, t, w, acc):
        flat = add_i64(kb, y_row, mul_i64(kb, add_i64(kb, mul_i64(kb, jb, width), c), channel_stride), offsets[t])
        vec.store(y, flat, epilogue.apply(vec, acc, flat, w), w)

    return init, finish


def strip_widths(count: int, vl: int) -> list[int]:
    """Strips of vl lanes covering `count` items, the last one narrower."""
    return [vl] * (count // vl) + ([count % vl] if count % vl else [])


def sparse_pointwise_conv(kb: KernelBuilder, x: Buffer, y: Buffer, bias: Buffer | None, window, epilogue) -> bool:
    """Y = W * X (+ bias, epilogue) for a 1x1, unpadded, group-1 Conv whose W is encoded. `window` is the
    reference's geometry (after conv.pointwise_as_1d, which views stride-1 maps as one row). False (nothing
    emitted) when W is not encoded or the geometry is not a plain 1x1 one."""
    if set(window.kernel) != {1} or any(window.pads_begin) or any(window.pads_end) or _banded(kb, x, window):
        return False  # strided 2-D: sparse_direct_conv's band is faster than strided loads
    entries = sparse_entries(kb)
    if entries is None:
        return False
    width, vec = entries.width, Vec(kb, DType.float32)
    n_batch, channels_out = x.shape[0], y.shape[1]
    out = tuple(window.out)
    xs, ys = strides_of(x.shape), strides_of(y.shape)
    strides = tuple(window.strides)
    sx = strides[-1]
    vl = lanes(kb)
    strips = max(1, min(8, (vector_registers(kb) * 3 // 4) // min(width, vector_registers(kb) * 3 // 4)))

    def channel_block(n_idx, oys, ox0, widths: list[int], jb, cols: int) -> None:
        x_row = add_i64(kb, mul_i64(kb, n_idx, xs[0]),
                        *[mul_i64(kb, oy, strides[a] * xs[2 + a]) for a, oy in enumerate(oys)], mul_i64(kb, ox0, sx))
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), *[mul_i64(kb, oy, ys[2 + a]) for a, oy in enumerate(oys)], ox0)
        offsets = [sum(widths[:t]) for t in range(len(widths))]

        walk_entries(kb, entries, x, xs[1], x_row, sx, jb, cols, widths,
                     *conv_ends(kb, y, bias, epilogue, jb, width, y_row, offsets))

    def positions(n_idx, oys, ox0, widths: list[int]) -> None:
        for_column_blocks(kb, channels_out, width, lambda jb, cols: channel_block(n_idx, oys, ox0, widths, jb, cols))

    width_out = out[-1]
    step = strips * vl
    steps, rest = divmod(width_out, step)
    with kb.loop(n_batch, "n") as n_idx, kb.loop_nest(out[:-1], "oy") as oys:
        if steps:
            with kb.loop(steps, "px") as s:
                positions(n_idx, oys, mul_i64(kb, s, step), [vl] * strips)
        if rest:
            positions(n_idx, oys, steps * step, strip_widths(rest, vl))
    return True


# ---------------------------------------------------------------------------------------------------------------
# KxK convolution
# ---------------------------------------------------------------------------------------------------------------


def sparse_direct_conv(kb: KernelBuilder, x: Buffer, y: Buffer, bias: Buffer | None, window, epilogue) -> bool:
    """Y = W * X for a 2-D, group-1 Conv of any kernel, strides, dilations and pads whose W is encoded. The weight's
    [K, N] view is [C_in, taps x C_out] (ops.sparse.matrix_view), so column block (tap, jb) lists the input
    channels of tap (ky, kx) for V output channels: for each tile of output positions and block of V channels, the
    kernel walks the taps (unrolled: the row check and the border lanes are compile-time per tap) and each tap's
    entries like the 1x1 kernel. Border tiles load only the lanes inside the row (conv.load_row_inside).
    False when W is not encoded, X is not 2-D, or V does not divide C_out (blocks would straddle taps)."""
    value = kb.node.input(WEIGHT_INPUT)
    encoding = value.type.sparse if value is not None and value.type is not None else None
    if len(window.kernel) != 2 or encoding is None or (y.shape[1] % encoding.width and window.kernel != (1, 1)):
        return False
    entries = sparse_entries(kb)
    if entries is None:
        return False
    from edgecc.backends.kernels.conv import emit_tile_groups, load_row_inside, plan_tiles

    width, vec, b = entries.width, Vec(kb, DType.float32), kb.b
    (kh, kw), (sy, sx), (dy, dx), (py, px) = window.kernel, window.strides, window.dilations, window.pads_begin
    height, width_in = x.shape[2:]
    xs, ys = strides_of(x.shape), strides_of(y.shape)
    vl = lanes(kb)
    channel_blocks = -(-y.shape[1] // width)  # (V divides C_out unless the kernel is 1x1)
    strips = max(1, min(8, (vector_registers(kb) * 3 // 4) // min(width, vector_registers(kb) * 3 // 4)))
    if _banded(kb, x, window):
        _emit_banded_conv(kb, entries, x, y, bias, window, epilogue, strips)
        return True
    tiles, loop_tiles = plan_tiles(window.out[1], vl, width_in, kw, sx, dx, px)

    def tile_block(n_idx, oy, ox0, widths: list[int], static: bool, jb, cols: int) -> None:
        offsets = [sum(widths[:t]) for t in range(len(widths))]
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), mul_i64(kb, oy, ys[2]), ox0)

        def accumulate(accs, group) -> None:
            for ky in range(kh):
                iy = add_i64(kb, mul_i64(kb, oy, sy), ky * dy - py)
                with b.if_then(b.icmp_unsigned("<", iy, kb.i64(height))):
                    row = add_i64(kb, mul_i64(kb, n_idx, xs[0]), b.mul(iy, kb.i64(xs[2])))
                    for kx in range(kw):
                        def strip(kk, t, w, kx=kx):
                            chan = add_i64(kb, row, b.mul(kk, kb.i64(xs[1])))
                            if static:
                                return load_row_inside(kb, vec, x, chan, ox0 + offsets[t], w, kx, sx, dx, px, width_in)
                            start = add_i64(kb, chan, mul_i64(kb, ox0, sx), offsets[t] * sx + kx * dx - px)
                            return vec.load(x, start, w, sx)

                        block = add_i64(kb, jb, (ky * kw + kx) * channel_blocks)
                        accumulate_entries(kb, entries, accs, block, group, widths, strip)

        init, finish = conv_ends(kb, y, bias, epilogue, jb, width, y_row, offsets)
        walk_blocks(kb, entries, cols, widths, init, accumulate, finish)

    def emit(n_idx, oy, ox0, n: int, static: bool, count: int) -> None:
        for_column_blocks(kb, y.shape[1], width,
                          lambda jb, cols: tile_block(n_idx, oy, ox0, [n] * count, static, jb, cols))

    with kb.loop(x.shape[0], "n") as n_idx, kb.loop(window.out[0], "oy") as oy:
        emit_tile_groups(kb, tiles, loop_tiles, vl, lambda ox0, n, static, _last, count: emit(
            n_idx, oy, ox0, n, static, count), strips)
    return True


def _banded(kb: KernelBuilder, x: Buffer, window) -> bool:
    return banded(x.shape[1], window.kernel, window.strides, window.dilations, window.out[-1], kb.target.large_scratch)


def _emit_banded_conv(kb: KernelBuilder, entries: _Entries, x: Buffer, y: Buffer, bias: Buffer | None, window,
                      epilogue, strips: int) -> None:
    """A strided convolution: for each output row, the input rows it reads are first copied into a stack band,
    split by column phase and zero-padded: band[c][ky][phase][q] = X[c, oy*sy + ky*dy - py, q*sx + phase - px]
    (0 outside X). Tap (ky, kx) then reads output positions ox..ox+n-1 as the contiguous band[c][ky][phase(kx)]
    [ox + (kx*dx) // sx ...]: full-width vector loads with no strided shuffles, lane masks or row checks."""
    vec, b = Vec(kb, DType.float32), kb.b
    width = entries.width
    (kh, kw), (sy, sx), (dy, dx), (py, px) = window.kernel, window.strides, window.dilations, window.pads_begin
    height, width_in = x.shape[2:]
    channels, channel_blocks = x.shape[1], -(-y.shape[1] // width)
    xs, ys = strides_of(x.shape), strides_of(y.shape)
    phases = sorted({(kx * dx) % sx for kx in range(kw)})
    span = window.out[1] + (kw - 1) * dx // sx
    count = channels * kh * len(phases) * span
    band = Buffer(b.gep(entry_alloca(kb, ir.ArrayType(F32, count)), [kb.i64(0), kb.i64(0)], inbounds=True),
                  TensorType(DType.float32, (count,)))
    vl = lanes(kb)

    def fill(n_idx, oy) -> None:
        with kb.loop(channels, "bc") as c:
            for ky in range(kh):
                iy = add_i64(kb, mul_i64(kb, oy, sy), ky * dy - py)
                row_ok = b.icmp_unsigned("<", iy, kb.i64(height))
                row = add_i64(kb, mul_i64(kb, n_idx, xs[0]), b.mul(c, kb.i64(xs[1])), b.mul(iy, kb.i64(xs[2])))
                for pi, phase in enumerate(phases):
                    base = mul_i64(kb, add_i64(kb, mul_i64(kb, c, kh * len(phases)), ky * len(phases) + pi), span)
                    with kb.loop(span, "bq") as q:
                        ix = add_i64(kb, mul_i64(kb, q, sx), phase - px)
                        inside = b.and_(row_ok, b.icmp_unsigned("<", ix, kb.i64(width_in)))
                        value = kb.load(x, b.select(inside, add_i64(kb, row, ix), kb.i64(0)))
                        kb.store(band, add_i64(kb, base, q), b.select(inside, value, ir.Constant(F32, 0.0)))

    def channel_block(n_idx, oy, ox0, widths: list[int], jb, cols: int) -> None:
        offsets = [sum(widths[:t]) for t in range(len(widths))]
        y_row = add_i64(kb, mul_i64(kb, n_idx, ys[0]), mul_i64(kb, oy, ys[2]), ox0)

        def accumulate(accs, group) -> None:
            for ky in range(kh):
                for kx in range(kw):
                    lane0 = phases.index((kx * dx) % sx) * span + (kx * dx) // sx

                    def strip(kk, t, w, ky=ky, lane0=lane0):
                        plane = b.add(b.mul(kk, kb.i64(kh * len(phases) * span)), kb.i64(ky * len(phases) * span))
                        return vec.load(band, add_i64(kb, plane, ox0, lane0 + offsets[t]), w)

                    accumulate_entries(kb, entries, accs, add_i64(kb, jb, (ky * kw + kx) * channel_blocks), group,
                                       widths, strip)

        init, finish = conv_ends(kb, y, bias, epilogue, jb, width, y_row, offsets)
        walk_blocks(kb, entries, cols, widths, init, accumulate, finish)

    def positions(n_idx, oy, ox0, widths: list[int]) -> None:
        for_column_blocks(kb, y.shape[1], width, lambda jb, cols: channel_block(n_idx, oy, ox0, widths, jb, cols))

    step = strips * vl
    steps, rest = divmod(window.out[1], step)
    with kb.loop(x.shape[0], "n") as n_idx, kb.loop(window.out[0], "oy") as oy:
        fill(n_idx, oy)
        if steps:
            with kb.loop(steps, "px") as s_:
                positions(n_idx, oy, mul_i64(kb, s_, step), [vl] * strips)
        if rest:
            positions(n_idx, oy, steps * step, strip_widths(rest, vl))
