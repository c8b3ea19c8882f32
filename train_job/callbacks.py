"""Callbacks: what tests, benchmarks and drills need from a training run, kept out of the loop.

A callback is handed to ``build_trainer(cfg, callbacks=[...])``; it travels to every worker
with the loop's config (so it must pickle) and is called by each rank's
:class:`~train_job.trainer.Trainer`:

- ``on_step_start(trainer)`` before each iteration (``trainer.state.step`` iterations done);
- ``stop(trainer)`` after each: True ends the run there, as a kill at a step boundary would
  (no extra checkpoint; a rerun resumes from the last one);
- ``finish(trainer)`` after each: True ends the run as finished, with a final checkpoint.
  Rank 0's answer is broadcast, so every rank stops at the same step;
- ``on_train_end(trainer)`` when the epochs are done.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import torch

from spade_core import SpadeModel

from .checkpointing import TrainState


class Trainer(Protocol):
    """What callbacks see of a :class:`train_job.trainer.Trainer` (which imports this module)."""

    rank: int
    world: int
    run_dir: Path
    model: SpadeModel
    state: TrainState


class Callback:
    """The hooks, each doing nothing by default."""

    def on_step_start(self, trainer: Trainer) -> None:
        pass

    def stop(self, trainer: Trainer) -> bool:
        return False

    def finish(self, trainer: Trainer) -> bool:
        return False

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class StopAtStep(Callback):
    """End the run after ``step`` iterations, keeping only the checkpoints it wrote on schedule
    (tests of resume: the rerun continues from there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def stop(self, trainer: Trainer) -> bool:
        return trainer.state.step >= self.step


class TimeBudget(Callback):
    """Finish (with a checkpoint) once ``seconds`` have passed since the run started, by rank 0's
    clock (benchmarks that train for a fixed time: ``bench/learn.py``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None

    def on_step_start(self, trainer: Trainer) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def finish(self, trainer: Trainer) -> bool:
        return self.started is not None and time.monotonic() - self.started > self.seconds


class KillWorkerOnce(Callback):
    """The last rank's process exits abruptly before iteration ``step`` + 1, once per run (a
    marker file in the run directory remembers it): Ray Train's worker-failure recovery, drilled."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, trainer: Trainer) -> None:
        if trainer.state.step != self.step or trainer.rank != trainer.world - 1:
            return
        marker = trainer.run_dir / ".fault_injected"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        os._exit(1)


class SaveNormStats(Callback):
    """Each rank saves its generator's batch-norm running statistics to ``DIR/rank{r}.pt`` at the
    end (tests: synced batch norm leaves the same statistics on every rank)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = str(directory)

    def on_train_end(self, trainer: Trainer) -> None:
        stats = {k: v for k, v in trainer.model.generator.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        torch.save(stats, Path(self.directory) / f"rank{trainer.rank}.pt")
