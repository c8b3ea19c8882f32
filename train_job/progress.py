"""A minimal progress line for long CLI loops: done / total, rate, ETA.

On a terminal the line redraws in place (``\\r``); in a log (not a TTY) a full line is
printed every ``interval`` seconds so the log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        unit: str = "items",
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = interval if interval is not None else (0.1 if self.tty else 10.0)
        self._start = time.monotonic()
        self._base = 0  # counted via skip(): excluded from the rate
        self._last_draw = float("-inf")
        self._line_open = False
        self._drawn = -1  # `done` when last drawn

    def skip(self, n: int) -> None:
        """Count ``n`` items done earlier (a resumed run) without crediting them to the rate."""
        self.done += n
        self._base += n

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.interval:
            self._draw(now)

    def write(self, message: str) -> None:
        """Print a message line without garbling the in-place progress line."""
        if self._line_open:
            self.stream.write("\r\033[K")
            self._line_open = False
        self.stream.write(message + "\n")
        self.stream.flush()
        if self.tty:
            self._last_draw = float("-inf")  # bring the progress line back on the next advance

    def close(self) -> None:
        if self.enabled and self.done != self._drawn:
            self._draw(time.monotonic())
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._drawn = self.done
        elapsed = now - self._start
        fresh = self.done - self._base
        rate = fresh / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        line = f"{self.label}{self.done}/{self.total} {self.unit} ({pct:.1f}%) {rate:.1f}/s ETA {eta}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._line_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"
