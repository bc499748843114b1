"""A one-line progress bar on a terminal, fed by the install pipeline's callback."""

from __future__ import annotations

import time
from typing import TextIO

from updater.install import Progress

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class TerminalProgress:
    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self._phase: str | None = None
        self._started = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.phase != self._phase:
            if self._phase is not None:
                self.stream.write("\n")
            self._phase, self._started = p.phase, now
        fraction = p.done / p.total if p.total else 1.0
        filled = int(self.width * fraction)
        rate = p.done / max(now - self._started, 1e-6)
        self.stream.write(
            f"\r{p.phase:9} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%} "
            f"{human(p.done)} / {human(p.total)}  {human(rate)}/s   "
        )
        self.stream.flush()

    def finish(self) -> None:
        if self._phase is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._phase = None
