"""Progress of a compile: one tqdm bar on stderr that only appears once the compile has run for a second, so small
models stay quiet and big ones (ResNet-18's code generation and LLVM) show where the time goes."""

from __future__ import annotations

import sys

from edgecc.passes.instruments import Instrument


class CompileProgress:
    """Steps of one compile: import, each pass, each node's kernel, LLVM. `enabled=None`: on when stderr is a
    terminal."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=1, delay=1.0, desc="edgecc", unit="step", file=sys.stderr, leave=False,
                             dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def expect(self, steps: int) -> None:
        """Announce `steps` more steps."""
        if self._bar is not None:
            self._bar.total += steps
            self._bar.refresh()

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PassProgress(Instrument):
    """A step of the bar per pass."""

    def __init__(self, progress: CompileProgress):
        self.progress = progress

    def after(self, pass_, module, result) -> None:
        self.progress.step(pass_.spelling())
