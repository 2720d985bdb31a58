"""fuse-epilogues: fold the bias Add, residual Add and activation that follow a Conv, Gemm or MatMul into it.

On small CPUs an elementwise op after a convolution costs a whole extra pass over its output through memory
(Clip was 8% of MobileNet-v2's time); as an epilogue it is a few instructions on values still in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ops.fused import ACTIVATIONS, activation_params
from edgecc.ops.registry import EDGECC_DOMAIN
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass
from edgecc.passes.rewrite import (RewriteRule, apply_rules, const_of, forward, remove_if_dead, replace_with_new_node,
                                   single_reader)

PRODUCERS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
_FLOAT_DTYPES = (np.float32, np.float16)


def _float_result(node: Node) -> bool:
    """The node's first result has a known float32/float16 type (the epilogues are float arithmetic)."""
    out = node.outputs[0].type
    return out is not None and out.dtype.numpy in _FLOAT_DTYPES


def _producer(value: Value | None, graph: Graph) -> Node | None:
    """The Conv/Gemm (plain or fused, no activation yet) whose only reader is the node being fused."""
    node = value.producer if value is not None else None
    if node is None or node.op not in PRODUCERS or node.attrs.get("activation"):
        return None
    if not single_reader(graph, value) or not _float_result(node):
        return None
    if any(v is not None and v.type is None for v in node.inputs):
        return None
    if node.op == "MatMul":
        a, b = node.inputs[0].type, node.inputs[1].type
        if a.rank < 2 or b.rank != 2 or a.shape[-1] == 0:
            return None  # the fused kernel's bias runs along B's columns
    return node


def _as_fused(node: Node) -> None:
    if node.domain != EDGECC_DOMAIN:
        node.op, node.domain = "Fused" + node.op, EDGECC_DOMAIN
    while len(node.inputs) < (3 if node.op == "FusedGemm" else 4):
        node.append_input(None)


def _per_channel(c: np.ndarray, out_shape) -> np.ndarray | None:
    """c as a vector over the output's channel axis (1), if it broadcasts to the output only along that axis."""
    rank = len(out_shape)
    if c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, out_shape[1]):
        return None
    return np.broadcast_to(c.reshape(-1), (out_shape[1],))


def _last_axis(c: np.ndarray, out_shape) -> np.ndarray | None:
    """c as a vector over the output's last axis, if it broadcasts to the output only along that axis."""
    n = out_shape[-1] if len(out_shape) else 0
    if not len(out_shape) or c.size != n or (c.ndim and c.shape[-1] != n) or c.ndim > len(out_shape):
        return None
    return c.reshape(-1)


def _absorb_bias_or_residual(producer: Node, other: Value, vector: np.ndarray | None, graph: Graph,
                             dry_run: bool) -> str | None:
    """Conv/MatMul (plain or fused) + `vector` (a bias, added to input 2) or + `other` (a residual: input 3)."""
    out = producer.outputs[0]
    if vector is not None:
        bias = const_of(producer.input(2))
        if producer.input(2) is not None and bias is None:
            return "the bias is not a constant"
        if dry_run:
            return None
        new = vector.astype(np.float64) + (0 if bias is None else bias.astype(np.float64))
        _as_fused(producer)
        producer.set_input(2, graph.constant(new.astype(out.type.dtype.numpy), "bias_add"))
        return None
    if other.type != out.type:
        return "the residual's type differs from the output's"
    if producer.domain == EDGECC_DOMAIN and producer.input(3) is not None:
        return "a residual is already fused"
    if not dry_run:
        _as_fused(producer)
        producer.set_input(3, other)
    return None


def _absorb_add(producer: Node, other: Value, graph: Graph, dry_run: bool) -> str | None:
    """Fold `producer + other` into the producer; None if done (or, with dry_run, possible), else why not."""
    out = producer.outputs[0]
    if other is out:
        return "both operands are the same value"
    c = const_of(other)
    if producer.op not in ("Gemm", "FusedGemm"):
        vector = None
        if c is not None:
            conv = producer.op in ("Conv", "FusedConv")
            vector = (_per_channel if conv else _last_axis)(c, out.type.shape)
            if vector is None:
                return "the constant is not per-channel" if conv else "the constant is not a vector over the last axis"
        return _absorb_bias_or_residual(producer, other, vector, graph, dry_run)
    # Gemm: Y = alpha * A B + beta * C; the Add becomes C (or is added to a constant C).
    existing = producer.input(2)
    shape = out.type.shape
    if c is not None:
        try:
            if np.broadcast_shapes(c.shape, shape) != tuple(shape):
                return "the constant does not broadcast to the output"
        except ValueError:
            return "the constant does not broadcast to the output"
        if existing is not None and const_of(existing) is None:
            return "C is not a constant"
        if dry_run:
            return None
        beta = float(producer.attrs.get("beta", 1.0))
        new = c.astype(np.float64) + (0 if existing is None else beta * const_of(existing).astype(np.float64))
        _as_fused(producer)
        producer.attrs = dict(producer.attrs, beta=1.0)
        producer.set_input(2, graph.constant(new.astype(out.type.dtype.numpy), "c_add"))
        return None
    if existing is not None:
        return "Gemm already has C"
    if other.type != out.type:
        return "the residual's type differs from the output's"
    if not dry_run:
        _as_fused(producer)
        producer.attrs = dict(producer.attrs, beta=1.0)
        producer.set_input(2, other)
    return None


def _scalar_const(value: Value | None) -> float | None:
    c = const_of(value)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 and c.dtype.kind == "f" else None


def _other(node: Node, value: Value) -> Value | None:
    """The other operand of a binary node that reads `value`."""
    a, b = node.inputs[0], node.input(1)
    return b if a is value else a if b is value else None


class FuseGelu(RewriteRule):
    """x * 0.5 * (1 + erf(x / sqrt(2))) (the exact Gelu as PyTorch exports it, either operand order) becomes one
    Gelu, computed with edgecc's float32 erf in a single pass (a few ulp from the five-op chain)."""

    name, roots = "fuse-gelu", ("Mul",)

    def _match(self, node: Node, graph: Graph):
        for half_index in (0, 1):
            if _scalar_const(node.input(half_index)) != 0.5:
                continue
            inner = node.inputs[1 - half_index].producer
            if inner is None or inner.op != "Mul" or not single_reader(graph, inner.outputs[0]):
                continue
            for k in (0, 1):
                x, plus = inner.inputs[k], inner.inputs[1 - k].producer
                if plus is None or plus.op != "Add" or not single_reader(graph, plus.outputs[0]):
                    continue
                for j in (0, 1):
                    erf = plus.inputs[j].producer
                    if _scalar_const(plus.input(1 - j)) != 1.0 or erf is None or erf.op != "Erf":
                        continue
                    scale = erf.inputs[0].producer
                    if scale is None or not single_reader(graph, erf.outputs[0]) or \
                            not single_reader(graph, erf.inputs[0]) or scale.inputs[0] is not x:
                        continue
                    factor = _scalar_const(scale.input(1))
                    if factor is not None and ((scale.op == "Div" and abs(factor - 2 ** 0.5) < 1e-6) or
                                               (scale.op == "Mul" and abs(factor - 2 ** -0.5) < 1e-6)):
                        return x, [inner, plus, erf, scale]
        return None

    def check(self, node: Node, graph: Graph):
        if not _float_result(node):
            return "not a float Mul"
        return None if self._match(node, graph) is not None else "not x * 0.5 * (1 + erf(x / sqrt(2)))"

    def rewrite(self, node: Node, graph: Graph):
        x, chain = self._match(node, graph)
        replace_with_new_node(graph, node, "Gelu", [x], {})
        for dead in chain:  # consumers first, so each is dead when its turn comes
            remove_if_dead(graph, dead)


def _defined_before(value: Value, node: Node, graph: Graph) -> bool:
    if value.producer is None:
        return True
    return graph.nodes.index(value.producer) < graph.nodes.index(node)


class FuseAdd(RewriteRule):
    """Conv/Gemm -> Add(bias or residual)."""

    name, roots = "fuse-add", ("Add",)

    def _pick(self, node: Node, graph: Graph):
        reasons = []
        for i in (0, 1):
            producer = _producer(node.inputs[i], graph)
            if producer is None:
                reasons.append(f"input {i} is not a single-use float Conv/Gemm without activation")
                continue
            why = _absorb_add(producer, node.inputs[1 - i], graph, dry_run=True)
            if why is None:
                return producer, node.inputs[1 - i], None
            reasons.append(why)
        return None, None, "; ".join(reasons)

    def check(self, node: Node, graph: Graph):
        if not _float_result(node):
            return "not a float Add"
        return self._pick(node, graph)[2]

    def rewrite(self, node: Node, graph: Graph):
        producer, other, _ = self._pick(node, graph)
        if not other.is_const and not _defined_before(other, producer, graph):
            graph.nodes.remove(producer)  # the residual comes later: compute the fused op where the Add was
            graph.nodes.insert(graph.nodes.index(node), producer)
        _absorb_add(producer, other, graph, dry_run=False)
        forward(graph, node, 0, producer.outputs[0])
        graph.remove_node(node)


class FuseActivation(RewriteRule):
    """Conv/Gemm (with any fused Adds) -> activation."""

    name, roots = "fuse-activation", tuple(ACTIVATIONS)

    def check(self, node: Node, graph: Graph):
        if _producer(node.inputs[0], graph) is None:
            return "the input is not a single-use float Conv/Gemm without activation"
        if node.op == "Clip" and any(v is not None and const_of(v) is None for v in node.inputs[1:]):
            return "Clip bounds are not constants"
        return None

    def rewrite(self, node: Node, graph: Graph):
        producer = node.inputs[0].producer
        _as_fused(producer)
        if node.op == "Clip":
            bounds = [const_of(node.input(i)) for i in (1, 2)]
            params = [float(b.reshape(-1)[0]) if b is not None else d for b, d in zip(bounds, (-np.inf, np.inf))]
        else:
            given = activation_params(node.op, ())
            given.update({k: float(v) for k, v in node.attrs.items() if k in given})
            params = list(given.values())
        producer.attrs = dict(producer.attrs, activation=node.op, activation_params=params)
        forward(graph, node, 0, producer.outputs[0])
        graph.remove_node(node)


@register_pass
@dataclass(frozen=True)
class FuseEpiloguesPass(Pass):
    """Fold what follows a Conv, Gemm or MatMul into its epilogue: edgecc.FusedConv / FusedGemm / FusedMatMul.

    First the exact Gelu chain x * 0.5 * (1 + erf(x / sqrt(2))) becomes one Gelu. Then, when the Conv/Gemm/MatMul
    result has no other reader: an Add of a constant bias (per channel for Conv, along the last axis for MatMul,
    broadcastable for Gemm), an Add of a tensor of the output's shape (a residual; the fused node moves to the
    Add's place if the residual is computed later), and then one activation (Relu, LeakyRelu, Clip with constant
    bounds, HardSigmoid, HardSwish, Sigmoid, Tanh, Gelu). For float32 the fused epilogue is the same float32
    operations as the unfused ops; the Gelu chain's five ops become edgecc's erf-based Gelu (a few ulp apart);
    float16 rounds once instead of after each op.

    Requires: topologically-sorted, shapes-inferred. Keeps both.

    Example: `Conv(x, W, b) -> Add(_, skip) -> Relu` becomes `edgecc.FusedConv(x, W, b, skip){activation="Relu"}`.
    """

    name = "fuse-epilogues"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        fired = apply_rules(module.graph, [FuseGelu()], ctx)
        fired.update(apply_rules(module.graph, [FuseAdd(), FuseActivation()], ctx))
        return PassResult(bool(fired), {"gelus-formed": fired.get("fuse-gelu", 0),
                                        "adds-fused": fired.get("fuse-add", 0),
                                        "activations-fused": fired.get("fuse-activation", 0)})
