"""A builder that appends (or inserts) nodes into a graph with fresh, unique value names.

Types of new values are left unset: run the infer-shapes pass (or `edgecc.ops.apply.infer_node`) after
building, since the IR layer knows nothing of op semantics.
"""

from __future__ import annotations

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType


class Builder:
    """`b = Builder(graph); x = b.input("x", DType.float32, (1, 8)); y = b.op("Relu", x); b.output(y, "y")`."""

    def __init__(self, graph: Graph | None = None, *, before: Node | None = None):
        self.graph = graph if graph is not None else Graph("main")
        self.before = before
        self._count = 0

    def input(self, name: str, dtype: DType, shape) -> Value:
        return self.graph.add_input(name, TensorType(dtype, tuple(shape)))

    def constant(self, array, name: str = "const") -> Value:
        return self.graph.constant(np.asarray(array), name)

    def op(self, op_type: str, *inputs: Value | None, num_outputs: int = 1, name: str = "", domain: str = "",
           **attrs) -> Value | list[Value]:
        """Add `op_type(inputs)` with attributes; returns its output (or outputs when num_outputs > 1)."""
        self._count += 1
        node_name = name or self.graph.unique_name(f"{op_type}_{self._count}")
        outputs = [Value(self.graph.unique_name(f"{node_name}_out{i}" if num_outputs > 1 else node_name))
                   for i in range(num_outputs)]
        self.graph.add_node(Node(op_type, inputs, outputs, attrs, name=node_name, domain=domain), before=self.before)
        return outputs[0] if num_outputs == 1 else outputs

    def output(self, value: Value, name: str | None = None) -> None:
        self.graph.add_output(value, name)

    def module(self, opset: int = 18, name: str = "model") -> Module:
        return Module(self.graph, opset, name=name)
