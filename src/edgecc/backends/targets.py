"""Targets are data: triple, CPU, features, vector width, and how code for them is linked and run here."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from edgecc.errors import EdgeccError


@dataclass(frozen=True)
class Target:
    """Where generated code runs.

    `vector_bits` is the SIMD register width kernels block for; `hosted` targets have an OS (Linux) and get a
    shared library; bare-metal ones get an object and a static library only. `cc` / `qemu` / `qemu_cpu` say how
    the tests link and run code for a foreign target on this machine.
    """

    name: str
    triple: str
    cpu: str
    features: str
    vector_bits: int
    hosted: bool = True
    cc: str | None = None
    qemu: str | None = None
    qemu_cpu: str | None = None
    sysroot: str | None = None
    float_abi_note: str = ""
    optimise_for: str = "speed"
    """"speed" (O3, vectorised and unrolled loops) or "size" (no unrolling or vectorisation: kernels take less
    flash, which counts on microcontrollers; see llvm_driver.optimise)."""
    stack_scratch: bool | None = None
    """Kernels may keep large stack scratch (bands of packed input, staged rows: up to hundreds of KiB). None: as
    `hosted` says. False for a microcontroller's code linked for Linux only to be measured under qemu-user
    (estimate.CORTEX_M4_COUNTED): it must be the same code as on the board."""

    @property
    def large_scratch(self) -> bool:
        """Kernels may take large stack scratch (see stack_scratch)."""
        return self.hosted if self.stack_scratch is None else self.stack_scratch

    @property
    def is_native(self) -> bool:
        """Code for this target runs in this process."""
        return self.name == "host" or (self.triple.startswith("x86_64") and _host_can_run(self))

    @property
    def has_fma(self) -> bool:
        """The target has fused multiply-add instructions (AArch64, x86 FMA3, ARM VFPv4/MVE), so kernels may
        ask for llvm.fma: LLVM would otherwise keep 32-bit ARM's multiply and add apart (cortex-a7 marks its
        multiply-accumulate slow), and elsewhere llvm.fma would become a slow libm call."""
        features = set(self.features.split(","))
        return self.triple.startswith(("aarch64", "arm64")) or bool(
            features & {"+fma", "+vfp4", "+vfp4d16sp", "+vfp4sp", "+mve.fp", "+fp-armv8", "+fp-armv8d16sp"})

    @property
    def pointer_bits(self) -> int:
        return 64 if self.triple.startswith(("x86_64", "aarch64")) else 32


def missing_host_features(target: Target) -> list[str]:
    """The CPU features `target` asks for that this machine lacks (x86: AVX-512 on a Zen 3, say)."""
    from edgecc.backends.llvm_driver import host_features

    wanted = {f[1:] for f in target.features.split(",") if f.startswith("+")}
    have = {f[1:] for f in host_features().split(",") if f.startswith("+")}
    return sorted(wanted - have)


def _host_can_run(target: Target) -> bool:
    return not missing_host_features(target)


def _host() -> Target:
    from edgecc.backends.llvm_driver import host_cpu, host_features, host_triple

    features = host_features()
    bits = 512 if "+avx512f" in features.split(",") else 256 if "+avx2" in features.split(",") else 128
    return Target("host", host_triple(), host_cpu(), features, bits, cc="cc")


PRESETS: dict[str, Target] = {
    "x86-64": Target("x86-64", "x86_64-unknown-linux-gnu", "x86-64", "+sse2", 128, cc="cc"),
    "x86-64-v3": Target("x86-64-v3", "x86_64-unknown-linux-gnu", "x86-64-v3", "+avx2,+fma,+f16c", 256, cc="cc"),
    "x86-64-v4": Target("x86-64-v4", "x86_64-unknown-linux-gnu", "x86-64-v4",
                        "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx2,+fma,+f16c", 512, cc="cc"),
    "armv8": Target("armv8", "aarch64-unknown-linux-gnu", "cortex-a53", "+neon", 128, cc="aarch64-linux-gnu-gcc",
                    qemu="qemu-aarch64", qemu_cpu="cortex-a53", sysroot="/usr/aarch64-linux-gnu"),
    "armv8.2": Target("armv8.2", "aarch64-unknown-linux-gnu", "neoverse-n1", "+neon,+dotprod,+fullfp16", 128,
                      cc="aarch64-linux-gnu-gcc", qemu="qemu-aarch64", qemu_cpu="neoverse-n1",
                      sysroot="/usr/aarch64-linux-gnu"),
    "armv7": Target("armv7", "armv7a-unknown-linux-gnueabihf", "cortex-a7", "+neon,+vfp4", 128,
                    cc="arm-linux-gnueabihf-gcc", qemu="qemu-arm", qemu_cpu="cortex-a15",
                    sysroot="/usr/arm-linux-gnueabihf"),
    "cortex-m4": Target("cortex-m4", "thumbv7em-unknown-none-eabihf", "cortex-m4", "+vfp4d16sp", 32, hosted=False,
                        cc="arm-none-eabi-gcc"),
    "cortex-m55": Target("cortex-m55", "thumbv8.1m.main-unknown-none-eabihf", "cortex-m55", "+mve.fp", 128,
                         hosted=False, cc="arm-none-eabi-gcc"),
}
OPTIMISE_FOR = ("speed", "size")

ALIASES = {"aarch64": "armv8", "arm64": "armv8", "armv7a": "armv7", "x86_64": "x86-64"}


def resolve_target(name: "str | Target | None" = None, mcpu: str | None = None, mattr: str | None = None) -> Target:
    """A preset name, an alias, or an LLVM triple (then --mcpu/--mattr say the CPU and features); a Target is taken
    as it is (a variant such as estimate.measuring_target's)."""
    if isinstance(name, Target):
        return replace(name, cpu=mcpu or name.cpu, features=mattr or name.features)
    name = name or os.environ.get("EDGECC_TARGET") or "host"
    key = ALIASES.get(name, name)
    if key == "host":
        target = _host()
    elif key in PRESETS:
        target = PRESETS[key]
    elif key.count("-") >= 2:
        parts = key.split("-")
        if parts[0].startswith(("thumb", "arm")) and "none" in parts and len(parts) < 4:
            raise EdgeccError(f"bare-metal triple '{key}' needs all four parts", where="--target",
                              hint="e.g. thumbv7em-unknown-none-eabihf (a three-part triple gives the soft-float ABI)")
        hosted = "linux" in key
        target = Target(key, key, mcpu or "generic", mattr or "", 128, hosted=hosted)
    else:
        raise EdgeccError(f"unknown target '{name}'", where="--target",
                          hint=f"use host, {', '.join(PRESETS)} or an LLVM triple with --mcpu/--mattr")
    if mcpu or mattr:
        target = replace(target, cpu=mcpu or target.cpu, features=mattr or target.features)
    return target
