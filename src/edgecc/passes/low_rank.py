"""low-rank: truncated SVD of Gemm / MatMul weights and 1x1 Conv weights, as two thinner products.

x @ W (K x N) becomes (x @ P) @ Q with P = U_r sqrt(S_r) (K x r) and Q = sqrt(S_r) V_r (r x N), r the smallest
rank whose squared singular values hold `energy` of the total. Both bytes and MACs scale with r (K + N) instead of
K N, so a layer is factorised only when r (K + N) < K N. The error is bounded: ||x W - x P Q||_F <=
||x||_F sqrt(sum of the dropped s^2) (the spectral norm of W - PQ is the largest dropped s, at most that sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ops.apply import infer_node, opdef_of
from edgecc.ops.costs import node_macs
from edgecc.passes.prune import CompressionPass, check_fraction, layer_record, weight_layers
from edgecc.passes.registry import register_pass


def _matrix(node: Node) -> np.ndarray | str:
    """The layer's weight as the K x N matrix x is multiplied by, or why the layer is not factorised."""
    weight = node.inputs[1].const
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1:
            return "grouped convolution (only group=1 1x1 convolutions are factorised)"
        if any(d != 1 for d in weight.shape[2:]):
            return f"{'x'.join(map(str, weight.shape[2:]))} convolution (only 1x1 kernels are factorised)"
        return weight.reshape(weight.shape[:2]).T
    if weight.ndim != 2:
        return f"{node.op} by a {weight.ndim}-D weight (batched)"
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight.T
    return weight


def truncated_rank(s: np.ndarray, energy: float) -> tuple[int, float]:
    """The smallest r with sum(s[:r]^2) >= energy * sum(s^2), and the fraction of energy it keeps."""
    cumulative = np.cumsum(s.astype(np.float64) ** 2)
    total = cumulative[-1]
    if total == 0:
        return 1, 1.0
    rank = min(int(np.searchsorted(cumulative, energy * total, side="left")) + 1, s.size)
    return rank, float(cumulative[rank - 1] / total)


def _node_name(graph: Graph, base: str) -> str:
    taken = {n.name for n in graph.nodes}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _factorise(graph: Graph, node: Node, p: np.ndarray, q: np.ndarray) -> Node:
    """Insert the first product (x @ P) before `node` and make `node` the second (with Q, its bias, its output)."""
    dtype = node.inputs[1].const.dtype
    weight_name = node.inputs[1].name
    hidden = Value(graph.unique_name(f"{node.outputs[0].name}_low_rank"))
    name = _node_name(graph, f"{node.name}_u")
    if node.op == "Conv":
        ones = (1,) * (node.inputs[1].const.ndim - 2)
        op, attrs, first_weight, second = "Conv", dict(node.attrs), p.T.reshape(p.shape[::-1] + ones), \
            q.T.reshape(q.shape[::-1] + ones)
        node.attrs.update(kernel_shape=list(ones), strides=list(ones), dilations=list(ones), pads=[0] * (2 * len(ones)),
                          auto_pad="NOTSET")
    else:
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        op, attrs, first_weight, second = "MatMul", {}, p, (q.T if transposed else q)
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            op, attrs = "Gemm", {"transA": 1}
            node.attrs["transA"] = 0
    first = Node(op, [node.inputs[0], graph.constant(np.ascontiguousarray(first_weight).astype(dtype),
                                                     f"{weight_name}_u")], [hidden], attrs, name)
    first.attrs = opdef_of(first).complete_attrs(first.attrs, where=first.label)
    graph.add_node(first, before=node)
    hidden.type = infer_node(first)[0]
    node.set_input(0, hidden)
    node.set_input(1, graph.constant(np.ascontiguousarray(second).astype(dtype), f"{weight_name}_v"))
    node.outputs[0].type = infer_node(node)[0]
    return first


def low_rank(module: Module, energy: float) -> list[dict]:
    """Factorise every Gemm / MatMul (2-D constant weight) and 1x1 Conv (group=1) by truncated SVD, in place, where
    the rank keeping `energy` of the squared singular values saves bytes and MACs; one record per weight layer
    ("rank", "full_rank", "energy_kept"; "skipped" with the reason elsewhere)."""
    energy = check_fraction(energy, "--low-rank", "energy", upper_closed=True)
    graph = module.graph
    records = []
    for node in weight_layers(graph):
        matrix = _matrix(node)
        if isinstance(matrix, str):
            records.append(layer_record(node, rank=None, full_rank=None, energy_kept=None, skipped=matrix))
            continue
        k, n = matrix.shape
        u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        rank, kept = truncated_rank(s, energy)
        record = layer_record(node, rank=rank, full_rank=int(s.size), energy_kept=kept)
        records.append(record)
        if rank * (k + n) >= k * n:
            record["skipped"] = f"rank {rank} saves nothing (r*(K+N) = {rank * (k + n)} >= K*N = {k * n})"
            continue
        root = np.sqrt(s[:rank])
        first = _factorise(graph, node, u[:, :rank] * root, root[:, None] * vt[:rank])
        record.update(nodes=[first.name, node.name], weight=[first.inputs[1].name, node.inputs[1].name],
                      bytes_after=int(first.inputs[1].const.nbytes + node.inputs[1].const.nbytes),
                      macs_after=int(node_macs(first) + node_macs(node)))
    return records


@register_pass
@dataclass(frozen=True)
class LowRankPass(CompressionPass):
    """Low-rank factorisation: truncated SVD of Gemm / MatMul weights (2-D constants) and 1x1 Conv weights.

    x @ W (K x N) becomes MatMul(x, P) then the original op with Q and its bias, P = U_r sqrt(S_r) and Q =
    sqrt(S_r) V_r, r the smallest rank keeping `energy` of the sum of squared singular values. A 1x1 Conv becomes
    two 1x1 Convs, the first with the original strides/pads, the second with the bias. Only where
    r (K + N) < K N (bytes and MACs both drop); other layers are left alone. KxK convolutions are not factorised.
    Changes numerics; opt-in only (`--low-rank`).

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    Options: `energy` (default 0.95, in (0, 1]).

    Example: `Gemm(%x, @w : tensor<256x512xf32>, @b) {transB = 1}` at rank 32 becomes
    `%h = MatMul(%x, @w_u : tensor<512x32xf32>)`, `Gemm(%h, @w_v : tensor<256x32xf32>, @b) {transB = 1}`.
    """

    name = "low-rank"
    done_stat = "layers-factorised"

    energy: float = 0.95

    def compress(self, module: Module) -> list[dict]:
        return low_rank(module, self.energy)
