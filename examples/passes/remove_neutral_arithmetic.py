"""A custom edgecc pass, loaded with `--load-pass-plugin examples/passes/remove_neutral_arithmetic.py`.

`remove-neutral-arithmetic` deletes `x + 0`, `x - 0`, `x * 1` and `x / 1` where the constant is all zeros
(or ones) and does not broadcast x to a bigger shape. Exported models are full of these (scaled residuals
with scale 1, zero biases). The result is bit-exact, except that `x + 0` would turn -0.0 into +0.0, which
the rule preserves by only removing `+ 0` when the `allow-signed-zero` option is set.

docs/writing-a-pass.md walks through this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir import Module
from edgecc.passes import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult, RewriteRule, apply_rules, register_pass
from edgecc.passes.rewrite import const_of, forward, remove_if_dead

NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}


class RemoveNeutralOperand(RewriteRule):
    name = "remove-neutral-operand"
    roots = tuple(NEUTRAL)

    def __init__(self, allow_signed_zero: bool):
        self.allow_signed_zero = allow_signed_zero

    def check(self, node, graph):
        constant = const_of(node.inputs[1])
        if constant is None:
            return "the second operand is not a constant"
        if not np.all(constant == NEUTRAL[node.op]):
            return f"the constant is not all {NEUTRAL[node.op]}"
        if node.outputs[0].type != node.inputs[0].type:
            return "the constant broadcasts x to a new shape or dtype"
        if node.op == "Add" and not self.allow_signed_zero:
            return "x + 0 maps -0.0 to +0.0; set allow-signed-zero to remove it anyway"
        return None

    def rewrite(self, node, graph):
        forward(graph, node, 0, node.inputs[0])
        remove_if_dead(graph, node)


@register_pass
@dataclass(frozen=True)
class RemoveNeutralArithmeticPass(Pass):
    """Remove x+0, x-0, x*1 and x/1 with constant operands that do not broadcast.

    Requires: topologically-sorted, shapes-inferred. Keeps both.
    Options: `allow-signed-zero` (default false): also remove x + 0, which turns -0.0 into +0.0.

    Example: `%1 = "onnx.Mul"(%x, @one)` disappears and readers of %1 read %x.
    """

    name = "remove-neutral-arithmetic"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    allow_signed_zero: bool = False

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        fired = apply_rules(module.graph, [RemoveNeutralOperand(self.allow_signed_zero)], ctx)
        return PassResult(bool(fired), {"ops-removed": sum(fired.values())})
