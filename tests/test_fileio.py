"""edgecc.fileio: outputs appear whole or not at all, with the permissions a compiler's outputs get."""

from __future__ import annotations

import os
import stat

import pytest

from edgecc.fileio import write_files


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_permissions_not_the_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        written = write_files({str(tmp_path / "m.o"): b"obj", str(tmp_path / "libm.so"): b"lib"})
    finally:
        os.umask(old)
    assert [open(p, "rb").read() for p in written] == [b"obj", b"lib"]
    assert mode(tmp_path / "m.o") == 0o644 and mode(tmp_path / "libm.so") == 0o755


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    class Boom(dict):
        def __getitem__(self, key):
            raise RuntimeError("boom")

    files = Boom({str(tmp_path / "a.o"): b"", str(tmp_path / "a.h"): b""})
    with pytest.raises(RuntimeError):
        write_files(files)
    assert os.listdir(tmp_path) == []
