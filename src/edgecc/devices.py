"""Device profiles: the board a model must fit (target preset, RAM, flash, clock) and its cost-model figures.

A profile is data: built-in boards below (their published figures and sources are in docs/devices.md), or a
user's board as a small TOML or JSON file (`--device board.toml`). `estimate.py` turns a compiled model and a
profile into flash, RAM, latency and energy figures.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields

from edgecc.errors import EdgeccError

HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm, 0.9 V)"

# Energy per operation and per byte (picojoules). The Horowitz 45 nm figures: fp32 multiply 3.7 + add 0.9,
# int8 multiply 0.2 + int32 add 0.1; SRAM 32-bit read 5 pJ (8 KB array) .. 50 pJ (1 MB), DRAM 640 pJ (per 32 bits).
PJ_FP32_MAC = 3.7 + 0.9
PJ_INT8_MAC = 0.2 + 0.1
PJ_SRAM_SMALL_BYTE = 5.0 / 4
PJ_SRAM_LARGE_BYTE = 50.0 / 4
PJ_DRAM_BYTE = 640.0 / 4
PJ_INSTRUCTION = 70.0
"""Horowitz's overhead of one instruction on a simple RISC core (fetch, decode, register file, control): the
arithmetic itself is a small part of it."""


@dataclass(frozen=True)
class Device:
    """A board: where the code runs and what it may use.

    `flash_bytes` / `ram_bytes` of None mean "not a constraint" (a phone's storage, the host's disk).
    `cycles_per_instruction` converts guest instruction counts under qemu into core cycles (None for the host,
    whose kernels are timed directly). Energy figures are picojoules per multiply-accumulate and per byte read:
    `pj_weight_byte` where weights live (flash on microcontrollers, DRAM on application processors),
    `pj_activation_byte` where activations live (on-chip SRAM / cache); `pj_per_cycle` is the core's own energy
    per clock cycle (fetch, decode, control), from a datasheet's run current where there is one.
    """

    name: str
    target: str
    ram_bytes: int | None
    flash_bytes: int | None
    clock_hz: float
    cycles_per_instruction: float | None = None
    pj_fp32_mac: float = PJ_FP32_MAC
    pj_int8_mac: float = PJ_INT8_MAC
    pj_weight_byte: float = PJ_DRAM_BYTE
    pj_activation_byte: float = PJ_SRAM_SMALL_BYTE
    pj_per_cycle: float = PJ_INSTRUCTION
    description: str = ""
    sources: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def run_current_pj_per_cycle(microamps_per_mhz: float, volts: float) -> float:
    """A datasheet's run current (uA/MHz) at its supply voltage as picojoules per clock cycle (1 uW/MHz = 1 pJ)."""
    return microamps_per_mhz * volts


_M4_CPI = ("Cortex-M4 Technical Reference Manual (ARM DDI 0439B), 3.3 'Processor instructions': most data "
           "processing 1 cycle, loads 2 (1 when pipelined), VFMA 3, taken branches 1+P (P = 1..3)")

BUILTIN_DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("stm32f4", "cortex-m4", 192 * 1024, 1024 * 1024, 168e6, cycles_per_instruction=1.4,
           pj_per_cycle=run_current_pj_per_cycle(238, 3.3),
           pj_weight_byte=PJ_SRAM_LARGE_BYTE, pj_activation_byte=PJ_SRAM_SMALL_BYTE,
           description="STM32F407/417: Cortex-M4F @ 168 MHz, 192 KB SRAM (128 KB + 64 KB CCM), 1 MB flash",
           sources=("ST DS8626 (STM32F405xx/407xx datasheet), https://www.st.com/resource/en/datasheet/stm32f407vg.pdf",
                    _M4_CPI, HOROWITZ)),
    Device("nrf52840", "cortex-m4", 256 * 1024, 1024 * 1024, 64e6, cycles_per_instruction=1.4,
           pj_per_cycle=run_current_pj_per_cycle(52, 3.0),
           pj_weight_byte=PJ_SRAM_LARGE_BYTE, pj_activation_byte=PJ_SRAM_SMALL_BYTE,
           description="Nordic nRF52840: Cortex-M4F @ 64 MHz, 256 KB RAM, 1 MB flash",
           sources=("Nordic nRF52840 Product Specification v1.7, https://infocenter.nordicsemi.com/pdf/"
                    "nRF52840_PS_v1.7.pdf", _M4_CPI, HOROWITZ)),
    Device("m55-board", "cortex-m55", 1024 * 1024, 5632 * 1024, 400e6, cycles_per_instruction=1.2,
           pj_per_cycle=PJ_INSTRUCTION / 1.2,
           pj_weight_byte=PJ_SRAM_LARGE_BYTE, pj_activation_byte=PJ_SRAM_SMALL_BYTE,
           description="Alif Ensemble E3 high-performance core: Cortex-M55 (Helium) @ 400 MHz, 1 MB DTCM "
                       "(activations), 5.5 MB MRAM (code and weights)",
           sources=("Alif Semiconductor Ensemble E3 product brief / datasheet, https://alifsemi.com/"
                    "ensemble-e3-series/", "Cortex-M55 Technical Reference Manual (ARM 101051): dual-beat MVE, "
                    "128-bit vector instructions in two beats", HOROWITZ)),
    Device("rpi-zero2", "armv8", 512 * 1024 * 1024, None, 1.0e9, cycles_per_instruction=1.5,
           pj_per_cycle=PJ_INSTRUCTION / 1.5,
           pj_weight_byte=PJ_DRAM_BYTE, pj_activation_byte=PJ_SRAM_SMALL_BYTE,
           description="Raspberry Pi Zero 2 W (RP3A0): 4x Cortex-A53 @ 1 GHz, 512 MB LPDDR2, microSD storage",
           sources=("Raspberry Pi Zero 2 W product brief, https://datasheets.raspberrypi.com/rpizero2/"
                    "raspberry-pi-zero-2-w-product-brief.pdf", "Cortex-A53 TRM (ARM DDI 0500): in-order, dual-issue; "
                    "Advanced SIMD on a 64-bit datapath (128-bit ops take two cycles)", HOROWITZ)),
    Device("a76-phone", "armv8.2", 6 * 1024 ** 3, None, 2.42e9, cycles_per_instruction=0.5,
           pj_per_cycle=PJ_INSTRUCTION / 0.5,
           pj_weight_byte=PJ_DRAM_BYTE, pj_activation_byte=PJ_SRAM_SMALL_BYTE,
           description="Phone with Snapdragon 855 class big cores: Cortex-A76 (Kryo 485 Gold) @ 2.42 GHz, 6 GB "
                       "LPDDR4X",
           sources=("Qualcomm Snapdragon 855 product brief, https://www.qualcomm.com/products/snapdragon-855-mobile-"
                    "platform", "Arm Cortex-A76 Software Optimization Guide (ARM UAN 0035): 4-wide decode, out of "
                    "order, two 128-bit ASIMD/FP pipes", HOROWITZ)),
)}
"""The built-in boards; `host` is made on demand from this machine (host_device())."""

_KEYS = {"name", "target", "ram", "flash", "clock_mhz", "clock_hz", "cycles_per_instruction", "pj_fp32_mac",
         "pj_int8_mac", "pj_weight_byte", "pj_activation_byte", "pj_per_cycle", "description", "sources"}
_REQUIRED = ("target", "ram", "flash")


def host_device() -> Device:
    """This machine: target host, RAM from the OS, flash unbounded, clock from the CPU's maximum frequency."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = None
    return Device("host", "host", ram, None, _host_clock_hz(),
                  description="this machine: kernels are timed, not modelled",
                  sources=("RAM: sysconf(_SC_PHYS_PAGES); clock: cpufreq cpuinfo_max_freq or /proc/cpuinfo",
                           HOROWITZ))


def _host_clock_hz() -> float:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return float(f.read().strip()) * 1e3
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            found = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), re.M)
        if found:
            return max(float(v) for v in found) * 1e6
    except OSError:
        pass
    return 1e9


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: "str | int", where: str = "size") -> int:
    """1000, "256K", "1M", "1.5MB", "2GiB" -> bytes (K = 1024). Negative or unreadable sizes are errors."""
    if isinstance(text, bool):
        raise EdgeccError(f"bad size {text!r}", where=where, hint="write bytes or 256K / 1M / 1.5MB")
    if isinstance(text, (int, float)):
        if text < 0:
            raise EdgeccError(f"negative size {text}", where=where, hint="sizes are bytes >= 0")
        return int(text)
    match = _SIZE.match(str(text))
    if not match:
        hint = "sizes are bytes >= 0" if str(text).strip().startswith("-") else "write bytes or 256K / 1M / 1.5MB"
        raise EdgeccError(f"bad size '{text}'", where=where, hint=hint)
    scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * scale)


def load_device(spec: "str | os.PathLike | Device") -> Device:
    """A Device, a built-in name (BUILTIN_DEVICES, or "host" for this machine), or a .toml/.json board file."""
    if isinstance(spec, Device):
        return spec
    text = os.fspath(spec)
    if text == "host":
        return host_device()
    if text in BUILTIN_DEVICES:
        return BUILTIN_DEVICES[text]
    if text.lower().endswith((".toml", ".json")):
        return _load_file(text)
    raise EdgeccError(f"unknown device '{text}'", where="--device",
                      hint=f"use host, {', '.join(BUILTIN_DEVICES)} or a board file (.toml / .json)")


def _load_file(path: str) -> Device:
    if not os.path.isfile(path):
        raise EdgeccError("no such device file", where=path, hint="give a .toml or .json board description")
    try:
        if path.lower().endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise EdgeccError(f"cannot read the board description: {exc}", where=path) from None
    if not isinstance(data, dict):
        raise EdgeccError("a board description is a table of fields", where=path)
    return device_from_fields(data, where=path, default_name=os.path.splitext(os.path.basename(path))[0])


def device_from_fields(data: dict, where: str, default_name: str = "board") -> Device:
    """A Device from a file's fields: target, ram, flash (sizes or "unbounded"), clock_mhz or clock_hz, and the
    optional cost-model figures. Each problem names the field."""
    from edgecc.backends.targets import ALIASES, PRESETS

    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise EdgeccError(f"unknown field(s) {', '.join(unknown)}", where=where,
                          hint=f"the fields are {', '.join(sorted(_KEYS))}")
    for key in _REQUIRED:
        if key not in data:
            raise EdgeccError(f"missing field '{key}'", where=where, hint=_FIELD_HINTS[key])
    if "clock_mhz" not in data and "clock_hz" not in data:
        raise EdgeccError("missing field 'clock_mhz'", where=where, hint=_FIELD_HINTS["clock_mhz"])
    target = data["target"]
    if not isinstance(target, str) or (target != "host" and ALIASES.get(target, target) not in PRESETS):
        raise EdgeccError(f"unknown target {target!r} in field 'target'", where=where,
                          hint=f"use host or one of {', '.join(PRESETS)}")
    clock_key = "clock_mhz" if "clock_mhz" in data else "clock_hz"
    clock = _positive(data[clock_key], f"{where}: field '{clock_key}'") * (1e6 if clock_key == "clock_mhz" else 1)
    figures = {}
    for key in ("cycles_per_instruction", "pj_fp32_mac", "pj_int8_mac", "pj_weight_byte", "pj_activation_byte",
                "pj_per_cycle"):
        if key in data:
            figures[key] = _positive(data[key], f"{where}: field '{key}'")
    sources = data.get("sources", ())
    if isinstance(sources, str):
        sources = (sources,)
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) for s in sources):
        raise EdgeccError("field 'sources' must be a list of strings", where=where)
    return Device(str(data.get("name", default_name)), ALIASES.get(target, target),
                  _size_field(data["ram"], where, "ram"), _size_field(data["flash"], where, "flash"), clock,
                  description=str(data.get("description", "")), sources=tuple(sources), **figures)


_FIELD_HINTS = {
    "target": "e.g. target = \"cortex-m4\" (an edgecc target preset)",
    "ram": "e.g. ram = \"256K\" (bytes, or K/M/G; \"unbounded\" if RAM is no constraint)",
    "flash": "e.g. flash = \"1M\" (bytes, or K/M/G; \"unbounded\" if storage is no constraint)",
    "clock_mhz": "e.g. clock_mhz = 168 (or clock_hz)",
}


def _size_field(value, where: str, key: str) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "unbounded":
        return None
    return parse_size(value, where=f"{where}: field '{key}'")


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise EdgeccError(f"must be a positive number, got {value!r}", where=where)
    return float(value)



def target_for(device: Device, target: str | None) -> str:
    """The target to compile for: the device's, unless `target` (None or "host" mean "not given") names another
    one, which is an error."""
    from edgecc.backends.targets import ALIASES

    if target in (None, "host") or ALIASES.get(target, target) == device.target:
        return device.target
    raise EdgeccError(f"target '{target}' disagrees with device {device.name}, whose target is {device.target}",
                      where="--target", hint="drop --target (the device sets it) or give a board file with your target")
