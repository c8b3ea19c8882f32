"""What a person running ``spade-train`` sees: the run's own messages and a progress bar for
the steps, not Ray's internals.

Rank 0 copies what it prints to ``RUN_DIR/console.log`` (:func:`tee_to`); the driver follows
that file (:func:`follow`), prints its messages and draws the step lines as one progress bar.
Ray's own output (worker and actor logs, Ray Data's plans, Train's controller) then stays in
Ray's session log folder and the driver's ``RUN_DIR/ray-driver.log``, whose paths are printed.
This needs the run directory on a disk the driver sees (local storage, a local Ray); else the
CLI shows Ray's output as before.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .progress import Progress

CONSOLE_FILE = "console.log"
_STEP_LINE = re.compile(r"^epoch \d+ step (\d+) \| (.*?) \|")


class _Tee:
    """A text stream writing to two others (rank 0's stdout and its console.log)."""

    def __init__(self, first: TextIO, second: TextIO) -> None:
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.first.write(text)
        self.second.write(text)
        return len(text)

    def flush(self) -> None:
        self.first.flush()
        self.second.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the first stream's
        return getattr(self.first, name)


def tee_to(run_dir: Path) -> None:
    """From now on, this process's stdout also goes to ``run_dir/console.log`` (line-buffered)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / CONSOLE_FILE).open("a", buffering=1)
    sys.stdout = _Tee(sys.stdout, log)  # type: ignore[assignment]


class _Shown:
    """What the block of :func:`follow` may tell it: the step the run ended at."""

    def __init__(self) -> None:
        self.final: int | None = None

    def reached(self, step: int | None) -> None:
        self.final = step


@contextlib.contextmanager
def follow(run_dir: Path, *, total: int, every: int, stream: TextIO | None = None, poll_s: float = 0.5) -> Iterator[_Shown]:
    """While the block runs, show ``run_dir/console.log`` as it grows: messages as lines, the
    step lines (one per ``every`` steps) as a progress bar over ``total`` steps with the latest
    losses; the bar ends at the step the block reports with ``reached`` (logging may skip the
    last steps)."""
    stream = stream or sys.stdout
    path = run_dir / CONSOLE_FILE
    start = path.stat().st_size if path.exists() else 0  # a rerun shows only its own lines
    progress = Progress(total, label="training ", unit="steps", stream=stream)
    stop = threading.Event()
    state = {"offset": start, "first": None, "partial": ""}

    def drain() -> None:
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(state["offset"])
            data = f.read()
        state["offset"] += len(data)
        text = state["partial"] + data.decode("utf-8", errors="replace")
        *lines, state["partial"] = text.split("\n")
        for line in lines:
            m = _STEP_LINE.match(line)
            if m is None:
                if line.strip():
                    progress.write(line)
                continue
            step = int(m.group(1))
            if state["first"] is None:  # a resumed run starts past 0: those steps are not credited to the rate
                state["first"] = step
                progress.skip(max(step - every, 0))
            progress.label = f"training ({m.group(2)}) "
            progress.advance(step - progress.done)

    def run() -> None:
        while not stop.wait(poll_s):
            drain()

    thread = threading.Thread(target=run, name="console-follow", daemon=True)
    thread.start()
    shown = _Shown()
    try:
        yield shown
    finally:
        stop.set()
        thread.join()
        drain()
        if shown.final is not None and shown.final > progress.done:
            progress.advance(shown.final - progress.done)
        progress.close()
