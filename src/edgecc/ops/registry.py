"""The op registry: every op edgecc knows, each described in one place.

An `OpDef` holds an op's schema (input/output arity, attributes with defaults), its shape/dtype inference,
its NumPy reference, whether constant folding may evaluate it, and its fusion kind. Passes read this
metadata instead of testing op names, so adding an op never touches a pass.

The IR uses each op in its newest form (opset 18 and later: axes, pads, splits, scales as inputs); the
front end lifts older models to that form with onnx's version converter before import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from edgecc.errors import OpAttributeError, ShapeError
from edgecc.ir.types import TensorType

FP16_POLICIES = ("fp16", "fp32")
"""An op's fp16_policy: "fp16" runs in half precision under convert-fp16{compute=fp16}; "fp32" keeps float32 for
ops whose accuracy needs it: long sums (ReduceSum/Mean/L1/L2/..., GlobalAveragePool, CumSum), normalisations
(Softmax, LogSoftmax, Batch/Instance/LayerNormalization, LRN) and Exp, whose results pass half's largest value
(65504) from x = 11.1 on. Convolutions and matrix products stay "fp16": their sums are products of weights and
activations of one layer, rounded once per output (the kernels accumulate in float32 where the target has no
half arithmetic)."""

REQUIRED = object()
"""Marks an attribute with no default: the node must set it."""

ATTR_KINDS = ("int", "float", "string", "ints", "floats", "strings", "tensor")


@dataclass(frozen=True)
class AttrSpec:
    """An attribute: its kind, its default (None = optional and absent, REQUIRED = must be given)."""

    kind: str
    default: Any = None

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}")


@dataclass
class Call:
    """One application of an op, as seen by inference (`inputs` are TensorTypes) or by the reference
    (`inputs` are arrays). `values` holds inputs whose value is known at compile time (constants)."""

    op: str
    inputs: list
    attrs: dict[str, Any]
    num_outputs: int = 1
    values: list = field(default_factory=list)
    where: str = ""

    def value(self, index: int):
        """The compile-time value of input `index`, or None if it is only known at run time."""
        if index < len(self.values):
            return self.values[index]
        return None

    def input(self, index: int):
        return self.inputs[index] if index < len(self.inputs) else None

    def fail(self, message: str, hint: str | None = None):
        raise ShapeError(message, hint=hint, where=self.where or f"op {self.op}")

    def bad_attr(self, message: str, hint: str | None = None):
        raise OpAttributeError(message, hint=hint, where=self.where or f"op {self.op}")


InferFn = Callable[[Call], Sequence[TensorType]]
ReferenceFn = Callable[[Call], Sequence[np.ndarray]]


@dataclass
class OpDef:
    """Everything edgecc knows about one op."""

    name: str
    infer: InferFn
    reference: ReferenceFn
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    inputs: tuple[int, int] = (1, 1)
    outputs: tuple[int, int] = (1, 1)
    foldable: bool = True
    kind: str = "opaque"
    commutative: bool = False
    shape_only: bool = False
    """The reference reads only its inputs' shapes (Shape, Size): foldable whenever the shapes are static."""
    aliases_input: bool = False
    """The output holds exactly input 0's bytes (Reshape and friends): the memory plan may give both one buffer."""
    fp16_policy: str = "fp16"
    """How convert-fp16{compute=fp16} runs the op: "fp16" (in half precision, like its inputs) or "fp32" (between
    casts to and from float32: the op sums many terms, normalises, or leaves half's range, see FP16_POLICIES)."""
    doc: str = ""
    domain: str = ""
    """'' for ONNX ops; EDGECC_DOMAIN for edgecc's own ops (fused forms that passes create)."""

    def complete_attrs(self, given: dict[str, Any], where: str = "") -> dict[str, Any]:
        """The node's attributes with defaults filled in; unknown or missing required ones are errors."""
        unknown = sorted(set(given) - set(self.attrs))
        if unknown:
            raise OpAttributeError(
                f"attribute(s) {', '.join(unknown)} not in the schema of {self.name}",
                hint=f"known attributes: {', '.join(sorted(self.attrs)) or 'none'}",
                where=where or f"op {self.name}",
            )
        full = {}
        for name, spec in self.attrs.items():
            if name in given:
                full[name] = given[name]
            elif spec.default is REQUIRED:
                raise OpAttributeError(f"required attribute '{name}' of {self.name} is missing",
                                       where=where or f"op {self.name}")
            elif spec.default is not None:
                full[name] = spec.default
        return full

    def check_arity(self, num_inputs: int, num_outputs: int, where: str = "") -> None:
        lo, hi = self.inputs
        if num_inputs < lo or (hi >= 0 and num_inputs > hi):
            raise OpAttributeError(f"{self.name} takes {_arity(self.inputs)} inputs, got {num_inputs}",
                                   where=where or f"op {self.name}")
        lo, hi = self.outputs
        if num_outputs < lo or (hi >= 0 and num_outputs > hi):
            raise OpAttributeError(f"{self.name} gives {_arity(self.outputs)} outputs, {num_outputs} requested",
                                   where=where or f"op {self.name}")

    def run_reference(self, call: Call) -> list[np.ndarray]:
        result = self.reference(call)
        if isinstance(result, np.ndarray):
            result = [result]
        return [np.asarray(r) for r in result][: call.num_outputs]

    def run_infer(self, call: Call) -> list[TensorType]:
        return list(self.infer(call))[: call.num_outputs]


def _arity(bounds: tuple[int, int]) -> str:
    lo, hi = bounds
    if hi < 0:
        return f"at least {lo}"
    return str(lo) if lo == hi else f"{lo} to {hi}"


EDGECC_DOMAIN = "edgecc"
"""The domain of edgecc's own ops: fused forms created by passes, never needed in a user's model."""

_REGISTRY: dict[tuple[str, str], OpDef] = {}


def _domain_key(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register(opdef: OpDef) -> OpDef:
    key = (_domain_key(opdef.domain), opdef.name)
    if key in _REGISTRY:
        raise ValueError(f"op {opdef.name} registered twice")
    _REGISTRY[key] = opdef
    return opdef


def op(name: str, *, infer: InferFn, attrs: dict[str, AttrSpec] | None = None, inputs=(1, 1), outputs=(1, 1),
       foldable: bool = True, kind: str = "opaque", commutative: bool = False, shape_only: bool = False,
       aliases_input: bool = False, domain: str = "", fp16_policy: str = "fp16"):
    """Decorator: register the decorated NumPy reference as op `name` (of `domain`, '' for ONNX)."""
    if fp16_policy not in FP16_POLICIES:
        raise ValueError(f"fp16_policy {fp16_policy!r} of {name} is not one of {', '.join(FP16_POLICIES)}")

    def wrap(reference: ReferenceFn) -> ReferenceFn:
        register(OpDef(name=name, infer=infer, reference=reference, attrs=dict(attrs or {}), inputs=tuple(inputs),
                       outputs=tuple(outputs), foldable=foldable, kind=kind, commutative=commutative, shape_only=shape_only,
                       aliases_input=aliases_input, doc=(reference.__doc__ or "").strip(), domain=domain,
                       fp16_policy=fp16_policy))
        return reference

    return wrap


def get(name: str, domain: str = "") -> OpDef | None:
    return _REGISTRY.get((_domain_key(domain), name))


def all_ops() -> dict[str, OpDef]:
    """The ONNX ops edgecc implements, by name."""
    return dict(sorted((name, d) for (domain, name), d in _REGISTRY.items() if not domain))


def internal_ops() -> dict[str, OpDef]:
    """edgecc's own ops (EDGECC_DOMAIN), by name."""
    return dict(sorted((name, d) for (domain, name), d in _REGISTRY.items() if domain == EDGECC_DOMAIN))
