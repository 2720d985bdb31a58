"""Rewrite rules and the one worklist driver that applies them.

A rule names the ops its pattern is rooted at, a `check` that returns None when the rule applies (or a
reason it does not, shown by --debug-rewrites), and a `rewrite` that edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgecc.ir.core import Graph, Node, Value
from edgecc.ops.apply import infer_node
from edgecc.passes.base import PassContext


class RewriteRule:
    name: str = ""
    roots: tuple[str, ...] = ()

    def check(self, node: Node, graph: Graph) -> str | None:
        """None if the rule applies to `node`, else why not."""
        raise NotImplementedError

    def rewrite(self, node: Node, graph: Graph) -> None:
        raise NotImplementedError


def apply_rules(graph: Graph, rules: Sequence[RewriteRule], ctx: PassContext, max_rounds: int = 20) -> dict[str, int]:
    """Apply rules until none fires (or max_rounds); returns how often each rule fired."""
    fired: dict[str, int] = {}
    by_op: dict[str, list[RewriteRule]] = {}
    for rule in rules:
        for root in rule.roots:
            by_op.setdefault(root, []).append(rule)
    for _ in range(max_rounds):
        changed = False
        alive = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if id(node) not in alive:
                continue
            for rule in by_op.get(node.op, ()):
                reason = rule.check(node, graph)
                if reason is not None:
                    if ctx.debug_rewrites:
                        ctx.debug(f"[{rule.name}] {node.label}: not applied: {reason}")
                    continue
                rule.rewrite(node, graph)
                if ctx.debug_rewrites:
                    ctx.debug(f"[{rule.name}] {node.label}: rewritten")
                fired[rule.name] = fired.get(rule.name, 0) + 1
                changed = True
                alive = {id(n) for n in graph.nodes}
                break
        if not changed:
            break
    return fired


# -- small graph-editing helpers shared by rules ---------------------------------------------------------

def forward(graph: Graph, node: Node, output_index: int, replacement: Value) -> None:
    """Make every reader of node.outputs[output_index] read `replacement` instead."""
    graph.replace_all_uses(node.outputs[output_index], replacement)


def remove_if_dead(graph: Graph, node: Node) -> None:
    if all(not v.uses and not graph.is_output(v) for v in node.outputs):
        graph.remove_node(node)


def replace_with_new_node(graph: Graph, old: Node, op: str, inputs: list[Value | None], attrs: dict,
                          name_suffix: str = "") -> Node:
    """Insert `op(inputs)` before `old`, give it old's output type, forward old's uses to it, drop old."""
    out = Value(graph.unique_name(old.outputs[0].name), old.outputs[0].type)
    new = Node(op, inputs, [out], attrs, name=(old.name + name_suffix) if old.name else op)
    graph.add_node(new, before=old)
    if old.outputs[0].type is not None:
        out.type = infer_node(new)[0]
    forward(graph, old, 0, out)
    remove_if_dead(graph, old)
    return new


def const_of(value: Value | None) -> np.ndarray | None:
    return value.const if value is not None and value.is_const else None


def single_reader(graph: Graph, value: Value) -> bool:
    return len(value.uses) == 1 and not graph.is_output(value)
