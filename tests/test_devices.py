"""Device profiles: built-ins, board files (TOML and JSON) and the errors a bad board file gets."""

from __future__ import annotations

import json

import pytest

from edgecc.backends.targets import PRESETS
from edgecc.devices import BUILTIN_DEVICES, Device, load_device, parse_size
from edgecc.errors import EdgeccError


@pytest.mark.parametrize("name", [*BUILTIN_DEVICES, "host"])
def test_builtin_devices_are_valid(name):
    device = load_device(name)
    assert device.name == name
    assert device.target == "host" or device.target in PRESETS
    assert device.clock_hz > 0 and device.ram_bytes > 0
    assert device.flash_bytes is None or device.flash_bytes > 0
    assert device.sources, "every profile says where its figures come from"
    assert (device.cycles_per_instruction is None) == (name == "host")


def test_published_figures_of_the_issue():
    stm32 = load_device("stm32f4")
    assert (stm32.ram_bytes, stm32.flash_bytes, stm32.clock_hz, stm32.target) == (192 << 10, 1 << 20, 168e6, "cortex-m4")
    assert load_device("nrf52840").ram_bytes == 256 << 10
    assert load_device("rpi-zero2").target == "armv8" and load_device("a76-phone").target == "armv8.2"


@pytest.mark.parametrize("text, expected", [
    (1000, 1000), ("1000", 1000), ("256K", 262144), ("256k", 262144), ("1M", 1 << 20), ("1.5MB", 1572864),
    ("2GiB", 2 << 30), ("64 KB", 65536), (0, 0)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1", -5, "12Q", "", "K", "1..5M", True])
def test_parse_size_rejects(text):
    with pytest.raises(EdgeccError, match="size"):
        parse_size(text)


BOARD = {"target": "cortex-m4", "ram": "128K", "flash": "512K", "clock_mhz": 80,
         "cycles_per_instruction": 1.3, "sources": ["my datasheet"]}


def _toml(fields: dict) -> str:
    def value(v):
        return json.dumps(v)  # TOML strings, numbers and arrays of strings are written as in JSON
    return "".join(f"{k} = {value(v)}\n" for k, v in fields.items())


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_board_file(tmp_path, suffix):
    path = tmp_path / f"myboard{suffix}"
    path.write_text(_toml(BOARD) if suffix == ".toml" else json.dumps(BOARD))
    device = load_device(str(path))
    assert device == Device("myboard", "cortex-m4", 128 << 10, 512 << 10, 80e6, cycles_per_instruction=1.3,
                            sources=("my datasheet",))


def test_unbounded_flash(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({**BOARD, "flash": "unbounded"}))
    assert load_device(path).flash_bytes is None


@pytest.mark.parametrize("change, message", [
    ({"ram": None}, "missing field 'ram'"),
    ({"target": None}, "missing field 'target'"),
    ({"clock_mhz": None}, "missing field 'clock_mhz'"),
    ({"flash": "-1M"}, "field 'flash'.*size"),
    ({"ram": -4096}, "field 'ram'.*negative"),
    ({"target": "cortex-z9"}, "unknown target 'cortex-z9' in field 'target'"),
    ({"clock_mhz": 0}, "field 'clock_mhz'.*positive"),
    ({"cycles_per_instruction": "fast"}, "field 'cycles_per_instruction'.*positive"),
    ({"colour": "blue"}, "unknown field.*colour"),
])
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_bad_board_file_names_file_and_field(tmp_path, change, message, suffix):
    fields = {k: v for k, v in {**BOARD, **change}.items() if v is not None}
    path = tmp_path / f"bad{suffix}"
    path.write_text(_toml(fields) if suffix == ".toml" else json.dumps(fields))
    with pytest.raises(EdgeccError, match=message) as info:
        load_device(str(path))
    assert str(path) in str(info.value)


def test_unreadable_and_unknown(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("target = \n")
    with pytest.raises(EdgeccError, match="cannot read") as info:
        load_device(broken)
    assert str(broken) in str(info.value)
    with pytest.raises(EdgeccError, match="no such device file"):
        load_device(tmp_path / "absent.toml")
    with pytest.raises(EdgeccError, match="unknown device 'stm32f9'.*stm32f4"):
        load_device("stm32f9")
