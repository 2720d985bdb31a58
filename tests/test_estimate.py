"""Cost estimates: totals add up, sizes agree with an independent reader of the object, per-node measurements are
cached, and on ARM the per-node instruction counts add up to qemu's whole-program count."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import edgecc
from edgecc.errors import EdgeccError
from edgecc.estimate import elf_sections, estimate
from toolchains import needs_target, needs_tools

TINY = pathlib.Path(edgecc.__file__).parent / "models" / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def tiny():
    return edgecc.compile(str(TINY), opt_level=3)


def test_host_estimate_totals(tiny):
    est = estimate(tiny, "host", refresh=True)
    assert [o.node for o in est.ops] == [n.name or n.label for n in tiny.module.graph.nodes]
    assert est.flash_bytes == est.code_bytes + est.weights_bytes
    assert est.ram_bytes == est.arena_bytes + est.stack_bytes
    assert est.arena_bytes == tiny.report["arena_bytes"]
    assert est.weights_bytes >= tiny.report["weights_bytes"] > 0  # as stored: packed panels, plus small tables
    assert 0 < est.stack_bytes < 64 * 1024 and est.code_bytes > 0
    assert sum(o.macs for o in est.ops) == tiny.report["macs"]
    assert est.latency_ms == pytest.approx(sum(o.latency_ms for o in est.ops))
    assert est.energy_mj == pytest.approx(sum(o.energy_mj for o in est.ops))
    assert all(o.cycles >= 0 and o.instructions is None for o in est.ops) and est.latency_ms > 0
    data = est.as_dict()
    assert data["device"]["name"] == "host" and len(data["ops"]) == len(est.ops)


def test_host_figures_are_cached(tiny, monkeypatch):
    first = estimate(tiny, "host")
    import edgecc.estimate as module

    monkeypatch.setattr(module, "_host_node_ms", lambda *a: pytest.fail("measured again instead of cached"))
    again = estimate(tiny, "host")
    assert [o.cycles for o in again.ops] == [o.cycles for o in first.ops]


@pytest.mark.skipif(shutil.which("llvm-size") is None, reason="needs llvm-size")
def test_object_sections_match_llvm_size(tiny):
    path = pathlib.Path(tiny.native.name + ".o")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        obj = pathlib.Path(tmp) / path
        obj.write_bytes(tiny.native.obj)
        listing = subprocess.run(["llvm-size", "-A", str(obj)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("."):
            sizes[parts[0]] = int(parts[1])
    ours = elf_sections(tiny.native.obj)
    assert ours and all(sizes[name] == size for name, size in ours.items())


def test_energy_uses_the_device_figures(tiny):
    from dataclasses import replace

    from edgecc.devices import load_device

    host = load_device("host")
    base = estimate(tiny, host)
    doubled = estimate(tiny, replace(host, pj_fp32_mac=2 * host.pj_fp32_mac))
    macs = sum(o.macs for o in base.ops)
    assert doubled.energy_mj - base.energy_mj == pytest.approx(macs * host.pj_fp32_mac * 1e-9, rel=1e-6)


def test_unmeasurable_target_is_refused():
    from dataclasses import replace

    from edgecc.devices import load_device

    model = edgecc.compile(str(TINY), target="cortex-m55")
    board = replace(load_device("m55-board"), target="armv7em-unknown-none-eabihf")
    with pytest.raises(EdgeccError, match="no way to measure"):
        estimate(model, board)


@pytest.mark.slow
@needs_tools("arm-none-eabi-gcc", "qemu-system-arm")
def test_helium_estimate_under_qemu_system_arm():
    """m55-board: the firmware's per-node counts add up to less than the whole firmware's (newlib's start-up)."""
    import re
    import tempfile

    from edgecc.backends import insncount

    model = edgecc.compile(str(TINY), opt_level=3, device="m55-board")
    est = model.report["estimate"]
    assert est["instructions"] > 0 and "qemu-system-arm -M mps3-an547" in est["method"]
    assert sum(o["instructions"] for o in est["ops"]) == est["instructions"]
    with tempfile.TemporaryDirectory() as tmp:
        exe = insncount.firmware(model.module, model.native, None, tmp)
        run = subprocess.run(insncount.system_command(model.native.target, exe, insncount.whole_program_plugin()),
                             capture_output=True, text=True, check=True, timeout=120)
    whole = int(re.findall(r"insns: (\d+)", run.stdout + run.stderr)[-1])
    assert est["instructions"] < whole < est["instructions"] + 200_000


@pytest.mark.slow
@needs_target("armv8")
def test_arm_node_counts_add_up_to_the_whole_program(tiny):
    """The per-node counts (our plugin) against the shared whole-program counter: count(R=1) - count(R=0)."""
    import re
    import tempfile

    from edgecc.backends import insncount

    model = edgecc.compile(str(TINY), opt_level=3, target="armv8")
    est = estimate(model, "rpi-zero2", refresh=True)
    assert est.instructions > 0 and all(o.instructions is not None for o in est.ops)
    assert sum(o.instructions for o in est.ops) == est.instructions
    conv = [o for o in est.ops if o.macs]
    assert all(o.instructions > 0.25 * o.macs / 4 for o in conv)  # at least a 4-lane FMA per 4 MACs
    with tempfile.TemporaryDirectory() as tmp:
        exe = insncount.link(model.module, model.native, tmp)
        inputs = f"{tmp}/in.bin"
        rng = np.random.default_rng(0)
        insncount.write_inputs(model.module, {v.name: rng.standard_normal(v.type.shape).astype(np.float32)
                                              for v in model.module.graph.inputs}, inputs)
        whole = []
        for reps in (0, 1):
            run = subprocess.run(insncount.qemu_command(model.module, model.native, exe, inputs, reps,
                                                        insncount.whole_program_plugin()),
                                 capture_output=True, text=True, check=True)
            whole.append(int(re.findall(r"insns: (\d+)", run.stderr)[-1]))
    assert est.instructions == pytest.approx(whole[1] - whole[0], rel=0.01)
    assert est.latency_ms == pytest.approx(est.instructions * 1.5 / 1e9 * 1e3, rel=1e-9)


@pytest.mark.slow
@needs_target("armv7")
def test_cortex_m4_estimate_under_qemu_arm(tiny):
    model = edgecc.compile(str(TINY), opt_level=3, target="cortex-m4")
    est = estimate(model, "stm32f4", refresh=True)
    assert est.instructions > 0 and "code for cortex-m4" in est.method
    assert est.fits == {"flash": True, "ram": True}


def test_compile_with_device_reports_the_estimate():
    plain = edgecc.compile(str(TINY))
    assert not {"flash_bytes", "ram_bytes", "latency_ms", "energy_mj", "estimate"} & set(plain.report)
    compiled = edgecc.compile(str(TINY), device="host")
    report = compiled.report
    assert report["device"] == "host" and report["target"] == "host"
    est = report["estimate"]
    assert report["flash_bytes"] == est["code_bytes"] + est["weights_bytes"]
    assert report["ram_bytes"] == est["arena_bytes"] + est["stack_bytes"]
    assert report["latency_ms"] == pytest.approx(sum(o["latency_ms"] for o in est["ops"]))
    assert report["energy_mj"] > 0


def test_device_sets_the_target_and_a_different_target_is_refused():
    with pytest.raises(EdgeccError, match="target 'armv8' disagrees with device stm32f4"):
        edgecc.compile(str(TINY), target="armv8", device="stm32f4")


def test_cli_estimate(tmp_path, capsys):
    from edgecc.cli import main

    out = tmp_path / "est.json"
    assert main(["estimate", str(TINY), "--device", "host", "-O3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flash" in text and "latency" in text and "device host" in text
    import json

    data = json.loads(out.read_text())
    assert data["flash_bytes"] == data["code_bytes"] + data["weights_bytes"] and data["ops"]


def test_cli_estimate_errors(tmp_path, capsys):
    from edgecc.cli import main

    out = tmp_path / "est.json"
    with pytest.raises(SystemExit) as info:
        main(["estimate", str(TINY)])
    assert info.value.code == 2
    board = tmp_path / "board.toml"
    board.write_text('target = "cortex-m4"\nram = "-1K"\nflash = "1M"\nclock_mhz = 80\n')
    assert main(["estimate", str(TINY), "--device", str(board), "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{board}: field 'ram'" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("line, size", [
    ("  401000:      pushq   %rbp", 8),
    ("  401004:      subq    $0x1a8, %rsp", 0x1a8),
    ("  10:   stp     x29, x30, [sp, #-96]!", 96),
    ("  14:   sub     sp, sp, #416", 416),
    ("  18:   sub     sp, sp, #1, lsl #12", 4096),
    ("  2:    push    {r4, r5, r6, r7, lr}", 20),
    ("  4:    vpush   {d8, d9, d10}", 24),
    ("  8:    sub.w   sp, sp, #1024", 1024),
    ("  a:    sub     sp, #16", 16),
    ("  c:    ldr     r0, [sp, #16]", 0),
])
def test_prologue_frame_steps(line, size):
    """Frames are read from prologues as llvm-objdump prints them (x86-64 AT&T, AArch64, Thumb-2)."""
    from edgecc.estimate import _frame_step

    assert _frame_step(line) == size


@needs_target("armv7")
def test_sizes_are_for_the_device_target_whatever_the_model_was_built_for(tiny):
    """A host-built model estimated on the M4 board: flash and stack are read from code generated for the M4."""
    on_board = edgecc.compile(str(TINY), opt_level=3, target="cortex-m4")
    from edgecc.estimate import object_sizes

    est = estimate(tiny, "stm32f4")
    assert (est.code_bytes, est.weights_bytes) == object_sizes(on_board.native.obj)


def test_cli_compile_with_device_prints_the_estimate(tmp_path, capsys):
    from edgecc.cli import main

    assert main([str(TINY), "--device", "host", "-o", str(tmp_path / "m")]) == 0
    assert "edgecc: on host: flash " in capsys.readouterr().out
