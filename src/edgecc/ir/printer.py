"""Deterministic printer of the textual IR: renumbered values, sorted attributes, exact floats.

`print(parse(text)) == text` for any text this printer produced.
"""

from __future__ import annotations

import json
import re

import numpy as np

from edgecc.ir.core import Module, Value
from edgecc.ir.types import TensorType

INLINE_LIMIT = 16
"""Constants with at most this many elements print as decimal lists; larger ones as hex (or a side file)."""

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_KEYWORDS = {"none", "true", "false", "inf", "nan", "as", "loc", "const", "graph", "module", "return", "dense",
             "dense_hex", "external", "dense_elided", "tensor"}


def _name(text: str) -> str:
    return text if _IDENT.match(text) and text not in _KEYWORDS else json.dumps(text)


def format_scalar(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    value = float(x)
    if np.isnan(value):
        return "nan"
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def format_literal(array: np.ndarray, mode: str = "inline", key: str | None = None) -> str:
    """`dense<[...]>` for small tensors; large ones by `mode`: inline hex, elided, or an external key."""
    array = np.asarray(array)
    if array.size <= INLINE_LIMIT:
        return "dense<[" + ", ".join(format_scalar(v) for v in array.reshape(-1).tolist()) + "]>"
    if mode == "elide":
        return "dense_elided"
    if mode == "external" and key is not None:
        return f"external<{json.dumps(key)}>"
    return f"dense_hex<\"{np.ascontiguousarray(array).astype(array.dtype.newbyteorder('<')).tobytes().hex()}\">"


def format_attr(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{format_literal(value)} : {TensorType.of(value)}"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return format_scalar(value)


def print_module(module: Module, large_constants: str = "inline", side_arrays: dict | None = None) -> str:
    """Print `module`. large_constants: "inline" (hex), "elide" (not parseable; for dumps) or "external"
    (arrays go into `side_arrays[key]`, to be saved next to the text)."""
    graph = module.graph
    names: dict[int, str] = {}
    const_names: dict[int, str] = {}
    lines = []
    for value in graph.inputs:
        names[value._id] = "%" + _name(value.name)
    counter = 0

    def ref(value: Value | None) -> str:
        if value is None:
            return "none"
        if value.is_const:
            return const_names[value._id]
        return names[value._id]

    constants: list[Value] = []
    for value in list(v for n in graph.nodes for v in n.inputs) + list(graph.outputs):
        if value is not None and value.is_const and value._id not in const_names:
            const_names[value._id] = f"@c{len(constants)}"
            constants.append(value)

    attrs = {"opset": module.opset}
    lines.append(f"module @{_name(module.name)} {{{', '.join(f'{k} = {format_attr(v)}' for k, v in attrs.items())}}} {{")
    for value in constants:
        key = const_names[value._id][1:]
        literal = format_literal(value.const, large_constants, key)
        if literal.startswith("external") and side_arrays is not None:
            side_arrays[key] = value.const
        lines.append(f"  {const_names[value._id]} = const {literal} : {value.type}")
    params = ", ".join(f"{names[v._id]} : {v.type}" for v in graph.inputs)
    lines.append(f"  graph @{_name(graph.name)}({params}) {{")
    for node in graph.nodes:
        results = []
        for value in node.outputs:
            names[value._id] = f"%{counter}"
            counter += 1
            results.append(names[value._id])
        text = "    "
        if results:
            text += ", ".join(results) + " = "
        text += f"\"{node.domain + '.' if node.domain else 'onnx.'}{node.op}\"(" + ", ".join(ref(v) for v in node.inputs) + ")"
        if node.attrs:
            text += " {" + ", ".join(f"{_name(k)} = {format_attr(node.attrs[k])}" for k in sorted(node.attrs)) + "}"
        if node.outputs:
            text += " : " + ", ".join(str(v.type) if v.type is not None else "?" for v in node.outputs)
        if node.name:
            text += f" loc({json.dumps(node.name)})"
        lines.append(text)
    outs = ", ".join(f"{ref(v)} as {json.dumps(n)}" for v, n in zip(graph.outputs, graph.output_names))
    lines.append(f"    return {outs}" if outs else "    return")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
