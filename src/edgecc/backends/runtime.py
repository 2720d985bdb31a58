"""Runs native code for the host in this process: the object file is loaded with llvmlite's MCJIT (the same
machine code the artifacts contain) and the entry function is called through ctypes."""

from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numpy as np

from edgecc.backends.llvm_driver import _init
from edgecc.errors import EdgeccError


class HostModule:
    """A loaded object exposing `<name>_run(inputs, outputs, arena)`."""

    def __init__(self, obj: bytes, symbol: str, target, extra_args: int = 0):
        _init()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        # MCJIT takes ownership of its TargetMachine: give it a fresh one, never the driver's cached one.
        tm = llvm.Target.from_triple(target.triple).create_target_machine(
            cpu=target.cpu, features=target.features, opt=3, reloc="pic", codemodel="default")
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()
        address = self._engine.get_function_address(symbol)
        if not address:
            raise EdgeccError(f"entry symbol {symbol} not found in the object")
        self._run = ctypes.CFUNCTYPE(ctypes.c_int32, *[ctypes.c_void_p] * (3 + extra_args))(address)

    def __call__(self, inputs: list[np.ndarray], outputs: list[np.ndarray], arena: np.ndarray, *extra) -> int:
        in_ptrs = (ctypes.c_void_p * max(len(inputs), 1))(*[a.ctypes.data for a in inputs])
        out_ptrs = (ctypes.c_void_p * max(len(outputs), 1))(*[a.ctypes.data for a in outputs])
        return self._run(ctypes.cast(in_ptrs, ctypes.c_void_p), ctypes.cast(out_ptrs, ctypes.c_void_p),
                         ctypes.c_void_p(arena.ctypes.data), *[ctypes.c_void_p(a.ctypes.data) for a in extra])


    def bind(self, n_inputs: int, outputs: list[np.ndarray], arena: np.ndarray):
        """call(inputs) -> status writing into the fixed `outputs`, with the pointer tables and the arena bound once.
        Reading an array's address costs about a microsecond in NumPy, as much as the whole call of a small model,
        so an input's address is kept while the caller passes the same array object again (we hold a reference,
        so the object and its buffer stay alive and in place)."""
        in_ptrs = (ctypes.c_void_p * max(n_inputs, 1))()
        out_ptrs = (ctypes.c_void_p * max(len(outputs), 1))(*[a.ctypes.data for a in outputs])
        args = (ctypes.cast(in_ptrs, ctypes.c_void_p), ctypes.cast(out_ptrs, ctypes.c_void_p),
                ctypes.c_void_p(arena.ctypes.data))
        run = self._run
        seen: list = [None] * n_inputs

        def call(inputs: list[np.ndarray]) -> int:
            for i, a in enumerate(inputs):
                if a is not seen[i]:
                    in_ptrs[i] = a.ctypes.data
                    seen[i] = a
            return run(*args)

        return call


def aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
    """A uint8 buffer of `nbytes` whose data pointer is `alignment`-aligned."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes]
