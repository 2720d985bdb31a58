"""What a compiled model costs on a device: flash, RAM, latency and energy, per op and in total.

Sizes are read from what was built: code and weights from the object file's sections, the arena from the memory
plan, the stack from the generated functions' prologues. Cycles are measured, not modelled:
- on the host (and x86 presets this CPU runs) each node's kernel is timed with the cycle counter through the
  profiling entry (CompiledModel.profile); latency is the sum of the nodes' median times;
- on ARM boards each node's guest instructions are counted under qemu-user (backends/insncount.py) and multiplied
  by the board's cycles per instruction, then divided by its clock. Cortex-M4 code is counted as built for the
  M4 (Thumb-2, single-precision VFP) but linked for Linux and run on qemu-arm's Cortex-A15, since qemu-user
  cannot run M-profile programs; Helium (Cortex-M55) code, which no A-profile core runs, is counted as firmware
  under qemu-system-arm on the MPS3-AN547 board.
Energy is a sum of per-operation and per-byte figures of the device (docs/devices.md). Measurements are cached on
disk by the object code's hash, so repeating an estimate is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edgecc.devices import Device, load_device
from edgecc.errors import EdgeccError
from edgecc.ops.costs import node_macs

INTEGER_DTYPES = ("int8", "uint8")


@dataclass
class OpEstimate:
    node: str
    op: str
    macs: int
    weight_bytes: int
    output_bytes: int
    cycles: float
    latency_ms: float
    energy_mj: float
    instructions: int | None = None
    """Guest instructions counted under qemu (ARM boards); None when the node was timed on the host."""


@dataclass
class Estimate:
    device: Device
    ops: list[OpEstimate]
    code_bytes: int
    weights_bytes: int
    flash_bytes: int
    arena_bytes: int
    stack_bytes: int
    ram_bytes: int
    latency_ms: float
    energy_mj: float
    method: str = ""
    """How cycles were obtained (host kernel timing, or qemu instruction counts x cycles per instruction)."""
    instructions: int | None = None
    fits: dict = field(default_factory=dict)
    """{"flash": bool, "ram": bool} against the device's sizes (missing where the device sets no limit)."""

    def as_dict(self) -> dict:
        data = asdict(self)
        data["device"] = self.device.as_dict()
        return data

    def table(self) -> str:
        return table(self.as_dict())


def table(data: dict) -> str:
    """The per-op table and the totals of an estimate (Estimate.as_dict(), as in a report), for people."""
    rows = [f"{'node':<28} {'op':<18} {'MACs':>13} {'weights B':>11} {'out B':>10} {'cycles':>13} {'ms':>9} "
            f"{'mJ':>9}"]
    for o in data["ops"]:
        rows.append(f"{o['node'][:28]:<28} {o['op'][:18]:<18} {o['macs']:>13,} {o['weight_bytes']:>11,} "
                    f"{o['output_bytes']:>10,} {o['cycles']:>13,.0f} {o['latency_ms']:>9.4f} {o['energy_mj']:>9.5f}")
    d = data["device"]

    def limit(v):
        return "no limit" if v is None else f"{v:,} B"

    insns = data.get("instructions")
    rows += ["",
             f"device {d['name']} (target {d['target']}, {d['clock_hz'] / 1e6:g} MHz); cycles: {data['method']}",
             f"flash {data['flash_bytes']:,} B = code {data['code_bytes']:,} + weights {data['weights_bytes']:,}"
             f"   (device: {limit(d['flash_bytes'])})",
             f"RAM   {data['ram_bytes']:,} B = arena {data['arena_bytes']:,} + stack {data['stack_bytes']:,}"
             f"   (device: {limit(d['ram_bytes'])})",
             f"latency {data['latency_ms']:.4f} ms   energy {data['energy_mj']:.5f} mJ"
             + (f"   instructions {insns:,}" if insns is not None else "")]
    return "\n".join(rows)


def estimate(model, device: "Device | str", feeds=None, refresh: bool = False) -> Estimate:
    """The cost of `model` (a CompiledModel with native code) on `device` (a Device, a built-in name or a board
    file). `feeds`: inputs to measure with (default: seeded random floats, zero integers); `refresh`: measure again
    even if a cached figure exists."""
    device = load_device(device)
    if model.native is None:
        raise EdgeccError("an estimate needs native code", where="estimate", hint="compile with runtime='native'")
    module = model.module
    goal = model.native.target.optimise_for  # code optimised for size (a flash budget) is measured as built
    built = _code_for(model, replace(_device_target(device), optimise_for=goal))
    code = _code_for(model, replace(measuring_target(device), optimise_for=goal), built)
    arrays = _inputs(module, feeds)
    if code.target.is_native:
        timing = _cached(code, "host-ms-v2", arrays, refresh, lambda: _host_node_ms(model, code, arrays))
        cycles = [ms * 1e-3 * device.clock_hz for ms in timing["ms"]]
        instructions, total_insns = [None] * len(cycles), None
        method = f"host kernels timed by the cycle counter: {timing['how']}; cycles = time x clock"
    else:
        from edgecc.backends.insncount import SYSTEM_BOARDS, node_counts

        counts = _cached(code, f"insns-{code.target.qemu_cpu or code.target.name}", arrays, refresh,
                         lambda: list(node_counts(module, code, arrays)))
        instructions, total_insns = counts[0], counts[1]
        cpi = device.cycles_per_instruction or 1.0
        cycles = [n * cpi for n in instructions]
        runner = (f"{code.target.qemu} -cpu {code.target.qemu_cpu}" if code.target.qemu else
                  f"qemu-system-arm -M {SYSTEM_BOARDS[code.target.name][0]}")
        method = f"guest instructions under {runner} (code for {code.target.cpu}) x {cpi} cycles per instruction"
    ops = [_op(node, c, n, device) for node, c, n in zip(module.graph.nodes, cycles, instructions)]
    code_bytes, weights_bytes = object_sizes(built.obj)
    arena = int(module.memory_plan.arena_bytes)
    stack = stack_bytes(built)
    result = Estimate(device, ops, code_bytes, weights_bytes, code_bytes + weights_bytes, arena, stack,
                      arena + stack, sum(o.latency_ms for o in ops), sum(o.energy_mj for o in ops), method,
                      total_insns)
    if device.flash_bytes is not None:
        result.fits["flash"] = result.flash_bytes <= device.flash_bytes
    if device.ram_bytes is not None:
        result.fits["ram"] = result.ram_bytes <= device.ram_bytes
    return result


def report_fields(est: Estimate) -> dict:
    """What CompiledModel.report gains with a device."""
    return {"device": est.device.name, "flash_bytes": est.flash_bytes, "ram_bytes": est.ram_bytes,
            "latency_ms": est.latency_ms, "energy_mj": est.energy_mj, "estimate": est.as_dict()}


# -- per op ---------------------------------------------------------------------------------------------------------

def _op(node, cycles: float, instructions: int | None, device: Device) -> OpEstimate:
    from edgecc.passes.encode_sparsity import encoded_bytes

    macs = node_macs(node)
    weights = sum(encoded_bytes(v) for v in node.inputs if v is not None and v.is_const)
    activations_in = sum(v.type.nbytes for v in node.inputs if v is not None and not v.is_const)
    outputs = sum(v.type.nbytes for v in node.outputs)
    integer = any(v is not None and v.type.dtype.name in INTEGER_DTYPES for v in node.inputs[:1])
    picojoules = (macs * (device.pj_int8_mac if integer else device.pj_fp32_mac) + weights * device.pj_weight_byte
                  + (activations_in + outputs) * device.pj_activation_byte + cycles * device.pj_per_cycle)
    return OpEstimate(node.name or node.label, node.op, macs, int(weights), int(outputs), float(cycles),
                      float(cycles / device.clock_hz * 1e3), picojoules * 1e-9, instructions)


# -- cycles ---------------------------------------------------------------------------------------------------------

PROFILE_RUNS = 25
MIN_UNPREEMPTED = 5

CORTEX_M4_COUNTED = dict(triple="thumbv7em-unknown-linux-gnueabihf", hosted=True, cc="arm-linux-gnueabihf-gcc",
                         qemu="qemu-arm", qemu_cpu="cortex-a15", sysroot="/usr/arm-linux-gnueabihf", stack_scratch=False)
"""Cortex-M4 code (same CPU and features) linked for Linux so qemu-arm's Cortex-A15 runs it: the A-profile
Thumb-2 and VFPv4 include every M4 instruction, and qemu-user refuses M-profile programs."""


def measuring_target(device: Device):
    """The target whose code is measured for `device`: its own preset, or the Linux-linked Cortex-M4 variant."""
    from edgecc.backends.insncount import can_count

    target = _device_target(device)
    if target.is_native or can_count(target):
        return target
    if target.name == "cortex-m4":
        return replace(target, name="cortex-m4-counted", **CORTEX_M4_COUNTED)
    raise EdgeccError(f"no way to measure {target.name} code here (device {device.name})", where="estimate",
                      hint="estimates exist for host, x86 presets, armv8, armv8.2, armv7, cortex-m4 and cortex-m55")


def _device_target(device: Device):
    """The device's target preset as a Target."""
    from edgecc.backends.targets import resolve_target

    return resolve_target(device.target)


def _code_for(model, target, known=None):
    """Native code of the model for `target`: the model's own (or `known`) if it is for that target, else code
    generated for it from the model's module (optimised for the model's own target)."""
    for code in (model.native, known):
        if code is not None and code.target == target:
            return code
    from edgecc.backends.native import generate

    return generate(model.module, target, model.native.name)


def _inputs(module, feeds) -> dict[str, np.ndarray]:
    if feeds is not None:
        from edgecc.interpreter import check_feeds

        return dict(zip([v.name for v in module.graph.inputs], check_feeds(module, feeds)))
    rng = np.random.default_rng(0)
    arrays = {}
    for value in module.graph.inputs:
        t = value.type
        dtype = t.dtype.numpy
        arrays[value.name] = (rng.standard_normal(t.shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                              else np.zeros(t.shape, dtype))
    return arrays


def _host_node_ms(model, code, arrays) -> dict:
    """{"ms": per-node milliseconds of the host kernels (the profiling entry's cycle counter), "how": ...}: the
    median over PROFILE_RUNS runs of those the OS did not preempt (see unpreempted); when fewer than
    MIN_UNPREEMPTED were spared (a busy machine, a long model), each node's fastest run instead."""
    import time

    feeds = [arrays[name] for name in model.input_names]
    if code is model.native:
        profile = model.profile
    else:
        from edgecc.backends.native import Profiler, generate

        profiler = Profiler(model.module, generate(model.module, code.target, code.name, True))

        def profile(inputs, runs):
            return profiler.run(inputs, runs)

    runs = []
    for _ in range(PROFILE_RUNS):
        wall, cpu = time.perf_counter(), time.thread_time()
        rows = profile(feeds, runs=1)
        runs.append((time.perf_counter() - wall, time.thread_time() - cpu, [row["ms"] for row in rows]))
    kept = [ms for wall, cpu, ms in runs if unpreempted(wall, cpu)]
    if len(kept) >= MIN_UNPREEMPTED:
        return {"ms": [float(v) for v in np.median(np.array(kept), axis=0)],
                "how": f"median per-node time of {len(kept)} unpreempted runs of {PROFILE_RUNS}"}
    return {"ms": [float(v) for v in np.min(np.array([ms for _, _, ms in runs]), axis=0)],
            "how": f"fastest per-node time of {PROFILE_RUNS} runs (only {len(kept)} unpreempted: a busy machine)"}


def unpreempted(wall_seconds: float, cpu_seconds: float) -> bool:
    """A run the OS let finish without taking the CPU away for long: its thread's CPU time is at least 90% of its
    wall time. On a busy machine the others measure the load, not the code."""
    return wall_seconds - cpu_seconds <= 0.1 * wall_seconds


def _cached(code, kind: str, arrays, refresh: bool, measure):
    """measure() once per (object code, kind, inputs), kept in the edgecc cache as JSON."""
    from edgecc.backends.llvm_driver import cache_dir

    digest = hashlib.sha256(code.obj)
    digest.update(kind.encode())
    if kind.startswith("host"):
        from edgecc.backends.llvm_driver import host_cpu

        digest.update(host_cpu().encode())
    for name in sorted(arrays):
        digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    folder = os.path.join(cache_dir(), "estimates")
    path = os.path.join(folder, digest.hexdigest()[:24] + ".json")
    if not refresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = measure()
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return value


# -- sizes ----------------------------------------------------------------------------------------------------------

CODE_SECTIONS = re.compile(r"^\.text(\.|$)")
WEIGHT_SECTIONS = re.compile(r"^\.(l?rodata|data\.rel\.ro)(\.|$)")


def elf_sections(obj: bytes) -> dict[str, int]:
    """{section name: size} of an ELF object (32- or 64-bit, little-endian), allocated sections only."""
    if obj[:4] != b"\x7fELF":
        raise EdgeccError("not an ELF object", where="estimate")
    wide = obj[4] == 2
    if wide:
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
    else:
        shoff, = struct.unpack_from("<I", obj, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x2E)

    def header(i):
        base = shoff + i * shentsize
        if wide:
            name, kind, flags, _, offset, size = struct.unpack_from("<IIQQQQ", obj, base)
        else:
            name, kind, flags, _, offset, size = struct.unpack_from("<IIIIII", obj, base)
        return name, kind, flags, offset, size

    strtab_offset = header(shstrndx)[3]
    sections: dict[str, int] = {}
    for i in range(shnum):
        name, kind, flags, _, size = header(i)
        if flags & 0x2:  # SHF_ALLOC: ends up in the program image
            end = obj.index(b"\0", strtab_offset + name)
            label = obj[strtab_offset + name:end].decode()
            sections[label] = sections.get(label, 0) + size
    return sections


def object_sizes(obj: bytes) -> tuple[int, int]:
    """(code bytes, read-only data bytes) of the model's object: executable sections, and the read-only data that
    holds the weights as stored (packed, encoded) with the kernels' small constant tables."""
    sections = elf_sections(obj)
    code = sum(size for name, size in sections.items() if CODE_SECTIONS.match(name))
    weights = sum(size for name, size in sections.items() if WEIGHT_SECTIONS.match(name))
    return code, weights


_X86_PUSH = re.compile(r"\bpush[lq]?\s+%")
_X86_SUB = re.compile(r"\bsub[lq]?\s+\$0x([0-9a-f]+),\s*%[re]sp\b")
_A64_PRE = re.compile(r"\[sp,\s*#-(0x[0-9a-f]+|\d+)\]!")
_SUB_SP = re.compile(r"\bsub(?:\.w|s)?\s+sp,\s*(?:sp,\s*)?#(0x[0-9a-f]+|\d+)(?:,\s*lsl\s*#12)?")
_ARM_PUSH = re.compile(r"\b(v?push)(?:\.w)?\s+\{([^}]*)\}")


def stack_bytes(code) -> int:
    """A bound on the stack the model's code uses: the entry function's frame plus the largest kernel frame
    (kernels call no other kernel). Frames are read from each function's prologue in the object's disassembly
    (pushes, pre-indexed stores to sp, sp subtractions) plus the return address; library calls (memcpy/memset)
    are not included."""
    from edgecc.backends.artifacts import require_tool

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.o")
        with open(path, "wb") as f:
            f.write(code.obj)
        text = subprocess.run([require_tool("llvm-objdump"), "-d", "--no-show-raw-insn", path],
                              capture_output=True, text=True, check=True).stdout
    frames: dict[str, int] = {}
    current, seen = None, 0
    for line in text.splitlines():
        label = re.match(r"^[0-9a-f]+ <([^>]+)>:", line)
        if label:
            current, seen = label.group(1), 0
            frames[current] = 0 if code.target.triple.startswith(("arm", "thumb", "aarch64")) else 8
            continue
        if current is None or seen > 48:
            continue
        seen += 1
        frames[current] += _frame_step(line)
    entry = frames.get(code.entry_symbol, 0)
    kernels = [size for name, size in frames.items() if name.startswith(code.name + "_k")]
    return int(entry + max(kernels, default=0))


def _frame_step(line: str) -> int:
    if _X86_PUSH.search(line):
        return 8
    for pattern in (_X86_SUB, _A64_PRE, _SUB_SP):
        found = pattern.search(line)
        if found:
            number = found.group(1)
            value = int(number, 16) if pattern is _X86_SUB else int(number, 0)
            return value * 4096 if "lsl" in found.group(0) else value
    push = _ARM_PUSH.search(line)
    if push:
        registers = [r for r in push.group(2).split(",") if r.strip()]
        return len(registers) * (8 if push.group(1) == "vpush" else 4)
    return 0
