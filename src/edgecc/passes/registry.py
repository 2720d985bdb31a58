"""Pass registry: built-in passes, user passes registered with `@register_pass`, plugins from files and
from the `edgecc.passes` entry-point group."""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import entry_points

from edgecc.errors import PassError
from edgecc.passes.base import Pass

_PASSES: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass subclass available by its `name` in pipelines."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
        raise PassError(f"pass {cls.__name__} needs a kebab-case `name`", hint="e.g. name = 'fold-constants'")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def load_pass_plugin(path: str) -> list[str]:
    """Import a user's Python file so its @register_pass classes join the registry; returns the new names."""
    if not os.path.isfile(path):
        raise PassError("pass plugin file not found", where=path)
    before = set(_PASSES)
    module_name = f"edgecc_plugin_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PassError(f"pass plugin failed to import: {type(exc).__name__}: {exc}", where=path) from None
    added = sorted(set(_PASSES) - before)
    if not added:
        raise PassError("pass plugin registered no pass", where=path,
                        hint="decorate your Pass subclass with @edgecc.passes.register_pass")
    return added


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="edgecc.passes"):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PassError(f"installed pass plugin '{ep.name}' failed to load: {exc}") from None
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)


def get_pass_class(name: str) -> type[Pass]:
    _load_entry_points()
    cls = _PASSES.get(name)
    if cls is None:
        raise PassError(f"unknown pass '{name}'", hint=f"known passes: {', '.join(sorted(_PASSES))}")
    return cls


def all_passes() -> dict[str, type[Pass]]:
    _load_entry_points()
    return dict(sorted(_PASSES.items()))
