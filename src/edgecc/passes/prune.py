"""prune: unstructured magnitude pruning of Conv / Gemm / MatMul weights (the smallest |w| become 0).

The weights stay dense float32 here; encode-sparsity decides later how to store the zeros. Also home of the
small helpers every compression pass shares: which nodes are weight layers, where their output channels are,
and the per-layer record (see /docs/passes.md and edgecc.compression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ops.costs import node_macs
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
SCOPES = ("layer", "global")


# -- shared by the compression passes ---------------------------------------------------------------------------

def is_weight_layer(node: Node) -> bool:
    """Conv / Gemm / MatMul (ONNX domain) computing on a non-constant input with a constant float weight."""
    if node.domain or node.op not in WEIGHT_OPS or len(node.inputs) < 2:
        return False
    data, weight = node.inputs[0], node.inputs[1]
    return (data is not None and not data.is_const and weight is not None and weight.is_const
            and np.issubdtype(weight.const.dtype, np.floating) and weight.const.ndim >= 2)


def weight_layers(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if is_weight_layer(n)]


def output_axis(node: Node) -> int:
    """The axis of the weight array that indexes the layer's output channels (features)."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return node.inputs[1].const.ndim - 1  # MatMul: B is [..., K, N]


def layer_record(node: Node, **extra) -> dict:
    """A record as edgecc.compression expects it; bytes/MACs "after" start equal to "before"."""
    weight = node.inputs[1]
    nbytes, macs = int(weight.const.nbytes), int(node_macs(node))
    record = {"layer": node.name, "op": node.op, "nodes": [node.name], "weight": weight.name,
              "bytes_before": nbytes, "bytes_after": nbytes, "macs_before": macs, "macs_after": macs,
              "skipped": None}
    record.update(extra)
    return record


def new_constant(graph: Graph, node: Node, index: int, array: np.ndarray, suffix: str) -> Value:
    """Give `node` a new constant as input `index` (the old one may be shared by other nodes: never written)."""
    old = node.inputs[index]
    value = graph.constant(np.ascontiguousarray(array, dtype=old.const.dtype), f"{old.name}_{suffix}")
    node.set_input(index, value)
    return value


def selected(nodes: list[Node], layers) -> list[Node]:
    """`nodes` limited to the names in `layers` (all of them when `layers` is None): per-layer settings."""
    if layers is None:
        return nodes
    names = frozenset(layers)
    return [n for n in nodes if n.name in names]


def check_fraction(value, option: str, what: str, upper_closed: bool = False) -> float:
    """A number in (0, 1) (or (0, 1] with `upper_closed`), else an EdgeccError naming the option."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 < float(value) <= 1.0 if upper_closed else 0.0 < float(value) < 1.0
    if not ok:
        interval = "(0, 1]" if upper_closed else "(0, 1)"
        raise EdgeccError(f"{what} must be a number in {interval}, got {value!r}", where=option,
                          hint=f"e.g. {option} 0.8" if not upper_closed else f"e.g. {option} 0.95")
    return float(value)


class CompressionPass(Pass):
    """A compression function as a pass: `compress` returns the per-layer records; the stats count the layers
    changed (`done_stat`) and left alone. Opt-in passes that change numerics, keeping sorted order and types."""

    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    changes_numerics = True
    done_stat: ClassVar[str] = "layers-compressed"

    def compress(self, module: Module) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        records = self.compress(module)
        done = sum(r["skipped"] is None for r in records)
        return PassResult(done > 0, {self.done_stat: done, "layers-skipped": len(records) - done})


# -- magnitude pruning ------------------------------------------------------------------------------------------

def _zero_smallest(magnitude: np.ndarray, count: int) -> np.ndarray:
    """A boolean mask of the `count` smallest entries of a flat array; ties go to the earlier index."""
    mask = np.zeros(magnitude.size, dtype=bool)
    mask[np.argsort(magnitude, kind="stable")[:count]] = True
    return mask


def _keep_one_per_channel(weights: np.ndarray, zero: np.ndarray, axis: int) -> int:
    """Un-zero the largest |w| of every output channel that `zero` would empty; returns how many channels."""
    moved = np.moveaxis(np.abs(weights), axis, 0).reshape(weights.shape[axis], -1)
    mask = np.moveaxis(zero.reshape(weights.shape), axis, 0).reshape(moved.shape)
    emptied = np.flatnonzero(mask.all(axis=1))
    for channel in emptied:
        mask[channel, int(np.argmax(moved[channel]))] = False
    zero[:] = np.moveaxis(mask.reshape(np.moveaxis(weights, axis, 0).shape), 0, axis).ravel()
    return int(emptied.size)


MIN_FAN_IN = 32
"""Layers whose output channels each read fewer weights (depthwise convolutions: 9; a first 3x3 conv on RGB: 27)
are not pruned: each weight carries a large share of its output, and such layers hold few of a model's weights
(Fast Sparse ConvNets, Elsen et al. 2019, keep the first layer and the depthwise ones dense). On digits_mobilenet,
pruning them at 80% cost 9 points of accuracy even after the re-fit."""


def fan_in_of(node: Node) -> int:
    """Weights per output channel: C/groups x kh x kw for Conv, K for Gemm/MatMul."""
    weights = node.inputs[1].const
    return int(weights.size // max(1, weights.shape[output_axis(node)]))


def block_mask(node: Node, weights: np.ndarray, sparsity: float, block: int) -> np.ndarray:
    """Flat boolean mask (in `weights`' own order) zeroing the round(sparsity * blocks) 1 x `block` blocks of
    smallest L2 norm, blocks being `block` consecutive outputs at one reduction index of the weight's [K, N]
    matrix view: exactly the entries the sparse kernels store and compute as one vector operation."""
    from edgecc.ops.sparse import matrix_view  # the one definition of the view the kernels pack

    view = matrix_view(node)
    positions = view(np.arange(weights.size).reshape(weights.shape))  # [K, N] flat indices into `weights`
    k, n = positions.shape
    blocks = -(-n // block)
    squares = np.zeros((k, blocks * block))
    squares[:, :n] = view(weights.astype(np.float64)) ** 2
    norms = squares.reshape(k, blocks, block).sum(axis=2).ravel()
    zero_blocks = _zero_smallest(norms, min(round(sparsity * norms.size), norms.size - 1)).reshape(k, blocks)
    zero_view = np.repeat(zero_blocks, block, axis=1)[:, :n]
    mask = np.zeros(weights.size, dtype=bool)
    mask[positions[zero_view]] = True
    return mask


def prune_magnitude(module: Module, sparsity: float, scope: str = "layer", min_elements: int = 256,
                    min_fan_in: int = MIN_FAN_IN, block: int = 1, layers=None) -> list[dict]:
    """Zero the smallest-magnitude weights of every Conv / Gemm / MatMul layer, in place; one record per layer.

    scope="layer": each layer loses round(sparsity * numel) weights (its own |w| quantile), capped at numel - 1.
    scope="global": one threshold over all eligible layers' weights together (layers with small weights lose
    more); an output channel the threshold would empty keeps its largest weight (the record says how many).
    Layers with fewer than `min_elements` weights, or fewer than `min_fan_in` per output channel, are skipped.
    Biases are never pruned. A weight constant shared by several layers is pruned once and shared again. Ties are
    broken by position, so results are deterministic. `layers` (node names), when given, limits pruning to those
    layers (the others get no record), so that a search can give each layer its own sparsity.
    """
    sparsity = check_fraction(sparsity, "--prune", "sparsity")
    if scope not in SCOPES:
        raise EdgeccError(f"unknown pruning scope '{scope}'", where="--prune-scope", hint="use layer or global")
    for option, value, example in (("min-elements", min_elements, 256), ("min-fan-in", min_fan_in, MIN_FAN_IN)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise EdgeccError(f"{option} must be a non-negative integer, got {value!r}", where=f"--prune-{option}",
                              hint=f"e.g. {example}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise EdgeccError(f"the pruning block must be a positive integer, got {block!r}", where="--prune-block",
                          hint="1 (single weights) or the target's float lanes, e.g. 8 on AVX2, 4 on NEON")
    if block > 1 and scope != "layer":
        raise EdgeccError("block pruning is per layer", where="--prune-scope",
                          hint="drop --prune-scope global, or prune single weights (--prune-block 1)")
    graph = module.graph
    records: list[dict] = []
    eligible: list[tuple[Node, dict]] = []
    for node in selected(weight_layers(graph), layers):
        weights = node.inputs[1].const
        record = layer_record(node, sparsity=float(np.mean(weights == 0)), scope=scope)
        records.append(record)
        fan_in = fan_in_of(node)
        if weights.size < min_elements:
            record["skipped"] = f"{weights.size} weights < min-elements {min_elements}"
        elif fan_in < min_fan_in:
            record["skipped"] = (f"{fan_in} weights per output channel (< {min_fan_in}: depthwise or first layer); "
                                 "kept dense, as in Elsen et al. 2019")
        else:
            eligible.append((node, record))

    # One mask per distinct weight constant (a constant two layers share is pruned once).
    distinct: dict[int, Value] = {}
    for node, _ in eligible:
        distinct.setdefault(node.inputs[1]._id, node.inputs[1])
    masks: dict[int, np.ndarray] = {}
    readers = {node.inputs[1]._id: node for node, _ in eligible}
    if scope == "layer" and block > 1:
        for key, value in distinct.items():
            masks[key] = block_mask(readers[key], value.const, sparsity, block)
    elif scope == "layer":
        for key, value in distinct.items():
            size = value.const.size
            masks[key] = _zero_smallest(np.abs(value.const).ravel(), min(round(sparsity * size), size - 1))
    elif distinct:
        flat = np.concatenate([np.abs(v.const).ravel().astype(np.float64) for v in distinct.values()])
        mask = _zero_smallest(flat, round(sparsity * flat.size))
        start = 0
        for key, value in distinct.items():
            masks[key] = mask[start:start + value.const.size].copy()
            start += value.const.size

    pruned: dict[int, Value] = {}
    kept_channels: dict[int, int] = {}
    for node, record in eligible:
        old = node.inputs[1]
        if old._id not in pruned:
            zero = masks[old._id]
            if scope == "global":
                kept_channels[old._id] = _keep_one_per_channel(old.const, zero, output_axis(node))
            array = np.where(zero.reshape(old.const.shape), np.zeros((), old.const.dtype), old.const)
            pruned[old._id] = new_constant(graph, node, 1, array, "pruned")
        else:
            node.set_input(1, pruned[old._id])
        weights = node.inputs[1].const
        record.update(weight=node.inputs[1].name, sparsity=float(np.mean(weights == 0)))
        if block > 1:
            record["block"] = block
        elif scope == "layer":
            record["threshold"] = float(np.abs(old.const).ravel()[masks[old._id]].max(initial=0.0))
        elif kept_channels.get(old._id):
            record["note"] = (f"the global threshold would empty {kept_channels[old._id]} output channel(s); "
                              "kept the largest weight of each")
    return records


@register_pass
@dataclass(frozen=True)
class PrunePass(CompressionPass):
    """Unstructured magnitude pruning: zero the smallest |w| of every Conv / Gemm / MatMul weight.

    `scope=layer` prunes each layer to `sparsity` (round(sparsity * numel) zeros, ties by position);
    `scope=global` applies one |w| threshold to all eligible layers together, keeping at least one weight per
    output channel. Layers with fewer than `min-elements` weights, or fewer than `min-fan-in` per output channel
    (depthwise convolutions, a first conv on few channels), are left alone (they lose accuracy and save little);
    biases are never pruned. Weights stay dense float32 (encode-sparsity stores them). Changes numerics; opt-in
    only (`--prune`), in no -O pipeline.

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    `block=V` (V > 1) zeroes whole 1xV blocks of V consecutive outputs at one input (smallest L2 norm first),
    the unit the sparse kernels compute in one vector operation: one-row FC layers only run faster sparse in
    blocks.

    Options: `sparsity` (default 0.8, in (0, 1)), `scope` (layer or global), `min-elements` (default 256),
    `min-fan-in` (default 32), `block` (default 1).

    Example: `prune{sparsity=0.9,scope=global}` on `Gemm(%x, @w, @b)` gives `Gemm(%x, @w_pruned, @b)`.
    """

    name = "prune"
    done_stat = "layers-pruned"

    sparsity: float = 0.8
    scope: str = "layer"
    min_elements: int = 256
    min_fan_in: int = MIN_FAN_IN
    block: int = 1

    def compress(self, module: Module) -> list[dict]:
        return prune_magnitude(module, self.sparsity, self.scope, self.min_elements, self.min_fan_in, self.block)
