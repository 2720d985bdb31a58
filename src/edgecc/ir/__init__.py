"""edgecc's graph IR: types, values, nodes, graphs, modules, builder, verifier, textual form."""

from edgecc.ir.builder import Builder
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ir.types import QuantParams, SparseEncoding, TensorType

__all__ = ["Builder", "DType", "Graph", "Module", "Node", "QuantParams", "SparseEncoding", "TensorType", "Value"]
