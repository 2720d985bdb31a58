"""dce: remove nodes whose results nobody reads."""

from __future__ import annotations

from dataclasses import dataclass

from edgecc.ir.core import Module
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeEliminationPass(Pass):
    """Delete nodes none of whose outputs is used by another node or is a graph output.

    Every op in edgecc's set is free of side effects, so this is always safe. Walks backwards so a whole
    dead chain goes in one run.

    Requires: topologically-sorted. Keeps every property.

    Example: `%1 = "onnx.Relu"(%0)` with `%1` unused is removed.
    """

    name = "dce"
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        live_outputs = {v._id for v in graph.outputs}
        removed = 0
        for node in reversed(list(graph.nodes)):
            if any(v.uses or v._id in live_outputs for v in node.outputs):
                continue
            graph.remove_node(node)
            removed += 1
        return PassResult(removed > 0, {"nodes-removed": removed})
