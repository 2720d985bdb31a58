"""Guest instruction counts of generated ARM code under qemu (user mode, or system mode for Helium), per node.

A TCG plugin (PLUGIN below, built once into the edgecc cache with the qemu-plugin.h that
../shared/tools/qemu-insncount/build.sh fetches) counts every guest instruction inline and, on the translation
blocks that start a kernel function or lie in the model's entry function, logs (address, running count). The entry
calls one kernel per node in order, so the count between the entry's block after one call and after the next is
that node's work (the kernel, what it calls, and the entry's few instructions around the call). The kernel symbols
and the entry's address range come from the linked executable's symbol table (`nm`).

The model is linked statically with a small C driver (DRIVER: inputs from a file, the entry run R times) by the
target's cross compiler; tools/arm_insncount.py uses the same driver for whole-model counts.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import tempfile

import numpy as np

from edgecc.errors import EdgeccError

SHARED_TOOLS = pathlib.Path(os.environ.get("EDGECC_SHARED", pathlib.Path(__file__).resolve().parents[4] / "shared"),
                            "tools", "qemu-insncount")

DRIVER = r"""
/* edgecc's instruction-count driver: usage: prog R ARENA_BYTES N_INPUTS inputs.bin BYTES...
   BYTES gives the size of each input then each output; the inputs are read in order from inputs.bin, then the
   model's entry (bound to edgecc_entry by --defsym) runs R times. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t edgecc_entry(const void *const *inputs, void *const *outputs, void *arena);

static void *zeroed(uint64_t bytes) {
    uint64_t rounded = (bytes + 63) / 64 * 64 + 64;
    void *p = aligned_alloc(64, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s R ARENA_BYTES N_INPUTS inputs.bin BYTES...\n", argv[0]); return 2; }
    long reps = strtol(argv[1], NULL, 10);
    void *arena = zeroed(strtoull(argv[2], NULL, 10));
    int n_inputs = atoi(argv[3]), n = argc - 5;
    FILE *f = fopen(argv[4], "rb");
    void **buffers = calloc(n + 1, sizeof(void *));
    if (!f || !arena || !buffers) { perror(argv[4]); return 2; }
    for (int i = 0; i < n; ++i) {
        uint64_t bytes = strtoull(argv[5 + i], NULL, 10);
        buffers[i] = zeroed(bytes);
        if (!buffers[i] || (i < n_inputs && fread(buffers[i], 1, bytes, f) != bytes)) {
            fprintf(stderr, "input %d: short read or no memory\n", i);
            return 2;
        }
    }
    for (long r = 0; r < reps; ++r) {
        int32_t status = edgecc_entry((const void *const *)buffers, buffers + n_inputs, arena);
        if (status != 0) { fprintf(stderr, "model returned %d\n", status); return 3; }
    }
    return 0;
}
"""

PLUGIN = r"""
/* Counts guest instructions; logs "address count" when a block starting at a marked address (kernel entry points)
   or lying in [lo, hi) (the model's entry function) runs. Args: lo=HEX hi=HEX marks=FILE outfile=PATH. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qemu-plugin.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;
static uint64_t total, lo, hi, *marks, *log_data;
static size_t n_marks, n_log, cap_log;
static char outfile[512];

static int marked(uint64_t a) {
    size_t l = 0, h = n_marks;
    while (l < h) { size_t m = (l + h) / 2; if (marks[m] < a) l = m + 1; else h = m; }
    return l < n_marks && marks[l] == a;
}
static void on_exec(unsigned int cpu, void *udata) {
    if (n_log + 2 > cap_log) { cap_log = cap_log ? 2 * cap_log : 4096; log_data = realloc(log_data, cap_log * 8); }
    log_data[n_log++] = (uint64_t)(uintptr_t)udata;
    log_data[n_log++] = total;
}
static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    uint64_t a = qemu_plugin_tb_vaddr(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &total, qemu_plugin_tb_n_insns(tb));
    if ((a >= lo && a < hi) || marked(a))
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)a);
}
static void at_exit(qemu_plugin_id_t id, void *p) {
    FILE *f = fopen(outfile, "w");
    if (!f) return;
    fprintf(f, "total %" PRIu64 "\n", total);
    for (size_t i = 0; i < n_log; i += 2) fprintf(f, "%" PRIx64 " %" PRIu64 "\n", log_data[i], log_data[i + 1]);
    fclose(f);
}
static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y;
}
QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "lo=", 3)) lo = strtoull(argv[i] + 3, NULL, 16);
        else if (!strncmp(argv[i], "hi=", 3)) hi = strtoull(argv[i] + 3, NULL, 16);
        else if (!strncmp(argv[i], "outfile=", 8)) snprintf(outfile, sizeof outfile, "%s", argv[i] + 8);
        else if (!strncmp(argv[i], "marks=", 6)) {
            FILE *f = fopen(argv[i] + 6, "r"); uint64_t a; size_t cap = 0;
            if (!f) return 1;
            while (fscanf(f, "%" SCNx64, &a) == 1) {
                if (n_marks == cap) { cap = cap ? 2 * cap : 256; marks = realloc(marks, cap * 8); }
                marks[n_marks++] = a;
            }
            fclose(f);
            qsort(marks, n_marks, 8, cmp);
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
"""

KERNEL_SYMBOL = re.compile(r"_k\d+_([A-Za-z0-9]+)_[0-9a-f]{8}$")


def _cache_dir() -> str:
    from edgecc.backends.llvm_driver import cache_dir

    return cache_dir()


def plugin_header_dir() -> str:
    """The folder holding qemu-plugin.h (and the shared whole-program counter), built by the shared script once."""
    out = os.path.join(_cache_dir(), "insncount")
    if not os.path.exists(os.path.join(out, "qemu-plugin.h")):
        script = SHARED_TOOLS / "build.sh"
        if not script.is_file():
            raise EdgeccError("cannot build the qemu instruction-count plugin", where=str(script),
                              hint="set EDGECC_SHARED to the folder holding tools/qemu-insncount")
        subprocess.run(["bash", str(script), out], check=True, stdout=subprocess.DEVNULL)
    return out


def whole_program_plugin() -> str:
    """../shared's libinsncount.so: one total count per run."""
    return os.path.join(plugin_header_dir(), "libinsncount.so")


def node_plugin() -> str:
    """PLUGIN compiled once (by source) into the cache."""
    folder = plugin_header_dir()
    key = hashlib.sha256(PLUGIN.encode()).hexdigest()[:12]
    lib = os.path.join(folder, f"libnodecount-{key}.so")
    if not os.path.exists(lib):
        source = os.path.join(folder, f"nodecount-{key}.c")
        pathlib.Path(source).write_text(PLUGIN)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{folder}", source, "-o", lib + ".tmp"], check=True)
        os.replace(lib + ".tmp", lib)
    return lib


def driver_object(target) -> str:
    """DRIVER compiled by the target's cross compiler (cached, like the qemu test driver)."""
    from edgecc.backends.cross_runner import cached_c_object

    return cached_c_object(DRIVER, target.cc, target, stem="insncount-driver", what="instruction-count driver")


def link(module, code, folder: str) -> str:
    """The model's object linked statically with the driver; returns the executable."""
    from edgecc.backends.artifacts import require_tool
    from edgecc.backends.cross_runner import strip_profile_attributes

    require_tool(code.target.cc), require_tool(code.target.qemu)
    obj = os.path.join(folder, "model.o")
    pathlib.Path(obj).write_bytes(code.obj)
    strip_profile_attributes(code.target, obj)
    exe = os.path.join(folder, "run")
    subprocess.run([code.target.cc, "-static", "-o", exe, driver_object(code.target), obj,
                    f"-Wl,--defsym=edgecc_entry={code.entry_symbol}"], check=True, capture_output=True)
    return exe


def write_inputs(module, arrays: dict[str, np.ndarray] | None, path: str) -> None:
    """The inputs in graph order (zeros for any `arrays` lacks)."""
    arrays = arrays or {}
    with open(path, "wb") as f:
        for value in module.graph.inputs:
            t = value.type
            array = arrays[value.name] if value.name in arrays else np.zeros(t.shape, t.dtype.numpy)
            f.write(np.ascontiguousarray(array, dtype=t.dtype.numpy).reshape(t.shape).tobytes())


def qemu_command(module, code, exe: str, inputs: str, reps: int, plugin: str) -> list[str]:
    graph = module.graph
    target = code.target
    sizes = [str(v.type.nbytes) for v in list(graph.inputs) + list(graph.outputs)]
    return [target.qemu, "-cpu", target.qemu_cpu, "-plugin", plugin, exe, str(reps),
            str(max(module.memory_plan.arena_bytes, 1)), str(len(graph.inputs)), inputs, *sizes]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise EdgeccError(f"{' '.join(command[:3])} ... failed ({result.returncode}): {result.stderr.strip()[-300:]}",
                          where="instruction count")
    return result


def _symbols(exe: str, target) -> dict[str, tuple[int, int]]:
    """{symbol: (address, size)} of the executable's functions (Thumb addresses without their mode bit)."""
    nm = "llvm-nm"
    out = subprocess.run([nm, "-S", "--defined-only", exe], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2].lower() == "t":
            table[parts[3]] = (int(parts[0], 16) & ~1, int(parts[1], 16))
    return table


SYSTEM_BOARDS = {"cortex-m55": ("mps3-an547", "0x20080000", ["-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"])}
"""Bare-metal targets counted under qemu-system-arm (qemu-user runs no M-profile program): the MPS board, its stack
top (the end of the DTCM) and arm-none-eabi-gcc's flags. The firmware's code and data go to the board's DDR at
0x60000000 (2 GB, room for any model's weights), the vector table to address 0 where the board boots."""

FIRMWARE = r"""
/* edgecc's instruction-count firmware: the vector table, a reset handler that enables the FPU/MVE (CPACR CP10/CP11)
   and enters newlib's semihosting runtime, and main running the model once on the inputs below. */
#include <stdint.h>
extern void _start(void);
int32_t edgecc_entry(const void *const *inputs, void *const *outputs, void *arena);
void reset_handler(void) {
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm volatile("dsb\n\tisb");
    _start();
}
__attribute__((section(".vectors"), used)) const void *const vectors[2] = {(const void *)STACK_TOP,
                                                                           (const void *)reset_handler};
static uint8_t arena[ARENA_BYTES + 1] __attribute__((aligned(64)));
"""


def firmware(module, code, arrays: dict[str, np.ndarray] | None, folder: str) -> str:
    """A bare-metal program running the model once under qemu-system-arm (SYSTEM_BOARDS); returns the ELF."""
    from edgecc.backends.artifacts import require_tool

    _, stack_top, flags = SYSTEM_BOARDS[code.target.name]
    require_tool("arm-none-eabi-gcc"), require_tool("qemu-system-arm")
    arrays = arrays or {}
    graph = module.graph
    lines = [FIRMWARE]
    for i, value in enumerate(graph.inputs):
        t = value.type
        data = np.ascontiguousarray(arrays.get(value.name, np.zeros(t.shape, t.dtype.numpy)), t.dtype.numpy)
        body = ",".join(str(b) for b in data.tobytes())
        lines.append(f"static const uint8_t in{i}[{max(t.nbytes, 1)}] __attribute__((aligned(64))) = {{{body}}};")
    for i, value in enumerate(graph.outputs):
        lines.append(f"static uint8_t out{i}[{max(value.type.nbytes, 1)}] __attribute__((aligned(64)));")
    inputs = ", ".join(f"in{i}" for i in range(len(graph.inputs))) or "0"
    outputs = ", ".join(f"out{i}" for i in range(len(graph.outputs)))
    lines.append(f"int main(void) {{ const void *inputs[] = {{{inputs}}}; void *outputs[] = {{{outputs}}};\n"
                 "    return edgecc_entry(inputs, outputs, arena); }")
    source = os.path.join(folder, "firmware.c")
    pathlib.Path(source).write_text("\n".join(lines) + "\n")
    obj = os.path.join(folder, "model.o")
    pathlib.Path(obj).write_bytes(code.obj)
    exe = os.path.join(folder, "fw.elf")
    subprocess.run(["arm-none-eabi-gcc", *flags, "--specs=rdimon.specs", "-O2", f"-DSTACK_TOP={stack_top}",
                    f"-DARENA_BYTES={module.memory_plan.arena_bytes}", source, obj,
                    "-Wl,--section-start=.vectors=0x0", "-Wl,-Ttext=0x60000000", "-Wl,--no-warn-rwx-segments",
                    f"-Wl,--defsym=edgecc_entry={code.entry_symbol}", "-o", exe], check=True, capture_output=True)
    return exe


def system_command(target, exe: str, plugin: str) -> list[str]:
    board = SYSTEM_BOARDS[target.name][0]
    return ["qemu-system-arm", "-M", board, "-cpu", target.name, "-nographic", "-semihosting-config",
            "enable=on,target=native", "-kernel", exe, "-plugin", plugin]


def can_count(target) -> bool:
    """Whether node_counts can measure code for `target` here: a hosted preset with qemu-user, or a SYSTEM_BOARD."""
    return bool(target.qemu) or target.name in SYSTEM_BOARDS


def node_counts(module, code, arrays: dict[str, np.ndarray] | None = None) -> tuple[list[int], int]:
    """(guest instructions of each node in graph order, of the whole entry call) for one run of `code` under
    qemu-user (hosted targets) or qemu-system-arm (SYSTEM_BOARDS). Nodes the memory plan makes views (no kernel
    call) count 0."""
    plan = module.memory_plan
    calls = [i for i, node in enumerate(module.graph.nodes)
             if not (node.outputs and all(v._id in plan.aliases for v in node.outputs))]
    with tempfile.TemporaryDirectory(prefix="edgecc-estimate-") as tmp:
        if code.target.qemu:
            exe = link(module, code, tmp)
            inputs = os.path.join(tmp, "inputs.bin")
            write_inputs(module, arrays, inputs)

            def command(plugin):
                return qemu_command(module, code, exe, inputs, 1, plugin)
        else:
            exe = firmware(module, code, arrays, tmp)

            def command(plugin):
                return system_command(code.target, exe, plugin)
        symbols = _symbols(exe, code.target)
        if code.entry_symbol not in symbols:
            raise EdgeccError(f"no symbol {code.entry_symbol} in the linked program", where="instruction count")
        entry_lo, entry_size = symbols[code.entry_symbol]
        kernels = {address: KERNEL_SYMBOL.search(name).group(1) for name, (address, _) in symbols.items()
                   if name.startswith(code.name + "_k") and KERNEL_SYMBOL.search(name)}
        marks = os.path.join(tmp, "marks.txt")
        pathlib.Path(marks).write_text("".join(f"{a:x}\n" for a in kernels))
        log = os.path.join(tmp, "log.txt")
        _run(command(f"{node_plugin()},lo={entry_lo:x},hi={entry_lo + entry_size:x},marks={marks},outfile={log}"))
        events = [(int(a, 16), int(n)) for a, n in (line.split() for line in pathlib.Path(log).read_text()
                                                       .splitlines()[1:])]
    return _split(events, kernels, entry_lo, calls, module)


def _split(events, kernels: dict[int, str], entry_lo: int, calls: list[int], module) -> tuple[list[int], int]:
    """Per-node counts from the event log: a node runs from the entry's block after the previous call (or the
    entry's start) to the entry's block after its own kernel returns."""
    nodes = module.graph.nodes
    counts = [0] * len(nodes)
    start = next((n for a, n in events if a == entry_lo), None)
    if start is None:
        raise EdgeccError("the model's entry never ran under qemu", where="instruction count")
    last, pending, call = start, None, 0
    for address, count in events:
        if address in kernels:
            if call >= len(calls) or kernels[address] != nodes[calls[call]].op:
                raise EdgeccError(f"kernel {kernels[address]} ran where node {call} was expected",
                                  where="instruction count")
            pending = calls[call]
            call += 1
        elif pending is not None:  # back in the entry after a kernel
            counts[pending] = count - last
            last, pending = count, None
    if call != len(calls) or pending is not None:
        raise EdgeccError(f"{call} kernel calls seen under qemu, {len(calls)} expected", where="instruction count")
    return counts, last - start
