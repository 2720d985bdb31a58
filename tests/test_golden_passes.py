"""Golden pass tests: each tests/golden/*.eir has a RUN line and CHECK lines, checked by the filecheck package."""

import pathlib
import shlex
import subprocess
import sys

import pytest

GOLDEN = sorted((pathlib.Path(__file__).parent / "golden").glob("*.eir"))


def _run_line(path: pathlib.Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith("// RUN:"):
            args = shlex.split(line[len("// RUN:"):].replace("%s", str(path)))
            assert args[0] == "edgecc-opt", "golden RUN lines call edgecc-opt"
            return [sys.executable, "-m", "edgecc.opt_cli", *args[1:]]
    raise AssertionError(f"{path.name} has no RUN line")


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden(path):
    produced = subprocess.run(_run_line(path), capture_output=True, text=True)
    assert produced.returncode == 0, produced.stderr
    checked = subprocess.run([sys.executable, "-m", "filecheck", str(path)], input=produced.stdout,
                             capture_output=True, text=True)
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}\n--- produced ---\n{produced.stdout}"
