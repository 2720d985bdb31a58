"""Bare-metal Cortex-M targets: the object links into firmware with arm-none-eabi-gcc (newlib, no OS), and the
firmware's size is reported. The model is the one of test_native_artifacts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edgecc.cli import main
from test_native_artifacts import EXAMPLE, _model

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
