"""Conversion of ONNX attributes to and from the plain Python values the IR stores."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import AttributeProto, helper, numpy_helper

from edgecc.errors import OpAttributeError


def attribute_to_python(attr: AttributeProto, where: str = "") -> Any:
    """int, float, str, list[int], list[float], list[str] or np.ndarray (tensor attributes)."""
    kind = attr.type
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.FLOAT:
        return float(np.float32(attr.f))
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8")
    if kind == AttributeProto.INTS:
        return [int(v) for v in attr.ints]
    if kind == AttributeProto.FLOATS:
        return [float(np.float32(v)) for v in attr.floats]
    if kind == AttributeProto.STRINGS:
        return [s.decode("utf-8") for s in attr.strings]
    if kind == AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t).copy()
    raise OpAttributeError(f"attribute '{attr.name}' has a type edgecc does not support "
                           f"({AttributeProto.AttributeType.Name(kind)})", where=where)


def python_to_attribute(name: str, value: Any, kind: str | None = None) -> AttributeProto:
    """Inverse of attribute_to_python; `kind` (from the op schema) settles empty lists and int/float."""
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if kind == "float":
        return helper.make_attribute(name, float(value))
    if kind == "floats":
        return helper.make_attribute(name, [float(v) for v in value], attr_type=AttributeProto.FLOATS)
    if kind == "ints":
        return helper.make_attribute(name, [int(v) for v in value], attr_type=AttributeProto.INTS)
    if kind == "strings":
        return helper.make_attribute(name, list(value), attr_type=AttributeProto.STRINGS)
    return helper.make_attribute(name, value)
