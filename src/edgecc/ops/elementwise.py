"""Elementwise ops: unary math, activations, binary arithmetic, comparisons and logic."""

from __future__ import annotations

import numpy as np

from edgecc.ops.common import broadcast_same_dtype, unary_elementwise
from edgecc.ops.registry import Call, op


def _relu(x, attrs):
    """max(x, 0)."""
    return np.maximum(x, 0)


unary_elementwise("Relu", _relu)


@op("Add", infer=broadcast_same_dtype, inputs=(2, 2), kind="elementwise", commutative=True)
def add(call: Call):
    """A + B with multidirectional broadcasting; integers wrap like ONNX (two's complement)."""
    a, b = call.inputs
    return [np.add(a, b).astype(a.dtype, copy=False)]
