"""The in-memory IR: Values flow between Nodes inside a Graph, which a Module wraps with its opset.

Use lists are kept exact by construction (every input change goes through `Node.set_input`), so passes can
ask "who reads this value?" without scanning the graph.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import networkx as nx
import numpy as np

from edgecc.ir.types import TensorType

_ids = itertools.count()


class Value:
    """An SSA value: a graph input, a node output, or a constant (`const` holds its array)."""

    __slots__ = ("name", "type", "producer", "uses", "const", "_id")

    def __init__(self, name: str, type: TensorType | None = None, const: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.uses: list[tuple[Node, int]] = []
        self.const = None
        self._id = next(_ids)
        if const is not None:
            self.set_const(const)

    def set_const(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        self.const = array
        self.type = TensorType.of(array)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def users(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.type})"


class Node:
    """One op application. `op` is the ONNX op type, `domain` '' for ai.onnx; missing optional inputs are None."""

    __slots__ = ("op", "domain", "inputs", "outputs", "attrs", "name", "_id")

    def __init__(self, op: str, inputs: Iterable[Value | None] = (), outputs: Iterable[Value] = (),
                 attrs: dict[str, Any] | None = None, name: str = "", domain: str = ""):
        self.op = op
        self.domain = domain
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.name = name
        self._id = next(_ids)
        for value in inputs:
            self.append_input(value)
        for value in outputs:
            self.append_output(value)

    def append_input(self, value: Value | None) -> None:
        self.inputs.append(value)
        if value is not None:
            value.uses.append((self, len(self.inputs) - 1))

    def set_input(self, index: int, value: Value | None) -> None:
        old = self.inputs[index]
        if old is not None:
            old.uses.remove((self, index))
        self.inputs[index] = value
        if value is not None:
            value.uses.append((self, index))

    def set_inputs(self, values: Iterable[Value | None]) -> None:
        self.drop_inputs()
        for value in values:
            self.append_input(value)

    def drop_inputs(self) -> None:
        for index, value in enumerate(self.inputs):
            if value is not None:
                value.uses.remove((self, index))
        self.inputs = []

    def append_output(self, value: Value) -> None:
        value.producer = self
        self.outputs.append(value)

    def input(self, index: int) -> Value | None:
        return self.inputs[index] if index < len(self.inputs) else None

    @property
    def label(self) -> str:
        """How errors name this node: `node 'conv1' (Conv)`."""
        return f"node '{self.name}' ({self.op})" if self.name else f"node ({self.op})"

    def __repr__(self) -> str:
        return f"Node({self.op}, name={self.name!r})"


class Graph:
    """Nodes in topological order, with the graph's input and output values."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.output_names: list[str] = []  # the names users see; values may be renamed or replaced by passes
        self.nodes: list[Node] = []
        self._names: set[str] = set()

    # -- construction ---------------------------------------------------------------------------
    def unique_name(self, hint: str) -> str:
        hint = hint or "v"
        if hint not in self._names:
            self._names.add(hint)
            return hint
        for i in itertools.count(1):
            candidate = f"{hint}_{i}"
            if candidate not in self._names:
                self._names.add(candidate)
                return candidate
        raise AssertionError("unreachable")

    def reserve_names(self, names: Iterable[str]) -> None:
        self._names.update(names)

    def add_input(self, name: str, type: TensorType) -> Value:
        value = Value(self.unique_name(name), type)
        self.inputs.append(value)
        return value

    def constant(self, array: np.ndarray, name: str = "const") -> Value:
        return Value(self.unique_name(name), const=np.asarray(array))

    def add_node(self, node: Node, before: Node | None = None) -> Node:
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def remove_node(self, node: Node) -> None:
        node.drop_inputs()
        self.nodes.remove(node)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every reader of `old` (nodes and graph outputs) at `new`."""
        for node, index in list(old.uses):
            node.set_input(index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    # -- queries --------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        """Every value once: inputs, constants read by nodes, node outputs."""
        seen: set[int] = set()
        for value in self.inputs:
            seen.add(value._id)
            yield value
        for node in self.nodes:
            for value in list(node.inputs) + node.outputs:
                if value is not None and value._id not in seen:
                    seen.add(value._id)
                    yield value
        for value in self.outputs:
            if value._id not in seen:
                seen.add(value._id)
                yield value

    def constants(self) -> list[Value]:
        return [v for v in self.values() if v.is_const]

    def add_output(self, value: Value, name: str | None = None) -> None:
        self.outputs.append(value)
        self.output_names.append(name or value.name)

    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def dependency_graph(self) -> nx.DiGraph:
        """A networkx DiGraph of node-to-node data edges (nodes keyed by position)."""
        graph = nx.DiGraph()
        index_of = {id(n): i for i, n in enumerate(self.nodes)}
        graph.add_nodes_from(range(len(self.nodes)))
        for i, node in enumerate(self.nodes):
            for value in node.inputs:
                if value is not None and value.producer is not None and id(value.producer) in index_of:
                    graph.add_edge(index_of[id(value.producer)], i)
        return graph

    def topological_sort(self) -> None:
        """Reorder nodes so producers come first; stable (keeps the current order where it is free)."""
        dep = self.dependency_graph()
        order = list(nx.lexicographical_topological_sort(dep))
        self.nodes = [self.nodes[i] for i in order]


class Module:
    """A model: one graph, the ONNX opset it was written for, and free-form metadata."""

    def __init__(self, graph: Graph, opset: int, name: str = "model", metadata: dict[str, str] | None = None):
        self.graph = graph
        self.opset = opset
        self.name = name
        self.metadata: dict[str, str] = dict(metadata or {})
        self.memory_plan = None  # set by the plan-memory pass (edgecc.passes.plan_memory.MemoryPlan)

    def clone(self) -> "Module":
        """An independent copy of the graph (same names and types; constant arrays are shared, never written in
        place). Iterative, so deep graphs do not hit Python's recursion limit as copy.deepcopy does."""
        old = self.graph
        graph = Graph(old.name)
        graph._names = set(old._names)
        mapped: dict[int, Value] = {}

        def value(v: Value | None) -> Value | None:
            if v is None:
                return None
            if v._id not in mapped:
                copy = Value(v.name, v.type)
                copy.const = v.const
                mapped[v._id] = copy
            return mapped[v._id]

        graph.inputs = [value(v) for v in old.inputs]
        for node in old.nodes:
            graph.nodes.append(Node(node.op, [value(v) for v in node.inputs], [value(v) for v in node.outputs],
                                    dict(node.attrs), node.name, node.domain))
        graph.outputs = [value(v) for v in old.outputs]
        graph.output_names = list(old.output_names)
        return Module(graph, self.opset, self.name, self.metadata)
