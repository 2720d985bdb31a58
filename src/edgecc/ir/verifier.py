"""Structural checks on a Module: the invariants every pass may rely on and must keep."""

from __future__ import annotations

from edgecc.errors import VerificationError
from edgecc.ir.core import Module


def verify(module: Module, *, require_types: bool = False, where: str = "") -> None:
    """Raise VerificationError naming the first broken invariant.

    Checks: nodes in topological order (so no cycles), every input defined before use, every value produced
    once, use lists consistent with inputs, graph outputs defined, sparse encodings only on constants, and
    (optionally) every value typed.
    """
    problems = problems_of(module, require_types=require_types)
    if problems:
        raise VerificationError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""),
                                where=where or f"module '{module.name}'")


def problems_of(module: Module, *, require_types: bool = False) -> list[str]:
    graph = module.graph
    problems: list[str] = []
    defined: set[int] = {v._id for v in graph.inputs}
    producers: dict[int, str] = {}
    for node in graph.nodes:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if not value.is_const and value._id not in defined:
                problems.append(f"{node.label} reads '{value.name}' before it is defined (cycle or bad order)")
            if (node, index) not in value.uses:
                problems.append(f"{node.label}: use list of '{value.name}' misses input {index}")
        for value in node.outputs:
            if value._id in producers:
                problems.append(f"value '{value.name}' is produced by both {producers[value._id]} and {node.label}")
            producers[value._id] = node.label
            if value.producer is not node:
                problems.append(f"value '{value.name}' does not record {node.label} as its producer")
            if require_types and value.type is None:
                problems.append(f"{node.label}: output '{value.name}' has no type")
            defined.add(value._id)
    for value in graph.values():
        if value.type is not None and value.type.sparse is not None and not value.is_const:
            problems.append(f"value '{value.name}' has a sparse encoding but is not a constant (only stored weights "
                            "are encoded)")
        for user, index in value.uses:
            if user.input(index) is not value:
                problems.append(f"use list of '{value.name}' names {user.label} input {index}, which reads another value")
    for name, value in zip(graph.output_names, graph.outputs):
        if not value.is_const and value._id not in defined:
            problems.append(f"graph output '{name}' is not defined")
    if len(graph.output_names) != len(graph.outputs):
        problems.append("graph output names and values differ in number")
    return problems
