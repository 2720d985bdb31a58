"""Compute cost of ops (multiply-accumulates), for reports and, later, the device cost model."""

from __future__ import annotations

import numpy as np

from edgecc.ir.core import Node


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def node_macs(node: Node) -> int:
    """Multiply-accumulates of one node (0 for ops that do no arithmetic worth counting)."""
    ins = [v.type if v is not None else None for v in node.inputs]
    outs = [v.type for v in node.outputs]
    if not outs or outs[0] is None or any(t is None for t in ins[:2] if t is not None):
        return 0
    op = node.op
    if op in ("Conv", "ConvInteger", "FusedConv"):
        w = ins[1]
        return _prod(outs[0].shape) * _prod(w.shape[1:])
    if op == "QLinearConv":
        w = ins[3]
        return _prod(outs[0].shape) * _prod(w.shape[1:])
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        return _prod(x.shape) * _prod(w.shape[1:])
    if op in ("MatMul", "MatMulInteger", "Gemm", "QLinearMatMul", "FusedGemm", "FusedMatMul"):
        a = ins[0]
        k = a.shape[-1] if op not in ("Gemm", "FusedGemm") or not node.attrs.get("transA", 0) else a.shape[0]
        return _prod(outs[0].shape) * int(k)
    if op == "QGemm":  # edgecc.QGemm: A [.., K] (input 0) times B (input 3), no transA
        return _prod(outs[0].shape) * int(ins[0].shape[-1])
    return 0


def module_macs(graph) -> int:
    return sum(node_macs(n) for n in graph.nodes)
