"""cluster-weights: weight sharing. Each large Conv/Gemm/MatMul weight tensor becomes a k-entry float32 codebook and
packed indices (edgecc.CodebookDecode), decoded into the arena just before the layer that reads it.

Flash then holds bits/32 of the dense weights plus k floats per layer; RAM holds one layer's dense weights at a time
(the memory plan frees the decoded tensor after its reader).

The codebook is fitted by 1-D k-means (Lloyd): centroids start at the quantiles (i + 1/2) / k of the values, values
go to the nearest centroid, centroids move to their values' mean, until no value changes cluster (or 50 rounds,
then a last assignment and mean: each entry is the mean of the values using it).
On sorted values each cluster is a contiguous run, so a round costs a search of k - 1 cut points and prefix sums,
not a pass over every value. A cluster that empties is re-seeded at a value drawn with probability proportional to
its squared distance from its centroid (k-means++'s rule; `seed` fixes the draw). A tensor with at most k distinct
values keeps them exactly.

The least-squares re-fit (reconstruct.py) reads and writes codebooks with `codebook_of`, `indices_of`,
`set_codebook` and `set_indices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.ir.core import Module, Node, Value
from edgecc.ops.apply import infer_node
from edgecc.ops.codebook import bits_for, decode_indices, pack_indices, packed_size
from edgecc.ops.costs import node_macs
from edgecc.ops.registry import EDGECC_DOMAIN
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.prune import selected
from edgecc.passes.registry import register_pass

__all__ = ["cluster_weights", "codebook_of", "decode_indices", "decoder_of", "indices_of", "kmeans_1d",
           "set_codebook", "set_indices", "ClusterWeightsPass"]

WEIGHT_OPS = frozenset({("", "Conv"), ("", "Gemm"), ("", "MatMul"), (EDGECC_DOMAIN, "FusedConv"),
                        (EDGECC_DOMAIN, "FusedGemm"), (EDGECC_DOMAIN, "FusedMatMul")})
"""Layers whose input 1 is the weight tensor (Conv W, Gemm B, MatMul B)."""

MAX_ITERATIONS = 50
MAX_CLUSTERS = 256
OPTION = "--cluster-weights"


def check_clusters(clusters) -> None:
    """Fail clearly unless `clusters` is an integer in 2..256 (256 = 8-bit indices, the widest packed)."""
    if isinstance(clusters, bool) or not isinstance(clusters, int | np.integer) or not 2 <= clusters <= MAX_CLUSTERS:
        raise EdgeccError(f"{clusters!r} clusters: weight sharing takes 2 to {MAX_CLUSTERS} codebook entries",
                          where=OPTION, hint="e.g. 16 (4-bit indices, about 1/8 of the float32 bytes); indices are "
                                             "at most 8 bits wide, so more than 256 entries cannot be stored")


# -- 1-D k-means ----------------------------------------------------------------------------------------------

def _reseed(xs: np.ndarray, centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Centroids with each empty cluster moved to a value drawn with probability ~ squared distance to the nearest
    centroid (recomputed after each draw); empty clusters stay where they are when every value sits on a centroid."""
    kept = centroids[counts > 0]
    d2 = (xs - np.repeat(kept, counts[counts > 0])) ** 2
    new = list(kept)
    for _ in range(int((counts == 0).sum())):
        total = d2.sum()
        if total <= 0:
            break
        pick = xs[rng.choice(xs.size, p=d2 / total)]
        new.append(pick)
        d2 = np.minimum(d2, (xs - pick) ** 2)
    return np.sort(np.asarray(new))


def _cuts(xs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Where each cluster's run starts in the sorted values (and the end): values go to their nearest centroid."""
    return np.concatenate([[0], np.searchsorted(xs, (centroids[:-1] + centroids[1:]) / 2), [xs.size]])


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0, iterations: int = MAX_ITERATIONS
              ) -> tuple[np.ndarray, np.ndarray]:
    """(codebook, index): at most k float32 entries in ascending order, each the mean of the values that use it, and
    each value's entry (int64, in `values`' shape), by Lloyd's iterations from quantile starts (see the module
    docstring). The last step is a mean update, so when `iterations` ran out before convergence a value may sit
    slightly closer to a neighbouring entry than to its own."""
    x = np.asarray(values, np.float64).reshape(-1)
    distinct = np.unique(x)
    if distinct.size <= k:
        return distinct.astype(np.float32), np.searchsorted(distinct, x).reshape(np.shape(values))
    xs = np.sort(x)
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    rng = np.random.default_rng(seed)
    centroids = np.quantile(xs, (np.arange(k) + 0.5) / k)
    cuts = None
    for _ in range(iterations):
        new_cuts = _cuts(xs, centroids)
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        counts = np.diff(cuts)
        centroids = np.where(counts > 0, (prefix[cuts[1:]] - prefix[cuts[:-1]]) / np.maximum(counts, 1), centroids)
        if (counts == 0).any():
            centroids = _reseed(xs, centroids, counts, rng)
    mids = (centroids[:-1] + centroids[1:]) / 2
    index = np.searchsorted(mids, x, side="right")  # the assignment the last means were taken over
    counts = np.bincount(index, minlength=k)
    means = np.bincount(index, weights=x, minlength=k)[counts > 0] / counts[counts > 0]
    codebook, remap = np.unique(means.astype(np.float32), return_inverse=True)  # ascending; drops unused entries
    used = np.cumsum(counts > 0) - 1
    return codebook, remap.reshape(-1)[used[index]].reshape(np.shape(values))


# -- the rewrite ------------------------------------------------------------------------------------------------

def _skip_reason(weights: np.ndarray, clusters: int, min_elements: int) -> str | None:
    if weights.dtype != np.float32:
        return f"the weights are {weights.dtype}, not float32"
    if not np.isfinite(weights).all():
        return "the weights hold NaN or infinity"
    if weights.size < min_elements:
        return f"{weights.size} weights, fewer than min-elements={min_elements}"
    if packed_size(weights.size, bits_for(clusters)) + 4 * clusters >= weights.nbytes:
        return f"a {clusters}-entry codebook and its indices take no fewer bytes than {weights.size} float32 weights"
    return None


def _decode_node(module: Module, layer: Node, packed: np.ndarray, codebook: np.ndarray, bits: int) -> Node:
    """CodebookDecode(packed, codebook) inserted before `layer`, which now reads its result as weights."""
    graph = module.graph
    weights = layer.inputs[1]
    stem = layer.name or weights.name
    out = Value(graph.unique_name(f"{stem}_weights"))
    decode = Node("CodebookDecode", [graph.constant(packed, f"{stem}_indices"),
                                     graph.constant(codebook, f"{stem}_codebook")],
                  [out], {"shape": list(weights.type.shape), "bits": bits}, name=out.name, domain=EDGECC_DOMAIN)
    out.type = infer_node(decode)[0]
    graph.add_node(decode, before=layer)
    layer.set_input(1, out)  # the original constant is left as it is for any other reader
    return decode


def cluster_weights(module: Module, clusters: int, seed: int = 0, min_elements: int = 256, layers=None) -> list[dict]:
    """Share each eligible layer's weights through a `clusters`-entry codebook (in place); one record per weight
    layer: the common compression keys plus "clusters" (entries used), "bits" (index width), "error" (relative
    Frobenius error of the clustered weights, ||W - W'|| / ||W||) and "decode" (the CodebookDecode node's name).
    Layers too small to gain are kept dense with "skipped" saying why. `layers` (node names), when given, limits
    clustering to those layers (the others get no record)."""
    check_clusters(clusters)
    if int(min_elements) < 1:
        raise EdgeccError(f"min-elements={min_elements} must be at least 1", where=OPTION)
    graph = module.graph
    fitted: dict[int, tuple] = {}  # a constant shared by several layers is clustered once
    records = []
    for layer in selected(list(graph.nodes), layers):
        weights = layer.input(1)
        if (layer.domain, layer.op) not in WEIGHT_OPS or weights is None or not weights.is_const:
            continue
        dense = weights.const
        macs = node_macs(layer)
        record = {"layer": layer.name, "op": layer.op, "nodes": [layer.name], "weight": weights.name,
                  "bytes_before": int(dense.nbytes), "bytes_after": int(dense.nbytes), "macs_before": macs,
                  "macs_after": macs, "skipped": _skip_reason(dense, int(clusters), int(min_elements)),
                  "clusters": None, "bits": None, "error": 0.0, "decode": None}
        records.append(record)
        if record["skipped"]:
            continue
        if weights._id not in fitted:
            codebook, index = kmeans_1d(dense, int(clusters), seed)
            bits = bits_for(codebook.size)
            norm = float(np.linalg.norm(dense.astype(np.float64)))
            error = float(np.linalg.norm(codebook[index].astype(np.float64) - dense)) / norm if norm else 0.0
            fitted[weights._id] = (pack_indices(index, bits), codebook, bits, error)
        packed, codebook, bits, error = fitted[weights._id]
        decode = _decode_node(module, layer, packed, codebook, bits)
        record.update(nodes=[decode.name, layer.name], weight=[decode.inputs[0].name, decode.inputs[1].name],
                      bytes_after=int(packed.nbytes + codebook.nbytes), clusters=int(codebook.size), bits=bits,
                      error=error, decode=decode.name)
    return records


# -- reading and re-fitting a codebook ---------------------------------------------------------------------------

def decoder_of(layer: Node) -> Node | None:
    """The CodebookDecode that produces `layer`'s weights (input 1), or None."""
    weights = layer.input(1)
    producer = weights.producer if weights is not None else None
    if producer is not None and producer.op == "CodebookDecode" and producer.domain == EDGECC_DOMAIN:
        return producer
    return None


def codebook_of(decode: Node) -> np.ndarray:
    """The float32 codebook entries of a CodebookDecode node."""
    return decode.inputs[1].const


def indices_of(decode: Node) -> np.ndarray:
    """Each weight's codebook entry (int64, in the decoded weights' shape)."""
    shape = tuple(int(d) for d in decode.attrs["shape"])
    return decode_indices(decode.inputs[0].const, int(decode.attrs["bits"]), int(np.prod(shape, dtype=np.int64)))\
        .reshape(shape)


def set_codebook(module: Module, decode: Node, values: np.ndarray) -> None:
    """Give `decode` new codebook entries (same count); the indices stay. A new constant, so a codebook shared with
    another node is not changed under it."""
    values = np.asarray(values, np.float32)
    if values.shape != decode.inputs[1].type.shape:
        raise EdgeccError(f"{decode.label}: new codebook has shape {list(values.shape)}, expected "
                          f"{list(decode.inputs[1].type.shape)}", where=OPTION)
    decode.set_input(1, module.graph.constant(values, decode.inputs[1].name))


def set_indices(module: Module, decode: Node, indices: np.ndarray) -> None:
    """Give `decode` new indices (the decoded weights' shape, each below its codebook's size), packed at its width;
    a new constant, as in set_codebook."""
    shape = tuple(int(d) for d in decode.attrs["shape"])
    indices = np.asarray(indices, np.int64)
    if indices.shape != shape or indices.min() < 0 or indices.max() >= codebook_of(decode).size:
        raise EdgeccError(f"{decode.label}: new indices have shape {list(indices.shape)} (expected {list(shape)}) "
                          f"or lie outside the codebook", where=OPTION)
    decode.set_input(0, module.graph.constant(pack_indices(indices, int(decode.attrs["bits"])), decode.inputs[0].name))


@register_pass
@dataclass(frozen=True)
class ClusterWeightsPass(Pass):
    """Weight sharing: each Conv/Gemm/MatMul constant weight tensor of at least `min-elements` float32 values becomes
    a `clusters`-entry float32 codebook and packed indices, read through edgecc.CodebookDecode (decoded into the
    arena just before the layer, so flash holds bits/32 of the weights plus the codebook and RAM one layer's dense
    weights at a time). Biases are never clustered. Changes numerics; opt-in, in no -O pipeline.

    The codebook is 1-D k-means (Lloyd from quantile starts until no value changes cluster, at most 50 rounds;
    empty clusters re-seeded by a draw fixed by `seed`). Indices take 1, 2, 4 or 8 bits (16 entries: 4 bits).
    Layers where the codebook would not save bytes stay dense.

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    Options: `clusters` (2..256, default 16), `seed` (default 0), `min-elements` (default 256).

    Example: `"onnx.Conv"(%x, @w)` with @w a tensor<16x8x3x3xf32> reads
    `%0 = "edgecc.CodebookDecode"(@c0, @c1) {bits = 4, shape = [16, 8, 3, 3]} : tensor<16x8x3x3xf32>` instead,
    @c0 a tensor<576xu8> of packed indices and @c1 a tensor<16xf32> codebook.
    """

    name = "cluster-weights"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    changes_numerics = True

    clusters: int = 16
    seed: int = 0
    min_elements: int = 256

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        records = cluster_weights(module, self.clusters, self.seed, self.min_elements)
        done = sum(1 for r in records if not r["skipped"])
        return PassResult(done > 0, {"layers-clustered": done, "layers-skipped": len(records) - done})
