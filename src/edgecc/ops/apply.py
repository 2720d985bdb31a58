"""Apply registry entries to IR nodes: type inference and reference evaluation of one node."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from edgecc.errors import EdgeccError, ShapeError, UnsupportedOpError
from edgecc.ir.core import Node, Value
from edgecc.ir.types import TensorType
from edgecc.ops.registry import Call, OpDef, get


def opdef_of(node: Node) -> OpDef:
    opdef = get(node.op, node.domain)
    if opdef is None:
        raise UnsupportedOpError(f"op {node.op} is not supported", where=node.label)
    return opdef


def infer_node(node: Node, known: Mapping[int, np.ndarray] | None = None, where: str = "") -> list[TensorType]:
    """Output types of `node` from its input types (and compile-time values: constants or `known`)."""
    opdef = opdef_of(node)
    label = f"{where}: {node.label}" if where else node.label
    types, values = [], []
    for value in node.inputs:
        if value is None:
            types.append(None)
            values.append(None)
            continue
        if value.type is None:
            raise ShapeError(f"input '{value.name}' has no type yet", where=label,
                             hint="run infer-shapes first")
        types.append(value.type)
        values.append(value.const if value.is_const else (known or {}).get(value._id))
    opdef.check_arity(len(node.inputs), len(node.outputs), where=label)
    attrs = opdef.complete_attrs(node.attrs, where=label)
    call = Call(node.op, types, attrs, len(node.outputs), values=values, where=label)
    try:
        result = opdef.run_infer(call)
    except EdgeccError:
        raise
    except Exception as exc:  # a bug or an unchecked corner in an op's inference: still name the node
        raise ShapeError(f"shape inference failed: {type(exc).__name__}: {exc}", where=label) from exc
    if len(result) < len(node.outputs):
        raise ShapeError(f"inference gave {len(result)} outputs, the node has {len(node.outputs)}", where=label)
    return result


def evaluate_node(node: Node, arrays: list[np.ndarray | None], where: str = "") -> list[np.ndarray]:
    """Run the op's NumPy reference on concrete inputs."""
    opdef = opdef_of(node)
    label = f"{where}: {node.label}" if where else node.label
    attrs = opdef.complete_attrs(node.attrs, where=label)
    call = Call(node.op, list(arrays), attrs, len(node.outputs), where=label)
    return opdef.run_reference(call)


def compile_time_inputs(node: Node, known: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray | None] | None:
    """The node's inputs as arrays if all are known at compile time (constants, `known` values, or, for
    ops that read only shapes, a zero-strided stand-in of the right shape); None if any is not."""
    shape_only = opdef_of(node).shape_only
    arrays: list[np.ndarray | None] = []
    for value in node.inputs:
        if value is None:
            arrays.append(None)
        elif value.is_const:
            arrays.append(value.const)
        elif known is not None and value._id in known:
            arrays.append(known[value._id])
        elif shape_only and value.type is not None:
            arrays.append(np.broadcast_to(np.zeros((), value.type.dtype.numpy), value.type.shape))
        else:
            return None
    return arrays
