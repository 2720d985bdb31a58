"""encode-sparsity: store each sparse constant weight as CSR or 1xV blocks where a sparse kernel is faster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgecc.errors import EdgeccError, PassError
from edgecc.ir.core import Module, Node, Value
from edgecc.ir.types import SparseEncoding
from edgecc.ops.costs import node_macs
from edgecc.ops.sparse import (INT8_SPARSE_OPS, ROW_TILE_BYTES, banded, encodable, encoded_bytes_of, entry_mask,
                               matrix_view, rows_in_vectors, sliced_product, sparse_capable, weight_input)
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass

CONV_VALUE_COST, CONV_ENTRY_COST = 1.6, 0.8
"""The 1x1 Conv kernel (positions in vectors): time per stored value, and per entry (its index and input-strip
load, shared by the entry's V output channels), in dense-kernel MACs. Fitted to tools/bench_sparse.py on the host
(Zen 3, AVX2) at 90%: unstructured (V = 1) 0.20-0.29 of dense, 1x8 blocks 0.16-0.23 (docs/performance-sparse.md)."""
KXK_VALUE_COST, KXK_ENTRY_COST = 0.9, 3.3
"""The KxK Conv kernel reading the input directly (stride 1): per stored value and per entry (each tap's entry
walk, row check and border lanes), on maps at least 16 wide; narrower rows fill fewer lanes per entry walk, x
sqrt(16 / width) per entry. Fitted to resnet18's 3x3 layers at 80-95% (CSR 3.6-4.8 dense MACs per value, 6.4 on
the 7x7 map; 1x8 blocks 1.0-1.7)."""
GEMM_ENTRY_COST = 3
"""The matrix-product kernel (V outputs of one row in a vector): time per stored entry and row of A, in dense MACs,
per float lane of the target up to 4 lanes (an entry is an index and A load, a weight vector load and an FMA, the
dense kernel's cost of about 4 x lanes MACs where it is one lane wide). Measured with one row of A at 90% zeros:
on AVX2 1x8 blocks 0.13-0.16 of dense time when 10% are stored, 0.7-0.86 for the 57% stored of an unstructured
weight, CSR 0.46-1.04; on armv8 (guest instructions) CSR 1.16, 1x4 blocks 0.32: about 12 dense MACs per entry on
both, so unstructured FC weights of hosted vector targets stay dense and blocks pay."""
GEMM_BLOCK_COST = 25
"""The same kernel's fixed cost per column block and tile of up to 4 rows (offsets, loop set-up, the unrolled
accumulators' sum, the epilogue), in dense MACs per float lane of the target (a dense MAC is a lane of a vector
FMA): 200 on AVX2, where small layers (mlp_mnist's 256 -> 128, one row: CSR 0.9-1.1 of dense at 90%) stay dense
and large ones (784 -> 256: 0.53-0.66) could be encoded."""
GEMM_ROWS_VALUE_COST, GEMM_ROWS_ENTRY_COST = 2.2, 0.8
"""The matrix product with rows of A in vectors (ops.sparse.rows_in_vectors: entries narrower than the vectors and
at least `lanes` rows, e.g. bert_tiny's MatMuls): per stored value and per entry, like the 1x1 Conv kernel's plus
the transposed tiles of A and of the outputs (CSR at 90%: 0.27-0.59 of dense on bert_tiny's shapes)."""
SLICED_VALUE_COST, SLICED_CACHED_VALUE_COST, SLICED_CACHED_BYTES = 3.0, 6.0, 262144
"""The sliced matrix-vector kernel (ops.sparse.sliced_product: CSR, fewer rows than the 8 lanes of an AVX host):
time per stored value and row, in dense MACs; twice that where the dense weight fits in SLICED_CACHED_BYTES (a
Zen 3's L2 holds it, and the dense kernel runs from there instead of L3). Fitted to tools/bench_sparse.py at 90%
unstructured: 0.26-0.34 of dense on 784 -> 256, 512/1024/1280 -> 1000; 0.63 on 256 -> 128 (128 KiB)."""
WIN = 0.8
"""A sparse encoding is chosen only if its modelled time is below this fraction of the dense kernel's (and it
stores fewer bytes): a margin for the model's error, so a weight is never made slower."""
INT8_VALUE_COST, INT8_ENTRY_COST, INT8_BLOCK_COST = 1.0, 2.0, 3.0
"""The int8 sparse kernel (backends/kernels/qsparse.py, scalar on microcontrollers) per stored value (a byte load,
sign extension, multiply-add), per entry and row (two index bytes, the activation load and its zero point), and
per column block and row (two uint16 offsets of two bytes each, the loop test; for a padded KxK convolution's tap
the bounds check), in the generic dense int8 kernel's MACs (an activation and a weight load, a multiply-add):
counted from the instructions, not measured on a board."""
INT8_HOST_VALUE_COST, INT8_HOST_ENTRY_COST, INT8_HOST_BLOCK_COST = 0.15, 5.5, 16
"""The same kernel on a hosted vector target whose dense int8 kernel has the generic (widened) dot4, in that
kernel's MACs: per stored value (V lanes of one vector multiply-add), per entry and row, and per column block and
row. Fitted to kernel times (CompiledModel.profile, median of 300) on a Zen 3 (AVX2, no VNNI) at 90% unstructured zeros,
QGemm 784 -> 256 and 512 -> 512 x 16 rows: CSR 0.55 of dense, 1x4 blocks 0.44-0.47, 1x16 0.34-0.38; 64 -> 128
(one row) CSR 0.81, 1x16 0.64. Targets with an int8 dot instruction (vpdpbusd, sdot: 4 products per lane and
instruction) keep int8 weights dense (not measured here: no such host)."""
ENCODINGS = ("auto", "dense", "csr", "block")


def target_info(target: str) -> tuple[int, bool]:
    """(float32 lanes of `target`'s vectors (1 on scalar cores), whether it is hosted: kernels take stack scratch
    only there)."""
    from edgecc.backends.targets import resolve_target  # the target presets are data kept with the backends

    try:
        resolved = resolve_target(target)
    except EdgeccError:  # an unknown name: the backend will report it; model a 128-bit hosted target meanwhile
        return 4, True
    return max(1, resolved.vector_bits // 32), resolved.large_scratch


def candidates(lanes: int) -> list[SparseEncoding]:
    """CSR, and blocks of the target's vector width and of 4 (a NEON register; a small block keeps more zeros out)."""
    return [SparseEncoding("csr")] + [SparseEncoding("block", (1, v)) for v in sorted({4, lanes}) if v > 1]


def modelled_time(node: Node, matrix: np.ndarray, encoding: SparseEncoding, lanes: int,
                  hosted: bool = True) -> float:
    """Modelled time of the layer with `encoding`, as a fraction of the dense kernel's (see the constants): per
    stored value (entries x V, zeros inside stored blocks included) and per entry, over the dense K x N MACs."""
    entries = int(entry_mask(matrix, encoding.width).sum())
    fraction = entries * encoding.width / max(1, matrix.size)
    per_entry = entries / max(1, matrix.size)
    blocks = -(-matrix.shape[1] // encoding.width) / max(1, matrix.size)  # column blocks per dense MAC
    if node.op in INT8_SPARSE_OPS and not hosted:
        return fraction * INT8_VALUE_COST + per_entry * INT8_ENTRY_COST + blocks * INT8_BLOCK_COST
    if node.op in INT8_SPARSE_OPS:
        return fraction * INT8_HOST_VALUE_COST + per_entry * INT8_HOST_ENTRY_COST + blocks * INT8_HOST_BLOCK_COST
    if node.op in ("Conv", "FusedConv"):
        w, out = node.inputs[1].type.shape, node.outputs[0].type.shape
        kernel = tuple(w[2:])
        strides = tuple(node.attrs.get("strides") or (1,) * len(kernel))
        dilations = tuple(node.attrs.get("dilations") or (1,) * len(kernel))
        if np.prod(kernel) > 1 and not banded(w[1], kernel, strides, dilations, out[-1], hosted):
            narrow = max(1.0, 16 / out[-1]) ** 0.5
            return fraction * KXK_VALUE_COST + per_entry * KXK_ENTRY_COST * narrow
        return fraction * CONV_VALUE_COST + per_entry * CONV_ENTRY_COST
    if sliced_product(encoding.width, rows_of(node), *matrix.shape, lanes, hosted):
        cost = SLICED_CACHED_VALUE_COST if 4 * matrix.size <= SLICED_CACHED_BYTES else SLICED_VALUE_COST
        return fraction * cost
    if rows_in_vectors(rows_of(node), matrix.shape[0], encoding.width, lanes, stack_bytes=ROW_TILE_BYTES * hosted):
        return fraction * GEMM_ROWS_VALUE_COST + per_entry * GEMM_ROWS_ENTRY_COST
    rows = rows_of(node)
    k, n = matrix.shape
    blocks = -(-n // encoding.width) * -(-rows // min(4, max(1, rows)))
    return (entries * rows * GEMM_ENTRY_COST * min(lanes, 4) + blocks * GEMM_BLOCK_COST * lanes) / max(1, rows * k * n)


def rows_of(node: Node) -> int:
    """M: the rows of A one matrix product of the node multiplies (per batch for MatMul)."""
    shape = node.inputs[0].type.shape
    if node.op in ("Gemm", "FusedGemm"):
        return shape[1] if node.attrs.get("transA", 0) else shape[0]
    return shape[-2] if len(shape) >= 2 else 1


def int8_dot(target: str) -> bool:
    """`target`'s dense int8 kernel has a dot instruction (qconv.dot4_form: vpdpbusd, sdot)."""
    from edgecc.backends.kernels.qconv import dot4_form
    from edgecc.backends.targets import resolve_target

    try:
        return dot4_form(resolve_target(target))[0] != "generic"
    except EdgeccError:
        return False


def choose_encoding(node: Node, matrix: np.ndarray, lanes: int, hosted: bool = True,
                    dot: bool = False) -> SparseEncoding | None:
    """None (dense), or the encoding to store: on hosted targets the fastest by modelled time if it wins by WIN;
    on microcontrollers, where flash is what runs out, the smallest whose modelled time is no worse than dense.
    Either way it must store fewer bytes than the dense array. `dot`: the target has an int8 dot instruction
    (int8 weights stay dense, see INT8_HOST_VALUE_COST)."""
    if np.count_nonzero(matrix) >= WIN * matrix.size:  # every kernel costs >= 1 dense MAC per value kept
        return None
    if hosted and (dot or node.op == "QLinearConv") and node.op in INT8_SPARSE_OPS:  # (int8 conv: not measured)
        return None
    options = []
    for encoding in candidates(lanes):
        stored = encoded_bytes_of(matrix, encoding)
        if encodable(node, encoding) and stored < matrix.nbytes:
            options.append((modelled_time(node, matrix, encoding, lanes, hosted), stored, encoding))
    if hosted:
        wins = [o for o in options if o[0] < WIN]
        return min(wins, key=lambda o: o[0])[2] if wins else None
    fits = [o for o in options if o[0] <= 1.0]
    return min(fits, key=lambda o: (o[1], o[0]))[2] if fits else None


def readers(value: Value) -> list[Node] | None:
    """The nodes reading `value` as their weight, if all its readers do, the sparse kernels compute them all and
    they see the same [K, N] matrix; else None."""
    nodes = value.users
    if not nodes or any(index != weight_input(user) for user, index in value.uses):
        return None
    if any(sparse_capable(n) is not None for n in nodes) or len({matrix_view(n) for n in nodes}) != 1:
        return None
    return nodes


def encoded_bytes(value: Value) -> int:
    """Bytes `value` takes as stored: the dense array, or values + indices + block offsets of its encoding."""
    encoding = value.type.sparse if value.type is not None else None
    if encoding is None or not value.uses:
        return int(value.const.nbytes) if value.is_const else value.type.nbytes
    return encoded_bytes_of(matrix_view(value.users[0])(value.const), encoding)


def encode_sparsity(module: Module, target: str = "host", encoding: str = "auto", width: int = 0) -> list[dict]:
    """Set (or clear) the sparse encoding of every weight a sparse kernel can read; one record per weight layer.

    encoding: "auto" (the cost model), or force "dense", "csr" or "block" on every capable layer whose weight has
    a zero (for tests and benchmarks); width: V of forced blocks (0: the target's lanes)."""
    if encoding not in ENCODINGS:
        raise PassError(f"encode-sparsity: unknown encoding '{encoding}'", where="encoding",
                        hint=f"use one of {', '.join(ENCODINGS)}")
    lanes, hosted = target_info(target)
    dot = int8_dot(target)
    forced = {"dense": None, "csr": SparseEncoding("csr"),
              "block": SparseEncoding("block", (1, width or lanes))}.get(encoding)
    records, seen = [], set()
    for node in module.graph.nodes:
        value = node.input(weight_input(node))
        if node.op not in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Conv", "FusedConv", *INT8_SPARSE_OPS) \
                or value is None \
                or not value.is_const or value._id in seen:
            continue
        seen.add(value._id)
        record = {"layer": node.name, "op": node.op, "nodes": [n.name for n in value.users], "weight": value.name,
                  "bytes_before": int(value.const.nbytes), "macs_before": node_macs(node), "skipped": None}
        nodes = readers(value)
        if nodes is None:
            record["skipped"] = sparse_capable(node) or "the weight is shared with a layer of another form"
            chosen = None
        else:
            matrix = matrix_view(node)(value.const)
            if encoding == "auto":
                chosen = choose_encoding(node, matrix, lanes, hosted, dot)
            else:
                chosen = forced if forced is not None and not np.all(matrix != 0) and \
                    all(encodable(n, forced) for n in nodes) else None
        value.type = dataclasses.replace(value.type, sparse=chosen)
        record.update(encoding=str(chosen) if chosen else "dense", bytes_after=encoded_bytes(value),
                      macs_after=record["macs_before"],
                      sparsity=float(np.mean(value.const == 0)) if value.const.size else 0.0)
        records.append(record)
    return records


@register_pass
@dataclass(frozen=True)
class EncodeSparsity(Pass):
    """Store sparse constant weights (Gemm/MatMul B, Conv W of group 1: 1x1 of any rank, KxK 2-D; fused forms;
    float32) as CSR or as blocks of 1xV outputs (V = the target's float lanes, or 4; for a KxK Conv V divides
    C_out), where the sparse kernels are modelled faster than the dense ones. Weights pruned elsewhere are encoded
    too; a dense weight stays dense, so ordinary models are unchanged.

    Cost model (per weight, as a fraction of the dense kernel's time): the values stored (entries x V, zeros inside
    stored blocks included) over K x N, times the kernel's cost per stored value relative to a dense MAC. Conv
    (positions in vectors): 1.6 per value + 0.8 per entry, whose input load serves V channels (1x1, and strided
    convolutions, which read a band); a stride-1 KxK Conv 0.9 per value + 3.3 per entry (more on maps under 16
    wide). Matrix product with
    V outputs of a row per vector: 3 x min(lanes, 4) per entry and row, + 25 x lanes per column block and row tile
    (small layers stay dense); with V < lanes and at least `lanes` rows of A, rows in vectors: 2.2 per value + 0.8
    per entry; CSR with fewer rows than the 8 lanes of an AVX host, the sliced matrix-vector kernel (columns in
    slices of 16 sorted by nonzeros): 3 per value, 6 where the dense weight fits in 256 KiB. Fitted to tools/bench_sparse.py on the host (docs/performance-sparse.md). Of the encodings that store
    fewer bytes (values + int32 indices + block offsets) than dense, hosted targets take the fastest if it is below
    WIN (0.8); microcontrollers, short of flash, the smallest that is modelled no slower than dense.

    int8: edgecc.QGemm's constant int8 B and a group-1 QLinearConv's W (2-D of any kernel, stride, padding and
    dilation, or 1x1 stride 1 of any rank; for a KxK one V divides C_out) with zero points 0 (as quantize-int8
    makes) take an int8 layout (uint16 k + V int8 values per entry, uint16 or int32 offsets: about 8% of the
    float32 bytes at 90% zeros) read by backends/kernels/qsparse.py: on microcontrollers 1.0 per value + 2.0 per
    entry + 3.0 per column block (from instruction counts); QGemm on hosted targets without an int8 dot instruction 0.15
    per value + 5.5 per entry + 16 per column block (measured on AVX2: CSR 0.55 of dense at 90%); targets with
    vpdpbusd or sdot, and QLinearConv on any hosted target (not measured), keep int8 weights dense.

    The constant keeps its dense array (the interpreter, export and every other reader are unchanged); the
    encoding is in its type (`tensor<..., sparse<block 1x8>>`) and the kernels pack it at compile time.
    Options: `encoding` = auto | dense | csr | block forces one form on every capable layer with a zero weight;
    `width` = V of forced blocks (0: the target's lanes). Stats: layers per encoding, weight bytes before/after.
    """

    name = "encode-sparsity"
    encoding: str = "auto"
    width: int = 0
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        before = [(v, v.type.sparse) for v in module.graph.constants()]
        records = encode_sparsity(module, ctx.target, self.encoding, self.width)
        stats: dict[str, int] = {}
        for record in records:
            if record["encoding"] != "dense":
                key = "layers-" + record["encoding"].split("<")[1].split()[0].rstrip(">")
                stats[key] = stats.get(key, 0) + 1
        if stats:  # nothing to say about a dense model
            stats["weight-bytes-before"] = sum(r["bytes_before"] for r in records)
            stats["weight-bytes-after"] = sum(r["bytes_after"] for r in records)
        return PassResult(any(v.type.sparse != old for v, old in before), stats)
