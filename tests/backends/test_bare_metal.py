"""Bare-metal Cortex-M targets: the object links into firmware with arm-none-eabi-gcc (newlib, no OS), the
firmware's size is reported, and it runs under qemu-system-arm (MPS2-AN386 for Cortex-M4, MPS3-AN547 for
Cortex-M55) with semihosting, printing outputs that must match onnxruntime (rtol 1e-6: the same float32 operations,
one rounding each). The model is the one of test_native_artifacts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edgecc.cli import main
import numpy as np

from test_native_artifacts import EXAMPLE, _expected, _model

BOARDS = {"cortex-m4": ("mps2-an386", "0x00400000"), "cortex-m55": ("mps3-an547", "0x20080000")}

FLAGS = {
    "cortex-m4": ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"],
    "cortex-m55": ["-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"],
}


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs gcc-arm-none-eabi and libnewlib-arm-none-eabi (installed by .ci/run)")
@pytest.mark.parametrize("target", sorted(FLAGS))
def test_firmware_links_and_is_sized(tmp_path, target, capsys):
    model = _model(tmp_path / "m.onnx")
    assert main([str(model), "--runtime", "native", "--target", target, "-o", str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "m.onnx") == ["libmodel.a", "model.h", "model.o"]
    firmware = tmp_path / "fw.elf"
    subprocess.run(["arm-none-eabi-gcc", *FLAGS[target], "--specs=nosys.specs", "-O2", f"-I{tmp_path}",
                    str(EXAMPLE / "main.c"), str(tmp_path / "libmodel.a"), "-o", str(firmware)],
                   check=True, capture_output=True)
    sizes = subprocess.run(["arm-none-eabi-size", str(tmp_path / "model.o"), str(firmware)], check=True,
                           capture_output=True, text=True).stdout
    with capsys.disabled():
        print(f"\n{target}:\n{sizes}")
    text, data, bss = (int(v) for v in sizes.splitlines()[1].split()[:3])
    assert text > 0


def _semihosting_firmware(folder, target: str):
    """Link examples/c/main.c with the Cortex-M startup example and folder/libmodel.a into folder/fw.elf."""
    firmware = folder / "fw.elf"
    subprocess.run(["arm-none-eabi-gcc", *FLAGS[target], "--specs=rdimon.specs", "-O2", f"-I{folder}",
                    f"-DSTACK_TOP={BOARDS[target][1]}", str(EXAMPLE / "cortex-m" / "startup.c"), str(EXAMPLE / "main.c"),
                    str(folder / "libmodel.a"), "-Wl,--section-start=.vectors=0x0", "-o", str(firmware)],
                   check=True, capture_output=True)
    return firmware


def _run_on_board(target: str, firmware, input_file=None):
    """Boot the firmware on the target's MPS board in qemu-system-arm; main's argv[1] is `input_file`."""
    config = "enable=on,target=native" + (f",arg=fw,arg={input_file}" if input_file else "")
    run = subprocess.run(["qemu-system-arm", "-M", BOARDS[target][0], "-cpu", target, "-nographic",
                          "-semihosting-config", config, "-kernel", str(firmware)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-300:] + run.stderr[-300:]
    return run


def run_on_cortex_m4(folder, model, x: np.ndarray, *options: str) -> np.ndarray:
    """Compile the ONNX `model` with the CLI (and `options`) for cortex-m4, link it into the semihosting firmware
    and run it on `x` (float32) under qemu-system-arm; the printed outputs, flat."""
    import onnx

    onnx.save(model, folder / "m.onnx")
    x.astype(np.float32).tofile(folder / "input.bin")
    assert main([str(folder / "m.onnx"), *options, "--target", "cortex-m4", "-o", str(folder / "model")]) == 0
    run = _run_on_board("cortex-m4", _semihosting_firmware(folder, "cortex-m4"), folder / "input.bin")
    return np.array([float(v) for v in run.stdout.split()], np.float32)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by .ci/run)")
@pytest.mark.parametrize("target", sorted(FLAGS))
def test_firmware_runs_under_qemu_system_arm(tmp_path, target):
    model = _model(tmp_path / "m.onnx")
    assert main([str(model), "--runtime", "native", "--target", target, "-o", str(tmp_path / "model")]) == 0
    run = _run_on_board(target, _semihosting_firmware(tmp_path, target))
    got = np.array([float(v) for v in run.stdout.split()], np.float32).reshape(1, 10, 3)
    np.testing.assert_allclose(got, _expected(model), rtol=1e-6)


# (target, model): the tiny shared models whose firmware fits the board's boot memory in the default layout
# (MPS2-AN386: 4 MB at address 0; MPS3-AN547: 512 KB ITCM, too small for mlp_mnist's 941 KB of weights, which a
# real board keeps in flash with its own linker script).
TINY_RUNS = [("cortex-m4", "lenet5"), ("cortex-m4", "mlp_mnist"), ("cortex-m55", "lenet5")]


@pytest.mark.shared
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by .ci/run)")
@pytest.mark.parametrize("target, name", TINY_RUNS)
def test_tiny_shared_models_run_on_cortex_m(shared_dir, tmp_path, target, name, capsys):
    """Max relative error vs PyTorch's stored output <= 1e-4 (the bound of the native shared-model tests)."""
    ref = np.load(shared_dir / "models" / f"{name}.ref.npz")
    ref["input"].astype(np.float32).tofile(tmp_path / "input.bin")
    assert main([str(shared_dir / "models" / f"{name}.onnx"), "-O3", "--target", target,
                 "-o", str(tmp_path / "model")]) == 0
    firmware = _semihosting_firmware(tmp_path, target)
    sizes = subprocess.run(["arm-none-eabi-size", str(firmware)], capture_output=True, text=True, check=True).stdout
    with capsys.disabled():
        print(f"\n{name} on {target}:\n{sizes}")
    run = _run_on_board(target, firmware, tmp_path / "input.bin")
    got = np.array([float(v) for v in run.stdout.split()], np.float32)
    expected = ref["output"].reshape(-1)
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-4


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by .ci/run)")
def test_int8_model_runs_on_cortex_m4(shared_dir, tmp_path):
    """digits_cnn quantised to int8 (integer kernels in plain C-like code on Cortex-M4) against the same int8 graph in
    edgecc's reference interpreter (its ops are checked against onnxruntime's QDQ models in test_lower_qdq): within
    two output steps (fixed-point requantisation rounds ties up where the references round half to even)."""
    import edgecc

    data = shared_dir / "data"
    model, calib = data / "digits_cnn.onnx", data / "digits_cnn_calib.npz"
    if not model.is_file():
        pytest.skip(f"{data} holds no digits_cnn.onnx")
    x = np.load(data / "digits_cnn_test.npz")["input"][0]
    x.astype(np.float32).tofile(tmp_path / "input.bin")
    assert main([str(model), "-O3", "--target", "cortex-m4", "--quantize", "int8", "--calibration", str(calib),
                 "-o", str(tmp_path / "model")]) == 0
    run = _run_on_board("cortex-m4", _semihosting_firmware(tmp_path, "cortex-m4"), tmp_path / "input.bin")
    got = np.array([float(v) for v in run.stdout.split()], np.float32)
    reference = edgecc.compile(str(model), opt_level=3, quantize="int8", calibration=str(calib), runtime="reference")
    expected = reference.run([x])[0].reshape(-1)
    step = float(np.asarray(reference.module.graph.outputs[0].producer.inputs[1].const).reshape(-1)[0])
    assert np.max(np.abs(got - expected)) <= 2 * step + 1e-6
