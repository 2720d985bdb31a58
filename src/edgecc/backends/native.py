"""Compile a planned Module to native code for a target, and run it (host: in-process)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgecc.backends.emitter import ModuleEmitter, symbol_name
from edgecc.backends.llvm_driver import emit
from edgecc.backends.runtime import HostModule, aligned_empty
from edgecc.errors import EdgeccError
from edgecc.ir.core import Module


@dataclass
class NativeCode:
    """LLVM IR (the entry module, then one module per kernel) and object code of one model for one target."""

    name: str
    target: object
    modules: list[str]
    obj: bytes

    @property
    def llvm_ir(self) -> str:
        """All modules' IR as one text, for reading (it is not one module: see `modules`)."""
        return "\n".join(self.modules)

    @property
    def entry_symbol(self) -> str:
        return f"{self.name}_run"


def generate(module: Module, target, name: str, profile: bool = False, progress=None) -> NativeCode:
    """Native code for `module`; `profile` adds the `<name>_profile` entry (see ModuleEmitter._entry).
    `progress` (a CompileProgress) gets a step per node and one for LLVM."""
    if progress is not None:
        progress.expect(len(module.graph.nodes) + 1)
    on_node = (lambda node: progress.step(f"kernel {node.op}")) if progress is not None else None
    emitter = ModuleEmitter(module, target, name, profile, on_node)
    texts = emitter.emit()
    obj = emit(texts, target, "obj")
    if progress is not None:
        progress.step("llvm")
    return NativeCode(emitter.name, target, texts, obj)


def make_runner(module: Module, code: NativeCode):
    """In-process for the host (and x86 presets this CPU supports), qemu-user for foreign hosted targets."""
    if code.target.is_native:
        return NativeRunner(module, code)
    from edgecc.backends.cross_runner import CrossRunner

    return CrossRunner(module, code)


class NativeRunner:
    """Runs native host code on NumPy arrays. The arena and the pointer tables are allocated once; a call only
    writes the input and fresh output addresses into the tables and calls the entry (a few microseconds)."""

    def __init__(self, module: Module, code: NativeCode):
        self._fn = HostModule(code.obj, code.entry_symbol, code.target)
        self._arena = aligned_empty(max(module.memory_plan.arena_bytes, 1))
        graph = module.graph
        self._inputs = [(v.name, v.type.shape, v.type.dtype.numpy) for v in graph.inputs]
        self._outputs = [aligned_empty(v.type.nbytes).view(v.type.dtype.numpy).reshape(v.type.shape)
                         for v in graph.outputs]
        self._call = self._fn.bind(len(self._inputs), self._outputs, self._arena)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """`arrays` in input order, already checked (CompiledModel.run checks them). Returns fresh arrays."""
        return self._invoke([a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays])

    def _invoke(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        status = self._call(inputs)
        if status != 0:
            raise EdgeccError(f"native code returned status {status}")
        return [out.copy() for out in self._outputs]

    def fast_run(self, feeds) -> list[np.ndarray] | None:
        """run() for feeds that are exactly what the model takes (a dict of C-contiguous arrays of the right
        dtypes and shapes, nothing else) with no further checks; None for anything else (then the caller's full
        check explains what is wrong). Costs about a microsecond over the native call."""
        if type(feeds) is not dict or len(feeds) != len(self._inputs):
            return None
        arrays = []
        for name, shape, dtype in self._inputs:
            a = feeds.get(name)
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
                return None
            arrays.append(a)
        return self._invoke(arrays)


class Profiler:
    """Per-node time of host native code, from the cycle counter the `<name>_profile` entry reads around each
    node. Cycles are converted to seconds by timing the same calls with perf_counter."""

    def __init__(self, module: Module, code: NativeCode):
        self._module = module
        self._fn = HostModule(code.obj, f"{code.name}_profile", code.target, extra_args=1)
        self._arena = aligned_empty(max(module.memory_plan.arena_bytes, 1))
        self._ticks = np.zeros(len(module.graph.nodes) + 1, dtype=np.uint64)

    def run(self, arrays: list[np.ndarray], runs: int) -> list[dict]:
        inputs = [np.ascontiguousarray(a) for a in arrays]
        outputs = [np.empty(v.type.shape, v.type.dtype.numpy) for v in self._module.graph.outputs]
        call = self._fn.bind(len(inputs), outputs, self._arena, self._ticks)
        samples = []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            call(inputs)
            seconds = time.perf_counter() - start
            cycles = np.diff(self._ticks.astype(np.int64))
            samples.append((cycles, seconds, int(self._ticks[-1] - self._ticks[0])))
        per_node = np.median(np.stack([s[0] for s in samples]), axis=0)
        rate = np.median([s[2] / s[1] for s in samples if s[1] > 0])  # counter ticks per second
        total = max(float(per_node.sum()), 1.0)
        rows = []
        for node, ticks in zip(self._module.graph.nodes, per_node):
            rows.append({"node": node.label, "op": node.op, "ms": float(ticks / rate * 1e3),
                         "share": float(ticks / total)})
        return rows


def symbol_for(name: str) -> str:
    return symbol_name(name)
