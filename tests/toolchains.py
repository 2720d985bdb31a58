"""Whether this machine can run code for an ARM Linux target: its qemu-user and cross C compiler, named by the
target preset itself (installed by .ci/run). Tests skip, saying what is missing, when they are absent."""

from __future__ import annotations

import shutil

import pytest

from edgecc.backends.targets import PRESETS


def missing_tools(target: str) -> list[str]:
    preset = PRESETS[target]
    return [tool for tool in (preset.qemu, preset.cc) if tool and shutil.which(tool) is None]


def skip_unless_runnable(target: str) -> None:
    missing = missing_tools(target)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by .ci/run)")


def needs_tools(*tools: str) -> pytest.MarkDecorator:
    """A skipif mark for a test that needs these programs (e.g. arm-none-eabi-gcc, qemu-system-arm)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (installed by .ci/run)")


def needs_target(target: str) -> pytest.MarkDecorator:
    """A skipif mark for a parameter or test that runs code for `target` under qemu."""
    preset = PRESETS[target]
    return needs_tools(*(tool for tool in (preset.qemu, preset.cc) if tool))
