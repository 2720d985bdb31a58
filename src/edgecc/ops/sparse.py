"""Sparse weights: which layers take them, the [K, N] view an encoding is defined on, and the stored layout.

Shared by the encode-sparsity pass (what to encode, how many bytes it takes) and the sparse kernels (which pack
it at compile time), so both agree on one format.

A weight is seen as a matrix [K, N], K the reduction, N the outputs: Gemm's B (B^T with transB=1), MatMul's 2-D
B, a Conv's W as [C_in, taps x C_out] (column tap * C_out + co; a 1x1 Conv's W^T), so a KxK kernel finds each
tap's entries in their own column blocks. The stored form of an encoding with entries 1xV (`csr`: V = 1) is one int32
array (float32 values kept as their bits), so same-shaped layers share one kernel and the pattern is data:

    words[0 : J + 1]      entry offsets of the J = ceil(N / V) column blocks (column block j: columns jV..jV+V-1)
    then per entry        [k, v_0, ..., v_{V-1}]   (1 + V words; columns past N hold 0)

An entry is stored wherever any of its V values is nonzero; column block j's entries are in increasing k.

int8 weights (edgecc.QGemm's B with zero points all 0, as quantize-int8 makes) have a byte layout of their own
(`pack_int8`), read with byte loads only, so no alignment is needed past the offsets (Cortex-M included):

    offsets[0 : J + 1]     entry offsets of the column blocks, as above: little-endian uint16 when every count
                           fits (K x J <= 65535, a property of the shape), else int32 (`int8_offset_bytes`)
    then per entry         [k lo byte, k hi byte, v_0, ..., v_{V-1}]   (2 + V bytes: k a little-endian uint16)
    zero bytes up to a multiple of 4 (the array is int32)

At 90% unstructured sparsity (V = 1) that is 3 bytes per nonzero: 7.5% of the float32 bytes, plus the offsets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgecc.ir.core import Node
from edgecc.ir.dtypes import DType
from edgecc.ir.types import SparseEncoding

SPARSE_OPS = ("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Conv", "FusedConv")
WEIGHT_INPUT = 1
"""The weight operand of every op above (Gemm/MatMul B, Conv W)."""
INT8_SPARSE_OPS = ("QGemm", "QLinearConv")
"""int8 layers with a sparse kernel (backends/kernels/qsparse.py; QLinearConv: group 1, 2-D, or 1x1 stride 1
unpadded of any rank); their weight is input 3 (B, W)."""
INT8_WEIGHT_INPUT = 3
MAX_INT8_K = 65535
"""The int8 layout stores k as a uint16."""


def weight_input(node: Node) -> int:
    """The index of `node`'s weight operand."""
    return INT8_WEIGHT_INPUT if node.op in INT8_SPARSE_OPS else WEIGHT_INPUT


def _int8_capable(node: Node) -> str | None:
    x, w, zp = node.input(0), node.input(INT8_WEIGHT_INPUT), node.input(5)
    if w is None or not w.is_const or w.type.dtype is not DType.int8:
        return "the weight is not a constant int8 array"
    if x is None or x.type is None or x.type.dtype not in (DType.uint8, DType.int8):
        return "the activation is not int8 / uint8"
    if zp is not None and (not zp.is_const or np.any(zp.const != 0)):
        return "the weight zero point is not 0 (the int8 sparse kernel takes symmetric weights)"
    if node.op == "QLinearConv":
        if node.attrs.get("group", 1) != 1:
            return "grouped convolution"
        if not pointwise_unit(node) and x.type.rank != 4:
            return f"{x.type.rank - 2}-D convolution (int8 sparse kernels: 1x1 stride 1 of any rank, others 2-D)"
        if any(node.input(i) is None or node.input(i).type.size != 1 for i in (1, 6)):
            return "per-tensor x_scale and y_scale only"
        k = w.type.shape[1]
    else:
        k = w.type.shape[1] if node.attrs.get("transB", 0) else w.type.shape[0]
    return None if k <= MAX_INT8_K else f"K = {k} exceeds the int8 layout's uint16 index"


def pointwise_unit(node: Node) -> bool:
    """A Conv / QLinearConv with a 1x1 kernel, stride 1 and no padding: a matrix product per image."""
    w = node.input(weight_input(node))
    return all(d == 1 for d in w.type.shape[2:]) and not any(node.attrs.get("pads", ())) and \
        all(s == 1 for s in node.attrs.get("strides", ())) and \
        node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def sparse_capable(node: Node) -> str | None:
    """None if the sparse kernels compute `node` with its weight encoded, else why not (one line)."""
    if node.op in INT8_SPARSE_OPS:
        return _int8_capable(node)
    if node.op not in SPARSE_OPS or node.domain not in ("", "edgecc"):
        return f"{node.op} has no sparse kernel"
    x, w = node.input(0), node.input(WEIGHT_INPUT)
    if w is None or not w.is_const:
        return "the weight is not a constant"
    if x is None or x.type is None or x.type.dtype is not DType.float32 or w.type.dtype is not DType.float32:
        return "only float32 layers have sparse kernels"
    if node.op in ("MatMul", "FusedMatMul"):
        return None if w.type.rank == 2 else "MatMul weight is not 2-D"
    if node.op in ("Conv", "FusedConv"):
        kernel = w.type.shape[2:]
        if node.attrs.get("group", 1) != 1:
            return "grouped convolution"
        pointwise = all(d == 1 for d in kernel) and not any(node.attrs.get("pads", ())) and \
            node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        if not pointwise and x.type.rank != 4:
            return f"{x.type.rank - 2}-D convolution (sparse kernels: 1x1 of any rank, KxK 2-D)"
    return None


def encodable(node: Node, encoding: SparseEncoding) -> bool:
    """The kernels take `node` (sparse_capable) with `encoding`: a KxK Conv's blocks must not straddle taps (V
    divides C_out)."""
    w = node.inputs[weight_input(node)].type
    if node.op in ("Conv", "FusedConv", "QLinearConv") and w.size // max(1, w.shape[0] * w.shape[1]) > 1:
        return w.shape[0] % encoding.width == 0
    return True


def matrix_view(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    """The function taking `node`'s weight array to the [K, N] matrix encodings are defined on (a view). It
    depends only on the op and transB, so kernels shared by same-shaped layers can keep it as their packing."""
    if node.op in ("Conv", "FusedConv", "QLinearConv"):
        return _conv_view
    if node.op in ("Gemm", "FusedGemm", "QGemm") and node.attrs.get("transB", 0):
        return np.transpose
    return np.asarray


def _conv_view(array: np.ndarray) -> np.ndarray:
    """W [C_out, C_in, *kernel] as [C_in, taps x C_out]: column tap * C_out + co (for 1x1, W^T)."""
    c_out, c_in = array.shape[:2]
    return array.reshape(c_out, c_in, -1).transpose(1, 2, 0).reshape(c_in, -1)


def weight_matrix(node: Node, array: np.ndarray) -> np.ndarray:
    """The weight `array` of `node` as its [K, N] matrix."""
    return matrix_view(node)(array)


def entry_mask(matrix: np.ndarray, width: int) -> np.ndarray:
    """[K, J] booleans: which 1 x width entries of the [K, N] matrix are stored (any value nonzero)."""
    k, n = matrix.shape
    blocks = -(-n // width)
    padded = np.zeros((k, blocks * width), dtype=bool)
    padded[:, :n] = matrix != 0
    return padded.reshape(k, blocks, width).any(axis=2)


def stored_words(matrix: np.ndarray, width: int) -> int:
    """int32 words of the stored form (offsets + entries)."""
    blocks = -(-matrix.shape[1] // width)
    return blocks + 1 + int(entry_mask(matrix, width).sum()) * (1 + width)


def pack(matrix: np.ndarray, width: int) -> np.ndarray:
    """The stored form (module docstring) of a float32 [K, N] matrix with 1 x width entries."""
    k, n = matrix.shape
    blocks = -(-n // width)
    values = np.zeros((k, blocks * width), dtype=np.float32)
    values[:, :n] = matrix
    values = values.reshape(k, blocks, width).transpose(1, 0, 2)  # [J, K, V]
    mask = entry_mask(matrix, width).T  # [J, K]
    counts = mask.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    js, ks = np.nonzero(mask)  # row-major over [J, K]: by column block, then increasing k
    records = np.empty((len(ks), 1 + width), dtype=np.int32)
    records[:, 0] = ks
    records[:, 1:] = values[js, ks].view(np.int32)
    return np.concatenate([offsets, records.reshape(-1)])


SLICE_LANES = 16
"""Columns of a slice of the sliced matrix-vector layout (`pack_sliced`): two AVX vectors of float32."""
MAX_SLICED_K = 65535
"""The sliced layout stores k as a uint16 (a uint8 when K <= 256: `sliced_index_bytes`)."""


def sliced_index_bytes(k: int) -> int:
    """Bytes per k in the sliced layout: 1 when every k of a K <= 256 fits a uint8 (5 bytes per slot, and half the
    index loads: 0.91 -> 0.89 us on mlp_mnist's 256->128 at 90% on a Zen 3), else 2."""
    return 1 if k <= 256 else 2


def sliced_product(width: int, rows: int, k: int, n: int, lanes: int, hosted: bool) -> bool:
    """A matrix product takes the sliced layout (`pack_sliced`): CSR (width 1) with fewer rows of A than the
    target's 8 float lanes (AVX; more rows go in vectors, see rows_in_vectors), k within a uint16, on a hosted
    target (its output row on the stack: at most ROW_TILE_BYTES)."""
    return width == 1 and lanes == SLICE_LANES // 2 and rows < lanes and k <= MAX_SLICED_K and hosted and \
        -(-n // SLICE_LANES) * SLICE_LANES * 4 <= ROW_TILE_BYTES


def pack_sliced(matrix: np.ndarray, lanes: int = SLICE_LANES) -> np.ndarray:
    """The sliced matrix-vector layout of a float32 [K, N] CSR weight, for a product with few rows of A
    (backends/kernels/sparse.py `emit_sliced_rows`): the columns sorted by their count of nonzeros (so a slice's
    columns have about as many and little padding is needed), in slices of `lanes`, each slice's nonzeros
    interleaved so that step t of the slice holds the t-th nonzero of each of its columns, as int32 words:

        steps[0 : S + 1]         first step of each of the S = ceil(N / lanes) slices (cumulative)
        columns[0 : S x lanes]   the output column of each lane of each slice (N and up: the padding lanes)
        then per step            lanes float32 values, then lanes k: uint8 if K <= 256 else uint16
                                 (`sliced_index_bytes`; lanes / 4 or lanes / 2 words)

    A column with fewer nonzeros than its slice's longest is padded with the value 0.0 at its last k (0 if it has
    none): the product then reads only elements of A the dense product multiplies by a weight of that column, so a
    non-finite A gives NaN exactly where the dense kernel's 0 x inf would. A step is 5 or 6 x lanes bytes: 5 or 6
    bytes per stored slot, padding included, against CSR's 8 per nonzero."""
    k, n = matrix.shape
    if k > MAX_SLICED_K:
        raise ValueError(f"K = {k} does not fit the sliced layout's uint16 index")
    slices = -(-n // lanes)
    counts = np.count_nonzero(matrix, axis=0)
    columns = np.concatenate([np.argsort(-counts, kind="stable"), np.arange(n, slices * lanes)]).astype(np.int32)
    lengths = np.concatenate([counts, np.zeros(slices * lanes - n, counts.dtype)])[columns]
    steps = np.concatenate([[0], np.cumsum(lengths.reshape(slices, lanes).max(axis=1))]).astype(np.int32)
    values = np.zeros((int(steps[-1]), lanes), np.float32)
    indices = np.zeros((int(steps[-1]), lanes), np.uint16)
    for lane, col in enumerate(columns[:n]):
        rows = np.flatnonzero(matrix[:, col])
        s, j = divmod(lane, lanes)
        span = slice(steps[s], steps[s + 1])
        values[span, j][:rows.size] = matrix[rows, col]
        indices[span, j] = rows[-1] if rows.size else 0
        indices[span, j][:rows.size] = rows
    body = np.concatenate([values.view(np.uint8).reshape(-1, 4 * lanes),
                           indices.astype("<u2" if sliced_index_bytes(k) == 2 else "u1").view(np.uint8)
                           .reshape(-1, sliced_index_bytes(k) * lanes)], axis=1)
    return np.concatenate([steps, columns, body.reshape(-1).view("<i4").astype(np.int32)])


PERMUTED_LANES = 8
"""Columns of a slice and rows of a chunk in the permuted layout (`pack_permuted`): one AVX vector of float32, and
the 8 entries vpermps selects from."""
PERMUTED_GROUP = 4
"""Units the permuted kernel walks per iteration of its loop over a slice's blocks: 8 accumulators, so no chain waits
on the FMA latency (4 cycles on Zen 3). A slice's overflow units come in pairs (PERMUTED_OVERFLOW_GROUP)."""
PERMUTED_OVERFLOW_GROUP = 2
PERMUTED_UNIT_WORDS = 3 * PERMUTED_LANES
"""int32 words of a unit: 8 index words, then two steps of 8 float32 values."""
PERMUTED_MAX_CHUNKS = 1 << 23
"""An overflow unit's first index word stores its chunk's first row in its bits 6 and up."""
PERMUTED_CACHED_BYTES = 262144
"""The permuted layout stores about 19 bytes per nonzero at 90% zeros (a 32-byte index vector and 2 steps x 8 lanes
of float32 per unit, padding included: 0.5 of the dense bytes) against the sliced layout's 5-6 per slot: it is
chosen where the dense weight fits a Zen 3's L2 (512 KiB) and so does the layout; larger weights stream from L3 and
the sliced layout's fewer bytes win (784 -> 256 at 90%: 5.3 us against 5.1)."""


def permuted_product(width: int, rows: int, k: int, n: int, lanes: int, hosted: bool) -> bool:
    """A matrix product takes the permuted layout (`pack_permuted`): the sliced kernel's cases (CSR, few rows of A,
    an AVX host) with K a multiple of the 8-row chunks and a dense weight within PERMUTED_CACHED_BYTES."""
    return sliced_product(width, rows, k, n, lanes, hosted) and k % PERMUTED_LANES == 0 and \
        k // PERMUTED_LANES <= PERMUTED_MAX_CHUNKS and 4 * k * n <= PERMUTED_CACHED_BYTES


def _permuted_blocks(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blocks [slice, chunk, row, column] of the zero-padded matrix, steps of each block, overflow units of each
    slice: a block's units past its first, the slice's padded to pairs)."""
    k, n = matrix.shape
    lanes = PERMUTED_LANES
    slices = -(-n // lanes)
    padded = np.zeros((k, slices * lanes), np.float32)
    padded[:, :n] = matrix
    blocks = padded.reshape(k // lanes, lanes, slices, lanes).transpose(2, 0, 1, 3)
    steps = np.count_nonzero(blocks, axis=2).max(axis=2)
    overflow = np.maximum(-(-steps // 2) - 1, 0).sum(axis=1)
    return blocks, steps, overflow + -overflow % PERMUTED_OVERFLOW_GROUP


PERMUTED_RUN_SLICES = 2
"""Slices sharing a main run: its index vectors (6 bits of each lane per slice) and its loads of A's chunks."""


def permuted_main_group(k: int) -> int:
    """Chunks per iteration of the loop over a main run (enough for 8 accumulators, or 1 when that does not divide
    K / 8)."""
    chunks, per = k // PERMUTED_LANES, max(1, PERMUTED_GROUP // PERMUTED_RUN_SLICES)
    return per if chunks % per == 0 else 1


def permuted_run_words(slices: int, chunks: int) -> int:
    """int32 words of the main runs of `slices` slices."""
    full, rest = divmod(slices, PERMUTED_RUN_SLICES)
    return chunks * (full * permuted_main_words(PERMUTED_RUN_SLICES) + (permuted_main_words(rest) if rest else 0))


def permuted_main_words(slices: int) -> int:
    """int32 words of one chunk of a main run of `slices` (1 or 2) slices: a shared index vector and each slice's
    two steps."""
    return PERMUTED_LANES * (1 + 2 * slices)


def pack_permuted(matrix: np.ndarray) -> np.ndarray:
    """The permuted matrix-vector layout of a float32 [K, N] CSR weight, for a product with few rows of A
    (backends/kernels/sparse.py `emit_permuted_rows`). The columns are cut in slices of 8 (one output vector) and the
    rows in chunks of 8 (one vector of A): a slice x chunk block is walked in steps, step t holding the t-th nonzero
    of each of the slice's columns in the block (value 0.0 where a column has fewer), and vpermps picks each lane's
    element of A's chunk. Each block's first two steps are in the main run of its pair of slices (slices 2p and
    2p + 1; the last alone when S is odd), chunk by chunk, so the kernel knows the chunk from its loop counter, loads
    each chunk of A once for both slices, and every pair's loop has the same trip count, K / 8; a block's further
    steps (about 27% of blocks at 90% zeros have more than two) are its slice's overflow units, which carry their
    chunk. As int32 words:

        overflow[0 : S + 1]  first overflow unit of each of the S = ceil(N / 8) slices (cumulative, in pairs; padded
                             to a multiple of 8 words so vectors stay 32-byte aligned)
        main runs            per pair of slices, per chunk: 8 index words, then per slice of the pair 8 float32
                             values of the block's first step and 8 of its second (`permuted_main_words`)
        overflow units       8 index words, 8 float32 values of the first step, 8 of the second
                             (PERMUTED_UNIT_WORDS; padding units: chunk 0, weights 0.0)

    In a main run, index word j holds lane j's row within the chunk in bits 6i + 3t .. 6i + 3t + 2 for step t of
    slice i of the pair: vpermps reads bits 0-2 only, so the kernel shifts the word right by 6i + 3t. An overflow
    unit's word j holds its two steps' rows in bits 0-5, and its word 0 its chunk's first row in bits 6 and up.
    Padding slots read rows of A the dense product also multiplies by a weight of that column (0.0), so non-finite
    inputs give NaN where the dense kernel's 0 x inf would."""
    k, n = matrix.shape
    lanes = PERMUTED_LANES
    if k % lanes or k // lanes > PERMUTED_MAX_CHUNKS:
        raise ValueError(f"K = {k} does not fit the permuted layout (a multiple of {lanes} below 2**26)")
    blocks, steps, per_slice = _permuted_blocks(matrix)
    slices, chunks = steps.shape
    first = np.concatenate([[0], np.cumsum(per_slice)])
    overflow_index = np.zeros((int(first[-1]), lanes), np.uint32)
    overflow_values = np.zeros((int(first[-1]), 2, lanes), np.float32)
    runs = []
    for p in range(0, slices, PERMUTED_RUN_SLICES):
        pair = range(p, min(p + PERMUTED_RUN_SLICES, slices))
        run_index = np.zeros((chunks, lanes), np.uint32)
        run_values = np.zeros((chunks, len(pair), 2, lanes), np.float32)
        for i, s in enumerate(pair):
            u = int(first[s])
            for c in np.flatnonzero(steps[s]):
                block = blocks[s, c]
                order = np.argsort(block == 0, axis=0, kind="stable")  # each column's nonzero rows first, in order
                ordered = np.take_along_axis(block, order, axis=0)
                run_index[c] |= ((order[0] | order[1] << 3) << 6 * i).astype(np.uint32)
                run_values[c, i] = ordered[:2]
                for step0 in range(2, int(steps[s, c]), 2):
                    overflow_index[u] = order[step0] | order[step0 + 1] << 3  # (step0 + 1 < 8: 8 rows a block)
                    overflow_index[u, 0] |= c * lanes << 6
                    overflow_values[u] = ordered[step0:step0 + 2]
                    u += 1
        runs.append(np.concatenate([run_index.view(np.int32), run_values.reshape(chunks, -1).view(np.int32)],
                                   axis=1).reshape(-1))
    overflow = np.concatenate([overflow_index.view(np.int32), overflow_values.reshape(-1, 2 * lanes).view(np.int32)],
                              axis=1)
    head = np.zeros(-(-(slices + 1) // lanes) * lanes, np.int32)
    head[:slices + 1] = first
    return np.concatenate([head, *runs, overflow.reshape(-1)])


def permuted_words(matrix: np.ndarray) -> int:
    """int32 words `pack_permuted` stores for `matrix` (without packing it)."""
    _, steps, per_slice = _permuted_blocks(matrix)
    slices, chunks = steps.shape
    return -(-(slices + 1) // PERMUTED_LANES) * PERMUTED_LANES + \
        permuted_run_words(slices, chunks) + \
        int(per_slice.sum()) * PERMUTED_UNIT_WORDS


def int8_offset_bytes(k: int, blocks: int) -> int:
    """Bytes per offset of the int8 layout: 2 when no count can exceed a uint16 (K x J entries at most), else 4."""
    return 2 if k * blocks <= 0xFFFF else 4


def int8_stored_bytes(matrix: np.ndarray, width: int) -> int:
    """Bytes of the int8 layout (module docstring): offsets, 2 + V bytes per entry, padding to 4."""
    blocks = -(-matrix.shape[1] // width)
    raw = int8_offset_bytes(matrix.shape[0], blocks) * (blocks + 1) + \
        int(entry_mask(matrix, width).sum()) * (2 + width)
    return -(-raw // 4) * 4


def pack_int8(matrix: np.ndarray, width: int) -> np.ndarray:
    """The int8 layout (module docstring) of an int8 [K, N] matrix with 1 x width entries, as int32 words."""
    k, n = matrix.shape
    if k > MAX_INT8_K:
        raise ValueError(f"K = {k} does not fit the int8 layout's uint16 index")
    blocks = -(-n // width)
    values = np.zeros((k, blocks * width), dtype=np.int8)
    values[:, :n] = matrix
    values = values.reshape(k, blocks, width).transpose(1, 0, 2)  # [J, K, V]
    mask = entry_mask(matrix, width).T  # [J, K]
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    offsets = offsets.astype("<u2" if int8_offset_bytes(k, blocks) == 2 else "<i4").view(np.uint8)
    js, ks = np.nonzero(mask)
    records = np.empty((len(ks), 2 + width), dtype=np.uint8)
    records[:, 0], records[:, 1] = ks & 0xFF, ks >> 8
    records[:, 2:] = values[js, ks].view(np.uint8)
    raw = np.concatenate([offsets, records.reshape(-1)])
    body = np.zeros(-(-raw.size // 4) * 4, np.uint8)
    body[:raw.size] = raw
    return body.view("<i4").astype(np.int32)


def encoded_bytes_of(matrix: np.ndarray, encoding: SparseEncoding | None, itemsize: int = 4) -> int:
    """Bytes the [K, N] weight takes stored with `encoding` (None: dense); int8 matrices in the int8 layout."""
    if encoding is None:
        return int(matrix.size) * itemsize
    if matrix.dtype == np.int8:
        return int8_stored_bytes(matrix, encoding.width)
    return stored_words(matrix, encoding.width) * 4


ROW_TILE_BYTES = 65536
"""Stack bytes the rows-in-vectors product may take for its transposed tile of A (K x rows float32)."""


def rows_in_vectors(m: int, k: int, width: int, lanes: int, budget: int = 12,
                    stack_bytes: int = ROW_TILE_BYTES) -> int:
    """Rows of A the sparse matrix product puts in vectors (a multiple of `lanes`), or 0 when it keeps outputs in
    vectors instead. Entries narrower than the vectors (CSR, small blocks) fill only `width` lanes of an output
    vector; with at least `lanes` rows the product transposes a tile of A on the stack and runs like the 1x1
    Conv kernel (rows in place of positions). `budget`: vector registers for accumulators; `stack_bytes`: the
    stack it may take (0 on microcontrollers, whose stacks are small)."""
    if width >= lanes or lanes < 2 or m < lanes:
        return 0
    strips = min(8, budget // min(width, budget), m // lanes, stack_bytes // (k * lanes * 4))
    return strips * lanes if strips >= 1 else 0


BAND_BYTES = 65536
"""Stack bytes the sparse kernel of a strided 2-D convolution may take for the deinterleaved input rows of one
output row (hosted targets only). Stride-1 convolutions read the input directly: a band measured no faster there."""


def band_bytes(channels: int, kernel, strides, dilations, out_width: int) -> int:
    """Bytes of that band: channels x kernel rows x column phases x the columns an output row's taps read."""
    (kh, kw), sx, dx = kernel, strides[-1], dilations[-1]
    phases = {(kx * dx) % sx for kx in range(kw)}
    return 4 * channels * kh * len(phases) * (out_width + (kw - 1) * dx // sx)


def banded(channels: int, kernel, strides, dilations, out_width: int, hosted: bool) -> bool:
    """The sparse convolution kernel copies input rows into a band (see BAND_BYTES)."""
    return hosted and len(kernel) == 2 and max(strides) > 1 and \
        band_bytes(channels, kernel, strides, dilations, out_width) <= BAND_BYTES
