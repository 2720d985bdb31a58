"""Errors a user can meet. Each carries enough context to be printed as one line that says what to do."""

from __future__ import annotations


class EdgeccError(Exception):
    """Base of every error edgecc raises on bad input; the CLI prints it as one line, exit status 1."""

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ModelLoadError(EdgeccError):
    """The model file is missing, unreadable, not ONNX, or refers to data it may not read."""


class UnsupportedOpError(EdgeccError):
    """One or more ops are outside edgecc's op set (all of them are listed at once)."""


class ShapeError(EdgeccError):
    """Shape or dtype inference failed, or a dimension is dynamic and not bound."""


class OpAttributeError(EdgeccError):
    """An attribute is missing or out of range."""


class VerificationError(EdgeccError):
    """The IR breaks an invariant (cycle, dangling value, type mismatch)."""


class PassError(EdgeccError):
    """A pass failed, or a pipeline names an unknown pass or option."""


class IRParseError(EdgeccError):
    """The textual IR could not be parsed."""


class InputError(EdgeccError):
    """Inputs given to run() do not match the model's inputs."""


class BudgetError(EdgeccError):
    """A device budget (flash, RAM, latency) cannot be met by any setting tried.

    The message names the budget, the smallest value reached, and (in the hint) what to try.
    """

    def __init__(self, budget: str, limit: float, smallest: float, unit: str = "bytes", *,
                 hint: str | None = None, where: str | None = None, within: str | None = None):
        self.budget = budget
        self.limit = limit
        self.smallest = smallest
        self.unit = unit
        self.within = within  # a further condition the points had to meet, e.g. an accuracy floor
        super().__init__(f"{budget} of {_show(limit, unit)} cannot be met{' ' + within if within else ''}: the "
                         f"smallest reachable is {_show(smallest, unit)}", hint=hint, where=where)


def _show(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{int(value)} bytes ({value / 1024:.1f} KiB)"
    return f"{value:g} {unit}"
