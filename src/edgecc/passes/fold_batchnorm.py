"""fold-batchnorm: fold inference-mode BatchNormalization into the Conv or Gemm that feeds it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass
from edgecc.passes.rewrite import RewriteRule, apply_rules, const_of, forward, remove_if_dead, single_reader


def _bn_scale_shift(bn: Node) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm as y = x * scale + shift per channel (computed in float64, rounded once)."""
    gamma, beta, mean, var = (const_of(v).astype(np.float64) for v in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return scale, beta - mean * scale


class FoldBatchNormIntoConv(RewriteRule):
    name, roots = "fold-batchnorm-into-conv", ("BatchNormalization",)

    def check(self, bn: Node, graph: Graph):
        if bn.attrs.get("training_mode", 0):
            return "training_mode is set"
        if any(v.uses or graph.is_output(v) for v in bn.outputs[1:]):
            return "running statistics outputs are used"
        if any(const_of(v) is None for v in bn.inputs[1:5]):
            return "scale, bias, mean or variance is not a constant"
        producer = bn.inputs[0].producer
        if producer is None or producer.op not in ("Conv", "Gemm"):
            return "the input is not produced by Conv or Gemm"
        if not single_reader(graph, bn.inputs[0]):
            return f"the {producer.op} result has other readers"
        if const_of(producer.inputs[1]) is None or (producer.input(2) is not None and const_of(producer.inputs[2]) is None):
            return f"the {producer.op} weights or bias are not constants"
        if not np.issubdtype(producer.inputs[1].const.dtype, np.floating):
            return "the weights are not float"
        if producer.op == "Gemm" and bn.inputs[0].type.rank != 2:
            return "Gemm output is not 2-D"
        return None

    def rewrite(self, bn: Node, graph: Graph):
        producer = bn.inputs[0].producer
        scale, shift = _bn_scale_shift(bn)
        weights = producer.inputs[1].const
        dtype = weights.dtype
        channels = scale.shape[0]
        if producer.op == "Conv":
            new_w = weights.astype(np.float64) * scale.reshape((-1,) + (1,) * (weights.ndim - 1))
            bias = const_of(producer.input(2))
            old_b = np.zeros(channels) if bias is None else bias.astype(np.float64)
            new_b = old_b * scale + shift
            producer.set_input(1, graph.constant(new_w.astype(dtype), "w_bn"))
            if len(producer.inputs) < 3:
                producer.append_input(None)
            producer.set_input(2, graph.constant(new_b.astype(dtype), "b_bn"))
        else:  # Gemm: Y = alpha * A @ B' + beta * C  (B' = B or B^T)
            beta = producer.attrs.get("beta", 1.0)
            trans_b = producer.attrs.get("transB", 0)
            b = weights.astype(np.float64)
            new_b = b * scale.reshape(-1, 1) if trans_b else b * scale.reshape(1, -1)
            c = const_of(producer.input(2))
            c = np.zeros(channels) if c is None else beta * c.astype(np.float64)
            new_c = c * scale + shift
            producer.attrs = dict(producer.attrs, beta=1.0)
            producer.set_input(1, graph.constant(new_b.astype(dtype), "w_bn"))
            if len(producer.inputs) < 3:
                producer.append_input(None)
            producer.set_input(2, graph.constant(new_c.astype(dtype), "c_bn"))
        forward(graph, bn, 0, bn.inputs[0])
        remove_if_dead(graph, bn)


@register_pass
@dataclass(frozen=True)
class FoldBatchNormPass(Pass):
    """Fold BatchNormalization (inference mode, constant statistics) into the preceding Conv or Gemm.

    For Conv: W'[o] = W[o] * s[o], b'[o] = b[o] * s[o] + t[o] with s = gamma / sqrt(var + eps) and
    t = beta - mean * s, computed in float64 and rounded once. For Gemm the same scale applies to the output
    columns of B and to C. Applies only when the Conv/Gemm result has no other reader.

    Requires: topologically-sorted, shapes-inferred. Keeps both (the folded Conv keeps its output type).

    Example: `Conv(x, W) -> BatchNormalization(g, b, m, v)` becomes `Conv(x, W', b')`.
    """

    name = "fold-batchnorm"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        fired = apply_rules(module.graph, [FoldBatchNormIntoConv()], ctx)
        return PassResult(bool(fired), {"batchnorms-folded": fired.get("fold-batchnorm-into-conv", 0)})
