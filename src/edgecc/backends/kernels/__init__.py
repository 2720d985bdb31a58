"""Lowerings: for each op, how to emit its kernel with a KernelBuilder. Importing this package registers all.

Lowerings live with the backend (not in the op registry) because they use the emitter; the op registry stays
free of code generation.
"""

from __future__ import annotations

from typing import Callable

from edgecc.backends.codegen import KernelBuilder

LoweringFn = Callable[[KernelBuilder], None]
_LOWERINGS: dict[str, LoweringFn] = {}


def lowering(*ops: str):
    """Decorator: the decorated function emits the kernel body for each op in `ops`."""

    def wrap(fn: LoweringFn) -> LoweringFn:
        for name in ops:
            if name in _LOWERINGS:
                raise ValueError(f"lowering for {name} registered twice")
            _LOWERINGS[name] = fn
        return fn

    return wrap


def get_lowering(op: str) -> LoweringFn | None:
    _load_families()
    return _LOWERINGS.get(op)


def lowered_ops() -> list[str]:
    _load_families()
    return sorted(_LOWERINGS)


_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
