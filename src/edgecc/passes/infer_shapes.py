"""infer-shapes: give every value a static type, propagating small compile-time values on the way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Module
from edgecc.ops.apply import compile_time_inputs, evaluate_node, infer_node, opdef_of
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class InferShapesPass(Pass):
    """Infer the static type (dtype and shape) of every node output from the op registry's inference rules.

    Shapes that depend on values (a Reshape fed by Shape -> Gather -> Concat) are resolved by evaluating
    small integer subgraphs on the fly, as ONNX's data propagation does; nothing is rewritten.

    Requires: topologically-sorted. Establishes: shapes-inferred.
    Options: `max-propagated-elements` (default 4096): largest value propagated through inference.

    Example: `%1 = "onnx.Relu"(%0)` with `%0 : tensor<1x8xf32>` gets `: tensor<1x8xf32>`.
    """

    name = "infer-shapes"
    requires = frozenset({TOPO_SORTED})
    establishes = frozenset({SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED})

    max_propagated_elements: int = 4096

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        known: dict[int, np.ndarray] = {}
        changed = 0
        for node in module.graph.nodes:
            types = infer_node(node, known)
            for value, new_type in zip(node.outputs, types):
                if value.type != new_type:
                    value.type = new_type
                    changed += 1
            self._propagate(node, known)
        return PassResult(changed > 0, {"values-typed": changed})

    def _propagate(self, node, known) -> None:
        """Record the node's output values when they are cheap to compute from compile-time inputs."""
        opdef = opdef_of(node)
        if not opdef.foldable or any(v.type.size > self.max_propagated_elements for v in node.outputs):
            return
        arrays = compile_time_inputs(node, known)
        if arrays is None:
            return
        if any(a is not None and a.size > self.max_propagated_elements and not opdef.shape_only for a in arrays):
            return
        for value, array in zip(node.outputs, evaluate_node(node, arrays)):
            known[value._id] = array
