"""canonicalize: remove ops that do nothing and put the rest in one preferred form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass
from edgecc.passes.rewrite import RewriteRule, apply_rules, const_of, forward, remove_if_dead, replace_with_new_node

RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


class ForwardInputRule(RewriteRule):
    """Base of rules that delete a node by letting its readers read its first input instead."""

    def rewrite(self, node, graph):
        forward(graph, node, 0, node.inputs[0])
        remove_if_dead(graph, node)


class RemoveIdentity(ForwardInputRule):
    name, roots = "remove-identity", ("Identity",)

    def check(self, node, graph):
        return None


class RemoveInferenceDropout(ForwardInputRule):
    """Dropout in inference mode is the identity; its mask (all true) must be unused."""

    name, roots = "remove-inference-dropout", ("Dropout",)

    def check(self, node, graph):
        training = node.input(2)
        if training is not None and (const_of(training) is None or bool(const_of(training))):
            return "training_mode is not a constant false"
        if len(node.outputs) > 1 and (node.outputs[1].uses or graph.is_output(node.outputs[1])):
            return "the mask output is used"
        return None


class RemoveNoopReshape(ForwardInputRule):
    """Reshape/Flatten/Squeeze/Unsqueeze/Expand whose output shape equals its input shape."""

    name, roots = "remove-noop-reshape", RESHAPE_LIKE + ("Expand",)

    def check(self, node, graph):
        src, dst = node.inputs[0].type, node.outputs[0].type
        if src is None or dst is None or src != dst:
            return "the shape changes"
        return None


class MergeReshapes(RewriteRule):
    """A reshape-like op of a reshape-like op becomes one Reshape of the original tensor."""

    name, roots = "merge-reshapes", RESHAPE_LIKE

    def check(self, node, graph):
        producer = node.inputs[0].producer
        if producer is None or producer.op not in RESHAPE_LIKE:
            return "the input is not produced by a reshape-like op"
        if node.outputs[0].type is None:
            return "the output shape is unknown"
        return None

    def rewrite(self, node, graph):
        source = node.inputs[0].producer.inputs[0]
        shape = graph.constant(np.array(node.outputs[0].type.shape, dtype=np.int64), "shape")
        replace_with_new_node(graph, node, "Reshape", [source, shape], {})


class RemoveNoopTranspose(ForwardInputRule):
    name, roots = "remove-noop-transpose", ("Transpose",)

    def check(self, node, graph):
        rank = node.inputs[0].type.rank
        perm = node.attrs.get("perm", list(reversed(range(rank))))
        return None if list(perm) == list(range(rank)) else "the permutation is not the identity"


class MergeTransposes(RewriteRule):
    name, roots = "merge-transposes", ("Transpose",)

    def check(self, node, graph):
        producer = node.inputs[0].producer
        return None if producer is not None and producer.op == "Transpose" else "the input is not a Transpose"

    def rewrite(self, node, graph):
        inner = node.inputs[0].producer
        rank = node.inputs[0].type.rank
        p1 = inner.attrs.get("perm", list(reversed(range(rank))))
        p2 = node.attrs.get("perm", list(reversed(range(rank))))
        replace_with_new_node(graph, node, "Transpose", [inner.inputs[0]], {"perm": [int(p1[i]) for i in p2]})


class RemoveNoopCast(ForwardInputRule):
    name, roots = "remove-noop-cast", ("Cast",)

    def check(self, node, graph):
        if node.inputs[0].type != node.outputs[0].type:
            return "the dtype changes"
        return None


def float_constant_operand(node, role: str) -> str | None:
    """Why input 1 of a binary op cannot be rewritten as a constant of the other arithmetic op (None if it can):
    it must be a float constant that does not broadcast input 0 to a new shape."""
    c = const_of(node.inputs[1])
    if c is None or not np.issubdtype(c.dtype, np.floating):
        return f"the {role} is not a float constant"
    if node.outputs[0].type != node.inputs[0].type:
        return "the constant broadcasts the result to a new shape"
    return None


class SubConstantToAdd(RewriteRule):
    """x - c  ->  x + (-c) for float constants c: negation is exact, and Add is the form fusion matches."""

    name, roots = "sub-constant-to-add", ("Sub",)

    def check(self, node, graph):
        return float_constant_operand(node, "subtrahend")

    def rewrite(self, node, graph):
        negated = graph.constant(-node.inputs[1].const, "neg")
        replace_with_new_node(graph, node, "Add", [node.inputs[0], negated], {})


class DivConstantToMul(RewriteRule):
    """x / c  ->  x * (1/c) when every c is a power of two, where the reciprocal (and so the result) is exact."""

    name, roots = "div-constant-to-mul", ("Div",)

    def check(self, node, graph):
        reason = float_constant_operand(node, "divisor")
        if reason is not None:
            return reason
        c = node.inputs[1].const
        with np.errstate(all="ignore"):
            mantissa, _ = np.frexp(c.astype(np.float64))
            reciprocal = (1.0 / c).astype(c.dtype)
        if not (np.all(np.abs(mantissa) == 0.5) and np.all(np.isfinite(reciprocal))
                and np.all(np.abs(reciprocal) >= np.finfo(c.dtype).tiny)):
            return "the divisor is not a power of two with a normal reciprocal (the rewrite would round)"
        return None

    def rewrite(self, node, graph):
        c = node.inputs[1].const
        reciprocal = graph.constant((1.0 / c).astype(c.dtype), "recip")
        replace_with_new_node(graph, node, "Mul", [node.inputs[0], reciprocal], {})


class FoldPadIntoConv(RewriteRule):
    """Conv of a zero constant-mode Pad of its input (spatial axes only, no cropping) becomes one Conv with the
    padding added to its own pads: the kernel pads with zeros on the fly, without the padded copy."""

    name, roots = "fold-pad-into-conv", ("Conv",)

    @staticmethod
    def _spatial_pads(pad: Node, rank: int) -> list[int] | None:
        """Begin and end pads of the spatial axes, or None if the Pad is not a foldable zero pad."""
        if pad.attrs.get("mode", "constant") != "constant":
            return None
        pads, value, axes = const_of(pad.input(1)), pad.input(2), pad.input(3)
        if pads is None or (value is not None and (const_of(value) is None or np.any(const_of(value) != 0))):
            return None
        axes = list(range(rank)) if axes is None else const_of(axes)
        if axes is None:
            return None
        axes = [int(a) % rank for a in np.reshape(axes, -1)]
        full = [0] * (2 * rank)
        for k, axis in enumerate(axes):
            full[axis], full[rank + axis] = int(pads[k]), int(pads[len(axes) + k])
        if any(full[a] or full[rank + a] for a in (0, 1)) or min(full) < 0:
            return None
        return full[2:rank] + full[rank + 2:]

    def check(self, node, graph):
        pad = node.inputs[0].producer
        if pad is None or pad.op != "Pad" or len(node.inputs[0].uses) != 1 or graph.is_output(node.inputs[0]):
            return "the input is not a Pad read only by this Conv"
        if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad is set"
        if pad.inputs[0].type is None or self._spatial_pads(pad, pad.inputs[0].type.rank) is None:
            return "the Pad is not a zero constant pad of spatial axes"
        return None

    def rewrite(self, node, graph):
        pad = node.inputs[0].producer
        rank = pad.inputs[0].type.rank
        extra = self._spatial_pads(pad, rank)
        own = list(node.attrs.get("pads") or [0] * len(extra))
        node.attrs = dict(node.attrs, pads=[a + b for a, b in zip(own, extra)])
        node.set_input(0, pad.inputs[0])
        remove_if_dead(graph, pad)


CANONICALIZATION_RULES: list[RewriteRule] = [
    RemoveIdentity(), RemoveInferenceDropout(), RemoveNoopReshape(), MergeReshapes(), RemoveNoopTranspose(),
    MergeTransposes(), RemoveNoopCast(), SubConstantToAdd(), DivConstantToMul(), FoldPadIntoConv(),
]


@register_pass
@dataclass(frozen=True)
class CanonicalizePass(Pass):
    """Remove no-op ops and rewrite the rest into one preferred form, so later passes match fewer shapes.

    Rules: Identity and inference-mode Dropout vanish; Reshape/Flatten/Squeeze/Unsqueeze/Expand that keep
    the shape vanish and chains of them become one Reshape; identity Transposes vanish and chains compose;
    Cast to the same dtype vanishes; Sub by a float constant becomes Add of its negation; Div by a power-of-two
    constant becomes Mul by its (exact) reciprocal; a zero Pad of a Conv's spatial axes becomes the Conv's own
    padding. Every rule keeps results bit-exact.

    Requires: topologically-sorted, shapes-inferred. Keeps both.

    Example: `%1 = "onnx.Identity"(%0)  %2 = "onnx.Relu"(%1)` becomes `%1 = "onnx.Relu"(%0)`.
    """

    name = "canonicalize"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        fired = apply_rules(module.graph, CANONICALIZATION_RULES, ctx)
        return PassResult(bool(fired), fired)
