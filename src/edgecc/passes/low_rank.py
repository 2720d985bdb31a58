"""low-rank: truncated SVD of Gemm / MatMul weights and 1x1 Conv weights, as two thinner products.

x @ W (K x N) becomes (x @ P) @ Q with P = U_r sqrt(S_r) (K x r) and Q = sqrt(S_r) V_r (r x N), r the smallest
rank whose squared singular values hold `energy` of the total. Both bytes and MACs scale with r (K + N) instead of
K N, so a layer is factorised only when r (K + N) < K N. The error is bounded: ||x W - x P Q||_F <=
||x||_F sqrt(sum of the dropped s^2) (the spectral norm of W - PQ is the largest dropped s, at most that sum).
KxK convolutions can take Tucker-2 instead (`tucker=True`): three convolutions around a smaller core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ops.apply import infer_node, opdef_of
from edgecc.ops.costs import node_macs
from edgecc.passes.prune import CompressionPass, check_fraction, layer_record, selected, weight_layers
from edgecc.passes.registry import register_pass


def _matrix(node: Node) -> np.ndarray | str:
    """The layer's weight as the K x N matrix x is multiplied by, or why the layer is not factorised."""
    weight = node.inputs[1].const
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1:
            return "grouped convolution (only group=1 1x1 convolutions are factorised)"
        if any(d != 1 for d in weight.shape[2:]):
            return f"{'x'.join(map(str, weight.shape[2:]))} convolution (tucker=true factorises KxK kernels)"
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


def _pointwise(spatial: int) -> dict:
    """Attributes of a 1x1 convolution with unit strides and no padding."""
    ones = [1] * spatial
    return {"kernel_shape": ones, "strides": ones, "dilations": ones, "pads": [0] * (2 * spatial),
            "auto_pad": "NOTSET", "group": 1}


def _insert(graph: Graph, node: Node, op: str, x: Value, weight: np.ndarray, attrs: dict, suffix: str) -> Node:
    """A new `op(x, weight)` node before `node`, named after it, with its output typed."""
    hidden = Value(graph.unique_name(f"{node.outputs[0].name}_{suffix}"))
    constant = graph.constant(np.ascontiguousarray(weight).astype(node.inputs[1].const.dtype),
                              f"{node.inputs[1].name}_{suffix}")
    new = Node(op, [x, constant], [hidden], attrs, _node_name(graph, f"{node.name or node.outputs[0].name}_{suffix}"))
    new.attrs = opdef_of(new).complete_attrs(new.attrs, where=new.label)
    graph.add_node(new, before=node)
    hidden.type = infer_node(new)[0]
    return new


def _finish(graph: Graph, node: Node, x: Value, weight: np.ndarray) -> None:
    """Make `node` the last product: it reads `x` and the last factor, and keeps its bias and output."""
    node.set_input(0, x)
    node.set_input(1, graph.constant(np.ascontiguousarray(weight).astype(node.inputs[1].const.dtype),
                                     f"{node.inputs[1].name}_v"))
    node.outputs[0].type = infer_node(node)[0]


def _factorise(graph: Graph, node: Node, p: np.ndarray, q: np.ndarray) -> list[Node]:
    """Insert the first product (x @ P) before `node` and make `node` the second (with Q, its bias, its output)."""
    x = node.inputs[0]
    if node.op == "Conv":
        ones = (1,) * (node.inputs[1].const.ndim - 2)
        first = _insert(graph, node, "Conv", x, p.T.reshape(p.shape[::-1] + ones), dict(node.attrs), "u")
        node.attrs.update(_pointwise(len(ones)))
        second = q.T.reshape(q.shape[::-1] + ones)
    else:
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        second = q.T if transposed else q
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            first = _insert(graph, node, "Gemm", x, p, {"transA": 1}, "u")
            node.attrs["transA"] = 0
        else:
            first = _insert(graph, node, "MatMul", x, p, {}, "u")
    _finish(graph, node, first.outputs[0], second)
    return [first, node]


def _left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values (descending) of a wide float64 matrix, from the eigenvectors of
    its Gram matrix: 10x faster than a full SVD for a 512 x 4608 unfolding, and the right vectors are not needed."""
    values, vectors = np.linalg.eigh(matrix @ matrix.T)
    order = np.argsort(values)[::-1][:min(matrix.shape)]
    return vectors[:, order], np.sqrt(np.maximum(values[order], 0.0))


def _tucker2(graph: Graph, node: Node, energy: float, record: dict) -> list[Node] | str:
    """A KxK Conv (group=1) as 1x1 (C -> r_in), KxK core (r_in -> r_out, the original strides/pads), 1x1 (r_out -> N
    with the bias): Tucker-2 by truncated HOSVD of the weight's output- and input-channel unfoldings, or why not."""
    weight = node.inputs[1].const.astype(np.float64)
    n, c, taps = weight.shape[0], weight.shape[1], int(np.prod(weight.shape[2:]))
    u_out, s_out = _left_singular(weight.reshape(n, -1))
    u_in, s_in = _left_singular(np.moveaxis(weight, 1, 0).reshape(c, -1))
    r_out, r_in = truncated_rank(s_out, energy)[0], truncated_rank(s_in, energy)[0]
    a, b = u_in[:, :r_in], u_out[:, :r_out]
    core = np.einsum("nc...,nr,cs->rs...", weight, b, a, optimize=True)  # two products, not one 4-deep loop
    total = float(np.sum(weight ** 2))
    record.update(rank=[r_in, r_out], full_rank=[int(s_in.size), int(s_out.size)],
                  energy_kept=float(np.sum(core ** 2) / total) if total else 1.0)
    x, out = node.inputs[0].type.shape, node.outputs[0].type.shape
    in_positions, out_positions = x[0] * int(np.prod(x[2:])), out[0] * int(np.prod(out[2:]))
    params = c * r_in + r_in * r_out * taps + r_out * n
    macs = in_positions * c * r_in + out_positions * (r_in * r_out * taps + r_out * n)
    if params >= n * c * taps or macs >= record["macs_before"]:
        return (f"ranks {r_in}/{r_out} save nothing ({params} weights, {macs} MACs against {n * c * taps} and "
                f"{record['macs_before']})")
    ones = (1,) * (weight.ndim - 2)
    first = _insert(graph, node, "Conv", node.inputs[0], a.T.reshape((r_in, c) + ones), _pointwise(len(ones)), "u")
    middle = _insert(graph, node, "Conv", first.outputs[0], core, dict(node.attrs), "core")
    node.attrs.update(_pointwise(len(ones)))
    _finish(graph, node, middle.outputs[0], b.reshape((n, r_out) + ones))
    return [first, middle, node]


def low_rank(module: Module, energy: float, tucker: bool = False, layers=None) -> list[dict]:
    """Factorise every Gemm / MatMul (2-D constant weight) and 1x1 Conv (group=1) by truncated SVD, in place, where
    the rank keeping `energy` of the squared singular values saves bytes and MACs; one record per weight layer
    ("rank", "full_rank", "energy_kept"; "skipped" with the reason elsewhere). With `tucker`, KxK convolutions
    (group=1) are factorised too, by Tucker-2 (`_tucker2`; their rank and full rank are [input, output] pairs and
    energy_kept is ||core||^2 / ||W||^2). `layers` (node names), when given, limits the factorisation to those layers
    (the others get no record), so that a search can give each layer its own energy."""
    energy = check_fraction(energy, "--low-rank", "energy", upper_closed=True)
    graph = module.graph
    records = []
    for node in selected(weight_layers(graph), layers):
        matrix = _matrix(node)
        record = layer_record(node, rank=None, full_rank=None, energy_kept=None)
        records.append(record)
        if isinstance(matrix, str):
            kxk = node.op == "Conv" and node.attrs.get("group", 1) == 1
            nodes = _tucker2(graph, node, energy, record) if kxk and tucker else matrix
        else:
            k, n = matrix.shape
            u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
            rank, kept = truncated_rank(s, energy)
            record.update(rank=rank, full_rank=int(s.size), energy_kept=kept)
            root = np.sqrt(s[:rank])
            if rank * (k + n) >= k * n:
                nodes = f"rank {rank} saves nothing (r*(K+N) = {rank * (k + n)} >= K*N = {k * n})"
            else:
                nodes = _factorise(graph, node, u[:, :rank] * root, root[:, None] * vt[:rank])
        if isinstance(nodes, str):
            record["skipped"] = nodes
            continue
        record.update(nodes=[m.name for m in nodes], weight=[m.inputs[1].name for m in nodes],
                      bytes_after=int(sum(m.inputs[1].const.nbytes for m in nodes)),
                      macs_after=int(sum(node_macs(m) for m in nodes)))
    return records


@register_pass
@dataclass(frozen=True)
class LowRankPass(CompressionPass):
    """Low-rank factorisation: truncated SVD of Gemm / MatMul weights (2-D constants) and 1x1 Conv weights.

    x @ W (K x N) becomes MatMul(x, P) then the original op with Q and its bias, P = U_r sqrt(S_r) and Q =
    sqrt(S_r) V_r, r the smallest rank keeping `energy` of the sum of squared singular values. A 1x1 Conv becomes
    two 1x1 Convs, the first with the original strides/pads, the second with the bias. Only where
    r (K + N) < K N (bytes and MACs both drop); other layers are left alone. With `tucker=true`, a KxK Conv
    (group=1) becomes 1x1 (C -> r_in), KxK (r_in -> r_out, its strides/pads), 1x1 (r_out -> N, its bias), Tucker-2 by
    truncated HOSVD keeping `energy` of each channel unfolding, where weights and MACs both drop.
    Changes numerics; opt-in only (`--low-rank`).

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    Options: `energy` (default 0.95, in (0, 1]), `tucker` (default false).

    Example: `Gemm(%x, @w : tensor<256x512xf32>, @b) {transB = 1}` at rank 32 becomes
    `%h = MatMul(%x, @w_u : tensor<512x32xf32>)`, `Gemm(%h, @w_v : tensor<256x32xf32>, @b) {transB = 1}`.
    """

    name = "low-rank"
    done_stat = "layers-factorised"

    energy: float = 0.95
    tucker: bool = False

    def compress(self, module: Module) -> list[dict]:
        return low_rank(module, self.energy, self.tucker)
