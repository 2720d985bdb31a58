"""Pass, PassResult, PassContext and IR properties: the vocabulary every pass is written in.

A pass is a small frozen dataclass with a kebab-case `name`, its options as fields, and
`run(module, ctx) -> PassResult`. It declares the IR properties it requires, establishes and invalidates;
the manager keeps the bookkeeping and `--verify-each` runs each property's checker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from edgecc.ir.core import Module
from edgecc.ir.verifier import problems_of

# -- IR properties --------------------------------------------------------------------------------------
TOPO_SORTED = "topologically-sorted"
SHAPES_INFERRED = "shapes-inferred"
CONSTANTS_FOLDED = "constants-folded"
CANONICAL = "canonical"


def _check_sorted(module: Module) -> str | None:
    problems = problems_of(module)
    return problems[0] if problems else None


def _check_shapes(module: Module) -> str | None:
    for node in module.graph.nodes:
        for value in node.outputs:
            if value.type is None:
                return f"{node.label}: output '{value.name}' has no type"
    return None


PROPERTY_CHECKERS: dict[str, Callable[[Module], str | None]] = {
    TOPO_SORTED: _check_sorted,
    SHAPES_INFERRED: _check_shapes,
}
"""Checkers run by --verify-each for each property a pass claims to establish or keep."""

PROPERTY_PRODUCERS: dict[str, str] = {SHAPES_INFERRED: "infer-shapes"}
"""Which pass establishes a property; the manager schedules it when a later pass requires the property."""


@dataclass
class PassResult:
    """What a pass did: whether the module changed, and counters for the report (`nodes-removed`: 3)."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class PassContext:
    """Options every pass can read, plus the instruments watching the run."""

    opt_level: int = 2
    target: str = "host"
    disabled: frozenset[str] = frozenset()
    instruments: list[Any] = field(default_factory=list)
    verify_each: bool = False
    debug_rewrites: bool = False
    log: Callable[[str], None] | None = None
    calibration_ranges: dict[str, tuple[float, float]] | None = None
    """{value name: (lo, hi)} measured on calibration data, for quantize-int8."""

    def debug(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


class Pass:
    """Base of all passes. Subclasses are `@dataclass(frozen=True)` and set the class attributes below."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset({TOPO_SORTED})
    establishes: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str] | None] = None
    """Properties kept; None means every property except those the pass may break (`invalidates`)."""
    invalidates: ClassVar[frozenset[str]] = frozenset()
    changes_numerics: ClassVar[bool] = False

    def run(self, module: Module, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}

    def spelling(self) -> str:
        """The pipeline text that recreates this pass with its options."""
        opts = []
        for key, fld in self.options().items():
            value = getattr(self, fld.name)
            if value != fld.default:
                opts.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")
