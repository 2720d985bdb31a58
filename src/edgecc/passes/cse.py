"""cse: merge identical constants and identical nodes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Module, Value
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass


def _freeze(value):
    """A hashable, exact key for an attribute value."""
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return ("list", tuple(_freeze(v) for v in value))
    if isinstance(value, float):
        return ("float", np.float64(value).tobytes())
    return (type(value).__name__, value)


def _const_key(value: Value):
    array = value.const
    return (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionEliminationPass(Pass):
    """Give identical computations one value: equal constants (same dtype, shape and bytes) merge, then
    nodes with the same op, attributes and inputs merge (commutative ops match with inputs in any order).

    Requires: topologically-sorted. Keeps every property.

    Example: two `"onnx.Relu"(%0)` nodes become one, and both readers use its result.
    """

    name = "cse"
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        merged_consts = 0
        canonical: dict = {}
        for value in graph.constants():
            key = _const_key(value)
            first = canonical.setdefault(key, value)
            if first is not value and value.uses:
                graph.replace_all_uses(value, first)
                merged_consts += 1
        merged_nodes = 0
        seen: dict = {}
        for node in list(graph.nodes):
            from edgecc.ops import get

            opdef = get(node.op, node.domain)
            inputs = tuple(None if v is None else v._id for v in node.inputs)
            if opdef is not None and opdef.commutative:
                inputs = tuple(sorted(inputs, key=lambda i: (i is None, i)))
            key = (node.domain, node.op, inputs, len(node.outputs),
                   tuple(sorted((k, _freeze(v)) for k, v in node.attrs.items())))
            twin = seen.get(key)
            if twin is None:
                seen[key] = node
                continue
            for mine, theirs in zip(node.outputs, twin.outputs):
                graph.replace_all_uses(mine, theirs)
            graph.remove_node(node)
            merged_nodes += 1
        return PassResult(merged_consts + merged_nodes > 0,
                          {"constants-merged": merged_consts, "nodes-merged": merged_nodes})
