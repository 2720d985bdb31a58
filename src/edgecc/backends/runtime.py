"""Runs native code for the host in this process and calls its entry function through ctypes. The object (the same
machine code the artifacts contain) is linked into a shared library by the system C compiler and loaded with dlopen
(cached on disk by the object's hash); without a C compiler, llvmlite's MCJIT loads the object directly.

Why not always MCJIT: in a large process (a long test session) MCJIT has aborted, rarely, while resolving an
object's relocations, taking the process with it; a dynamic linker has no such failure mode."""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import os
import shutil

import llvmlite.binding as llvm
import numpy as np

from edgecc.backends.llvm_driver import _init, cache_dir
from edgecc.errors import EdgeccError


def _shared_library(obj: bytes, target) -> str | None:
    """Path of `obj` linked as a shared library (cached), or None without a C compiler."""
    if shutil.which("cc") is None:
        return None
    from edgecc.backends.artifacts import shared_library

    path = os.path.join(cache_dir(), hashlib.sha256(obj).hexdigest() + ".so")
    if not os.path.exists(path):
        data = shared_library(obj, target, "")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


class HostModule:
    """A loaded object exposing `<name>_run(inputs, outputs, arena)`."""

    def __init__(self, obj: bytes, symbol: str, target, extra_args: int = 0):
        self._lib = self._engine = None
        library = _shared_library(obj, target)
        if library is not None:
            self._lib = ctypes.CDLL(library, mode=os.RTLD_LOCAL | os.RTLD_NOW)
            try:
                address = ctypes.cast(getattr(self._lib, symbol), ctypes.c_void_p).value
            except AttributeError:
                address = None
        else:
            address = self._load_with_mcjit(obj, symbol, target)
        if not address:
            raise EdgeccError(f"entry symbol {symbol} not found in the object")
        self._run = ctypes.CFUNCTYPE(ctypes.c_int32, *[ctypes.c_void_p] * (3 + extra_args))(address)

    def _load_with_mcjit(self, obj: bytes, symbol: str, target) -> int:
        _init()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        # MCJIT takes ownership of its TargetMachine: give it a fresh one, never the driver's cached one.
        tm = llvm.Target.from_triple(target.triple).create_target_machine(
            cpu=target.cpu, features=target.features, opt=3, reloc="pic", codemodel="default")
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()
        return self._engine.get_function_address(symbol)

    def __del__(self):
        lib = getattr(self, "_lib", None)
        if lib is not None:
            _ctypes.dlclose(lib._handle)

    def __call__(self, inputs: list[np.ndarray], outputs: list[np.ndarray], arena: np.ndarray, *extra) -> int:
        """One call with these buffers (`extra`: arrays for the entry's further pointer arguments)."""
        return self.bind(len(inputs), outputs, arena, *extra)(inputs)

    def bind(self, n_inputs: int, outputs: list[np.ndarray], arena: np.ndarray, *extra: np.ndarray):
        """call(inputs) -> status writing into the fixed `outputs`, with the pointer tables, the arena and the
        `extra` arrays bound once. Reading an array's address costs about a microsecond in NumPy, as much as the
        whole call of a small model, so an input's address is kept while the caller passes the same array object
        again (we hold a reference, so the object and its buffer stay alive and in place)."""
        in_ptrs = (ctypes.c_void_p * max(n_inputs, 1))()
        out_ptrs = (ctypes.c_void_p * max(len(outputs), 1))(*[a.ctypes.data for a in outputs])
        args = (ctypes.cast(in_ptrs, ctypes.c_void_p), ctypes.cast(out_ptrs, ctypes.c_void_p),
                ctypes.c_void_p(arena.ctypes.data), *[ctypes.c_void_p(a.ctypes.data) for a in extra])
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
