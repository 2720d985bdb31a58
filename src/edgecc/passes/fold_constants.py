"""fold-constants: evaluate nodes whose inputs are all known at compile time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Module, Value
from edgecc.ops.apply import compile_time_inputs, evaluate_node, opdef_of
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class FoldConstantsPass(Pass):
    """Replace every foldable node whose inputs are constants by the constants it computes.

    Evaluation goes through the op registry's NumPy references, so any op folds the same way it runs.
    Shape and Size fold from static shapes alone, so Shape -> Gather -> Concat -> Reshape chains, and
    Reshape/Unsqueeze chains on weights, collapse to constants.

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    Options: `max-elements` (default 16777216): results larger than this stay as nodes (to bound the size of
    the model when a small constant expands to a big one).

    Example: `%1 = "onnx.Shape"(%x : tensor<1x3xf32>)` becomes `const dense<[1, 3]> : tensor<2xi64>`.
    """

    name = "fold-constants"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    max_elements: int = 1 << 24

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        folded = 0
        for node in list(graph.nodes):
            opdef = opdef_of(node)
            if not opdef.foldable:
                continue
            if any(v.type is None or v.type.size > self.max_elements for v in node.outputs):
                continue
            arrays = compile_time_inputs(node)
            if arrays is None:
                continue
            for old, array in zip(node.outputs, evaluate_node(node, arrays)):
                graph.replace_all_uses(old, Value(graph.unique_name(old.name), const=np.array(array, order="C")))
            graph.remove_node(node)
            folded += 1
        return PassResult(folded > 0, {"nodes-folded": folded})
