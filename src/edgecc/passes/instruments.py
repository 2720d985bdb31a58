"""Instruments watch a pipeline run: timing, printing the IR after passes, dumping it to files."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from edgecc.ir.core import Module


class Instrument:
    """Hooks called by the PassManager around each pass."""

    def before(self, pass_, module: Module) -> None:
        pass

    def after(self, pass_, module: Module, result) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class TimePasses(Instrument):
    """--time-passes: wall time per pass, printed as a table when the pipeline ends."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    rows: list[tuple[str, float]] = field(default_factory=list)
    _start: float = 0.0

    def before(self, pass_, module):
        self._start = time.perf_counter()

    def after(self, pass_, module, result):
        self.rows.append((pass_.spelling(), time.perf_counter() - self._start))

    def finish(self):
        total = sum(t for _, t in self.rows) or 1e-12
        print("===-- edgecc pass timing --===", file=self.stream)
        print(f"{'seconds':>10} {'%':>6}  pass", file=self.stream)
        for name, seconds in self.rows:
            print(f"{seconds:10.4f} {100 * seconds / total:6.1f}  {name}", file=self.stream)
        print(f"{total:10.4f} {100.0:6.1f}  total", file=self.stream)


@dataclass
class PrintAfter(Instrument):
    """--print-after-all / --print-after=NAME: print the IR after matching passes."""

    names: frozenset[str] | None = None  # None: after every pass
    stream: TextIO = field(default_factory=lambda: sys.stderr)

    def after(self, pass_, module, result):
        if self.names is None or pass_.name in self.names:
            from edgecc.ir.printer import print_module

            print(f"// -----// IR after {pass_.spelling()} //----- //", file=self.stream)
            print(print_module(module, large_constants="elide"), file=self.stream)


@dataclass
class DumpIR(Instrument):
    """--dump-ir=DIR: write the IR after each pass to DIR/NN-pass-name.eir."""

    directory: str
    _count: int = 0

    def after(self, pass_, module, result):
        from edgecc.ir.printer import print_module

        os.makedirs(self.directory, exist_ok=True)
        self._count += 1
        path = os.path.join(self.directory, f"{self._count:02d}-{pass_.name}.eir")
        with open(path, "w") as f:
            f.write(print_module(module, large_constants="elide"))
