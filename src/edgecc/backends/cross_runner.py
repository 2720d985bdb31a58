"""Runs code for a foreign hosted target (armv8, armv7, ...) on this machine: a small C driver, compiled once per
target and cached, is linked statically with the model's object by the target's cross compiler and run under
qemu-user with the board's `-cpu`, so an instruction the board lacks fails instead of passing silently."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile

import numpy as np

from edgecc.backends.artifacts import require_tool
from edgecc.backends.llvm_driver import cache_dir
from edgecc.errors import EdgeccError
from edgecc.ir.core import Module

DRIVER = r"""
/* edgecc's test driver: reads a header (counts and byte sizes) and the inputs from argv[1], runs the model, writes
   the outputs to argv[2]. The model's entry is bound to edgecc_entry at link time (--defsym). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int32_t edgecc_entry(const void *const *inputs, void *const *outputs, void *arena);

static void *buffer(uint64_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s inputs.bin outputs.bin\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    uint32_t counts[2];
    uint64_t arena_bytes;
    if (!f || fread(counts, 4, 2, f) != 2 || fread(&arena_bytes, 8, 1, f) != 1) { fprintf(stderr, "bad input\n"); return 2; }
    uint32_t n = counts[0] + counts[1];
    uint64_t *bytes = malloc(8 * (n + 1));
    void **buffers = malloc(sizeof(void *) * (n + 1));
    if (fread(bytes, 8, n, f) != n) { fprintf(stderr, "bad sizes\n"); return 2; }
    for (uint32_t i = 0; i < n; ++i) buffers[i] = buffer(bytes[i]);
    for (uint32_t i = 0; i < counts[0]; ++i)
        if (bytes[i] && fread(buffers[i], 1, bytes[i], f) != bytes[i]) { fprintf(stderr, "short input\n"); return 2; }
    fclose(f);
    int32_t status = edgecc_entry((const void *const *)buffers, buffers + counts[0], buffer(arena_bytes));
    if (status != 0) { fprintf(stderr, "model returned %d\n", status); return 3; }
    f = fopen(argv[2], "wb");
    if (!f) { perror(argv[2]); return 2; }
    for (uint32_t i = counts[0]; i < n; ++i) fwrite(buffers[i], 1, bytes[i], f);
    fclose(f);
    return 0;
}
"""


def cached_c_object(source: str, cc: str, target, stem: str = "driver", what: str = "test driver") -> str:
    """C `source` compiled by `cc` for `target`, cached on disk by its text (compiling a driver per model would
    dominate test time)."""
    key = hashlib.sha256((source + cc + target.triple).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{stem}-{target.name}-{key}.o")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            source_path = os.path.join(tmp, f"{stem}.c")
            with open(source_path, "w") as f:
                f.write(source)
            obj = os.path.join(tmp, f"{stem}.o")
            result = subprocess.run([cc, "-O2", "-c", source_path, "-o", obj], capture_output=True, text=True)
            if result.returncode != 0:
                raise EdgeccError(f"compiling the {target.name} {what} failed: {result.stderr.strip()[-400:]}")
            os.replace(obj, path)
    return path


def _driver_object(cc: str, target) -> str:
    """The test driver (DRIVER) compiled for `target`."""
    return cached_c_object(DRIVER, cc, target)


class CrossRunner:
    """Links the model for `target` once, then runs it under qemu for each call."""

    def __init__(self, module: Module, code):
        target = code.target
        if target.triple.startswith("x86_64") and not target.qemu:
            from edgecc.backends.targets import missing_host_features

            raise EdgeccError(f"target {target.name} needs CPU features this machine lacks "
                              f"({', '.join(missing_host_features(target))})",
                              hint="write its artifacts with -o and run them on such a CPU, or use --target host")
        if not target.hosted or not target.qemu:
            raise EdgeccError(f"target {target.name} cannot run on this machine",
                              hint="bare-metal objects are linked into firmware; see docs/c-api.md")
        cc = require_tool(target.cc)
        self._qemu = require_tool(target.qemu)
        self._cpu = target.qemu_cpu
        graph = module.graph
        self._in_types = [v.type for v in graph.inputs]
        self._out_types = [v.type for v in graph.outputs]
        self._header = struct.pack(f"<IIQ{len(self._in_types) + len(self._out_types)}Q", len(self._in_types),
                                   len(self._out_types), max(module.memory_plan.arena_bytes, 1),
                                   *[t.nbytes for t in self._in_types + self._out_types])
        self._dir = tempfile.TemporaryDirectory(prefix="edgecc-run-")
        obj = os.path.join(self._dir.name, "model.o")
        with open(obj, "wb") as f:
            f.write(code.obj)
        strip_profile_attributes(target, obj)
        self._exe = os.path.join(self._dir.name, "run")
        result = subprocess.run([cc, "-static", "-o", self._exe, _driver_object(cc, target), obj,
                                 f"-Wl,--defsym=edgecc_entry={code.entry_symbol}"], capture_output=True, text=True)
        if result.returncode != 0:
            raise EdgeccError(f"linking the {target.name} test driver failed: {result.stderr.strip()[-400:]}")

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        in_path = os.path.join(self._dir.name, "in.bin")
        out_path = os.path.join(self._dir.name, "out.bin")
        with open(in_path, "wb") as f:
            f.write(self._header)
            for array in arrays:
                f.write(np.ascontiguousarray(array).tobytes())
        command = [self._qemu] + (["-cpu", self._cpu] if self._cpu else []) + [self._exe, in_path, out_path]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise EdgeccError(f"model run under {os.path.basename(self._qemu)} failed (exit {result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-300:]}")
        with open(out_path, "rb") as f:
            data = f.read()
        outputs, offset = [], 0
        for t in self._out_types:
            outputs.append(np.frombuffer(data, dtype=t.dtype.numpy, count=t.size, offset=offset).reshape(t.shape).copy())
            offset += t.nbytes
        return outputs


def strip_profile_attributes(target, obj: str) -> None:
    """M-profile code linked into an A-profile Linux program (estimate.CORTEX_M4_COUNTED, run by qemu-arm's A15):
    the linker refuses to merge the two profiles' build attributes, which only describe the object, so they go."""
    if target.triple.startswith("thumbv7em") and target.hosted:
        subprocess.run([target.cc.replace("-gcc", "-objcopy"), "--remove-section", ".ARM.attributes", obj],
                       check=True)
