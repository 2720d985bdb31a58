"""Run one ONNX node through the registry alone (no front end, no passes): for op tests and op authors."""

from __future__ import annotations

import numpy as np
import onnx

from edgecc.frontend.attributes import attribute_to_python
from edgecc.ir.types import TensorType
from edgecc.ops import get
from edgecc.ops.registry import Call


def run_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], num_outputs: int | None = None,
             constant_inputs: bool = False):
    """Infer and evaluate `node` on `inputs` (None = omitted optional input).

    Returns (outputs, inferred_types). With `constant_inputs`, inference sees the inputs' values, as it
    does for constants in a graph (needed by Reshape, Slice, ... whose output shape depends on them).
    """
    opdef = get(node.op_type, node.domain)
    if opdef is None:
        raise KeyError(f"op {node.op_type} is not registered")
    given = {a.name: attribute_to_python(a) for a in node.attribute}
    attrs = opdef.complete_attrs(given, where=node.name)
    # Trailing empty names are omitted inputs; interior empty names are None.
    arrays = [None if name == "" else x for name, x in zip(node.input, inputs)]
    n_out = num_outputs if num_outputs is not None else len(node.output)
    types = [None if a is None else TensorType.of(np.asarray(a)) for a in arrays]
    values = [a if constant_inputs else None for a in arrays]
    inferred = opdef.run_infer(Call(node.op_type, types, attrs, n_out, values=values, where=node.name))
    outputs = opdef.run_reference(Call(node.op_type, arrays, attrs, n_out, where=node.name))
    return outputs, inferred
