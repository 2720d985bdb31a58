"""Runs code for a foreign hosted target (armv8, armv7, ...) on this machine: a small C driver is linked
statically with the model's object by the target's cross compiler and run under qemu-user with the board's
`-cpu`, so an instruction the board lacks fails instead of passing silently."""

from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np

from edgecc.backends.artifacts import require_tool
from edgecc.errors import EdgeccError
from edgecc.ir.core import Module

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int32_t %(entry)s(const void *const *inputs, void *const *outputs, void *arena);

static const size_t in_bytes[] = {%(in_bytes)s};
static const size_t out_bytes[] = {%(out_bytes)s};

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %%s inputs.bin outputs.bin\n", argv[0]); return 2; }
    enum { N_IN = %(n_in)d, N_OUT = %(n_out)d };
    void *inputs[N_IN + 1], *outputs[N_OUT + 1];
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    for (int i = 0; i < N_IN; ++i) {
        inputs[i] = aligned_alloc(64, (in_bytes[i] + 63) / 64 * 64 + 64);
        if (in_bytes[i] && fread(inputs[i], 1, in_bytes[i], f) != in_bytes[i]) { fprintf(stderr, "short input\n"); return 2; }
    }
    fclose(f);
    for (int i = 0; i < N_OUT; ++i) outputs[i] = aligned_alloc(64, (out_bytes[i] + 63) / 64 * 64 + 64);
    void *arena = aligned_alloc(64, %(arena)du + 64);
    int32_t status = %(entry)s((const void *const *)inputs, outputs, arena);
    if (status != 0) { fprintf(stderr, "model returned %%d\n", status); return 3; }
    f = fopen(argv[2], "wb");
    if (!f) { perror(argv[2]); return 2; }
    for (int i = 0; i < N_OUT; ++i) fwrite(outputs[i], 1, out_bytes[i], f);
    fclose(f);
    return 0;
}
"""


class CrossRunner:
    """Links the model for `target` once, then runs it under qemu for each call."""

    def __init__(self, module: Module, code):
        target = code.target
        if not target.hosted or not target.qemu:
            raise EdgeccError(f"target {target.name} cannot run on this machine",
                              hint="bare-metal objects are linked into firmware; see docs/c-api.md")
        cc = require_tool(target.cc)
        self._qemu = require_tool(target.qemu)
        self._cpu = target.qemu_cpu
        graph = module.graph
        self._in_types = [v.type for v in graph.inputs]
        self._out_types = [v.type for v in graph.outputs]
        self._dir = tempfile.TemporaryDirectory(prefix="edgecc-run-")
        obj = os.path.join(self._dir.name, "model.o")
        with open(obj, "wb") as f:
            f.write(code.obj)
        driver = os.path.join(self._dir.name, "driver.c")
        with open(driver, "w") as f:
            f.write(DRIVER % {
                "entry": code.entry_symbol,
                "in_bytes": ", ".join(str(t.nbytes) for t in self._in_types) or "0",
                "out_bytes": ", ".join(str(t.nbytes) for t in self._out_types) or "0",
                "n_in": len(self._in_types), "n_out": len(self._out_types),
                "arena": max(module.memory_plan.arena_bytes, 1),
            })
        self._exe = os.path.join(self._dir.name, "run")
        result = subprocess.run([cc, "-O2", "-static", "-o", self._exe, driver, obj, "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EdgeccError(f"linking the {target.name} test driver failed: {result.stderr.strip()[-400:]}")

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        in_path = os.path.join(self._dir.name, "in.bin")
        out_path = os.path.join(self._dir.name, "out.bin")
        with open(in_path, "wb") as f:
            for array in arrays:
                f.write(np.ascontiguousarray(array).tobytes())
        command = [self._qemu] + (["-cpu", self._cpu] if self._cpu else []) + [self._exe, in_path, out_path]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise EdgeccError(f"model run under {os.path.basename(self._qemu)} failed (exit {result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-300:]}")
        data = open(out_path, "rb").read()
        outputs, offset = [], 0
        for t in self._out_types:
            outputs.append(np.frombuffer(data, dtype=t.dtype.numpy, count=t.size, offset=offset).reshape(t.shape).copy())
            offset += t.nbytes
        return outputs
