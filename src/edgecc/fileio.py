"""Output files are written whole or not at all: to a temporary name beside the target, then renamed. They get the
permissions a compiler's outputs get (0666, or 0777 for a shared library, less the umask), not the temporary
file's private 0600."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_outputs(paths: list[str]) -> Iterator[list[str]]:
    """Yield temporary paths for `paths`; on success rename all of them into place, on error remove them."""
    temps = []
    try:
        for path in paths:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            temps.append(tmp)
            os.chmod(tmp, output_mode(path))
        yield temps
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.remove(tmp)


SHARED_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")


def output_mode(path: str) -> int:
    """0666 (0777 for a shared library, which the loader maps executable) less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if path.endswith(SHARED_LIBRARY_SUFFIXES) else 0o666) & ~mask


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    with atomic_outputs([path]) as (tmp,):
        write(tmp)


def write_files(files: dict[str, bytes]) -> list[str]:
    """Write every {path: bytes} entry, all of them or none; return the paths written."""
    paths = list(files)
    with atomic_outputs(paths) as temps:
        for tmp, path in zip(temps, paths):
            with open(tmp, "wb") as f:
                f.write(files[path])
    return paths


def json_bytes(data) -> bytes:
    """A report as written to disk: indented, keys sorted (so two runs diff cleanly), one trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
