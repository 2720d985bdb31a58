"""Compile a planned Module to native code for a target, and run it (host: in-process)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.backends.emitter import ModuleEmitter, symbol_name
from edgecc.backends.llvm_driver import emit
from edgecc.backends.runtime import HostModule, aligned_empty
from edgecc.errors import EdgeccError
from edgecc.ir.core import Module


@dataclass
class NativeCode:
    """LLVM IR text and object code of one model for one target."""

    name: str
    target: object
    llvm_ir: str
    obj: bytes

    @property
    def entry_symbol(self) -> str:
        return f"{self.name}_run"


def generate(module: Module, target, name: str) -> NativeCode:
    emitter = ModuleEmitter(module, target, name)
    text = emitter.emit()
    return NativeCode(emitter.name, target, text, emit(text, target, "obj"))


def make_runner(module: Module, code: NativeCode):
    """In-process for the host (and x86 presets this CPU supports), qemu-user for foreign hosted targets."""
    if code.target.is_native:
        return NativeRunner(module, code)
    from edgecc.backends.cross_runner import CrossRunner

    return CrossRunner(module, code)


class NativeRunner:
    """Runs native host code on NumPy arrays; outputs and the arena are allocated once and reused."""

    def __init__(self, module: Module, code: NativeCode):
        self._fn = HostModule(code.obj, code.entry_symbol, code.target)
        self._arena = aligned_empty(max(module.memory_plan.arena_bytes, 1))
        self._outputs = [v.type for v in module.graph.outputs]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        inputs = [np.ascontiguousarray(a) for a in arrays]
        outputs = [np.empty(t.shape, t.dtype.numpy) for t in self._outputs]
        status = self._fn(inputs, outputs, self._arena)
        if status != 0:
            raise EdgeccError(f"native code returned status {status}")
        return outputs


def symbol_for(name: str) -> str:
    return symbol_name(name)
