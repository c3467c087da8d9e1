"""A one-line progress bar for uploads, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """A one-line upload progress bar on a terminal; silent when ``stream`` is not a TTY."""

    def __init__(self, total: int, stream: TextIO | None = None, *, enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.clock = total, clock
        self.done, self.started, self.shown, self.drawn = 0, clock(), 0.0, False

    def reset(self) -> None:
        """Start again (a retried upload)."""
        self.done, self.started, self.shown = 0, self.clock(), 0.0

    def update(self, n: int) -> None:
        """Count ``n`` more bytes sent; redraw at most five times a second."""
        self.done += n
        now = self.clock()
        if self.enabled and (not self.drawn or now - self.shown >= 0.2
                             or self.done >= self.total):
            self.shown, self.drawn = now, True
            rate = self.done / max(now - self.started, 1e-6)
            pct = 100 * self.done // max(self.total, 1)
            bar = "#" * (pct // 4)
            self.stream.write(f"\r[{bar:<25}] {pct:3d}% {_size(self.done)}/{_size(self.total)}"
                              f" {_size(int(rate))}/s ")
            self.stream.flush()

    def finish(self) -> None:
        """End the line (when a bar was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError("unreachable")
