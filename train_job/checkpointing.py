"""Training checkpoints: spade_core's format (what serving loads) plus the training state.

    config.json, generator.safetensors, [encoder.safetensors], discriminator.safetensors
        spade_core's format; with EMA on, generator.safetensors holds the EMA weights (the
        exported model) and training/generator.safetensors the raw ones
    training/state.pt        optimisers, grad scaler, step, epoch, position in the epoch
    training/train_config.json   the run's TrainConfig, for reference

state.pt holds only tensors and plain containers, so it loads with ``weights_only=True``.

The best model by an evaluation metric (``checkpoint.best_by``), kept beside Ray's own
``checkpoint_*`` folders in the run directory by :class:`BestCheckpoint`::

    RUN_DIR/best/       spade_core's format (config.json, generator = EMA weights with EMA
                        on, [encoder], discriminator): what serving loads; no training/ state;
                        best/best.json: the record below as written with these weights
    RUN_DIR/best.json   {"format_version": 1, "metric": "fid", "value": 23.4, "lower_is_better": true,
                         "step": 4000, "epoch": 12, "checkpoint": "best", "eval": {every value of
                         that evaluation}, "split": "val", "num_images": 500, "generator": "ema",
                         "time": "2025-...Z"}
                        "checkpoint" is relative to the folder holding best.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spade_core.checkpoint import WEIGHT_FILES, incomplete, save_checkpoint, write_manifest
from spade_core.model import SpadeModel
from spade_core.runs import BEST_DIR, BEST_FILE, latest_in_run, read_best

from .config import LOWER_IS_BETTER

STATE_FILE = "training/state.pt"
RAW_GENERATOR = "training/generator.safetensors"
CONFIG_COPY = "training/train_config.json"
BEST_FORMAT_VERSION = 1
_BEST_TMP = ".best.tmp-"  # + pid: the next copy being written
_BEST_OLD = ".best.old"  # the previous copy, for the moment between the two renames


@dataclass
class TrainState:
    """Where training stands: ``step`` counts iterations over the whole run, ``epoch_step``
    iterations into ``epoch`` (the data position to skip to on resume)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def write_training_checkpoint(
    out: Path,
    *,
    model: SpadeModel,
    ema_generator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    train_config: dict[str, Any],
) -> Path:
    """``model`` holds the raw (unwrapped) networks; with EMA, the exported generator is the EMA one."""
    exported = model
    if ema_generator is not None:
        exported = SpadeModel(model.config, ema_generator, model.encoder, model.discriminator)
    save_checkpoint(exported, out)
    (out / "training").mkdir(exist_ok=True)
    if ema_generator is not None:
        save_file(_tensors(model.generator), str(out / RAW_GENERATOR))
    torch.save(
        {
            "state": asdict(state),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        out / STATE_FILE,
    )
    (out / CONFIG_COPY).write_text(json.dumps(train_config, indent=2) + "\n")
    write_manifest(out)  # last: it now lists the training state too
    return out


def read_training_checkpoint(
    path: Path,
    *,
    model: SpadeModel,
    ema_generator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
) -> TrainState:
    """Load every network, optimiser and the scaler in place; return the training state."""
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a training checkpoint (no {STATE_FILE}); to fine-tune from an exported "
                         "model, load its weights instead")
    gap = incomplete(path)
    if gap is not None:
        raise ValueError(f"{path} is an incomplete checkpoint ({gap}); resume from an earlier one")
    exported = {name: load_file(path / fname) for name, fname in WEIGHT_FILES.items() if (path / fname).is_file()}
    raw_generator = load_file(path / RAW_GENERATOR) if (path / RAW_GENERATOR).is_file() else exported["generator"]
    model.generator.load_state_dict(raw_generator)
    if ema_generator is not None:
        ema_generator.load_state_dict(exported["generator"])
    for name in ("encoder", "discriminator"):
        net = getattr(model, name)
        if net is not None:
            if name not in exported:
                raise ValueError(f"{path} has no {WEIGHT_FILES[name]}, which this run trains")
            net.load_state_dict(exported[name])
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved["optimizers"][name])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return TrainState(**saved["state"])


def unrecorded_checkpoint(run_dir: Path, recorded: str | None) -> Path | None:
    """A whole training checkpoint in ``run_dir`` newer than ``recorded`` (the newest one Ray Train
    knows of), or None.

    Ray Train records a checkpoint once its controller has handled the report, after the upload.
    A driver killed in between (the workers outlive it by a moment) leaves a checkpoint that is
    whole, by its manifest, but unknown to Ray, whose resume would then go back further than
    needed. The folders' names sort by time, so newer means written later on this run's course."""
    latest = latest_in_run(run_dir)
    if latest is None or not (latest / STATE_FILE).is_file():
        return None
    if recorded is not None and Path(recorded).name >= latest.name:
        return None
    return latest


def _tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


class BestCheckpoint:
    """Keeps ``RUN_DIR/best/`` and ``RUN_DIR/best.json``: the model that scored best by ``metric``.

    Why a copy rather than a pointer at one of Ray's ``checkpoint_*`` folders: Ray Train deletes
    all but the newest ``checkpoint.keep`` of those, and an evaluation need not fall on a
    checkpoint step. So rank 0 writes the evaluated weights themselves, from memory, into the run
    directory outside Ray's ``checkpoint_*`` names, where its retention never looks; training
    checkpoints and their retention are untouched. The copy is written to a temporary folder,
    then swapped in by two renames (best -> .best.old, tmp -> best), then best.json is replaced
    atomically: a reader never sees a half-written best/ (between the two renames best/ is briefly
    absent; a crash there is repaired at the next start). A resumed run reads best.json back, so
    a worse evaluation after a restart never replaces a better model found before it.
    """

    def __init__(self, run_dir: Path, metric: str) -> None:
        self.run_dir = run_dir
        self.metric = metric
        self.lower_is_better = LOWER_IS_BETTER[metric]
        self.value: float | None = None
        self.step: int | None = None
        run_dir.mkdir(parents=True, exist_ok=True)
        self._repair()
        previous = read_best(run_dir)
        if previous is not None and previous.get("metric") == metric and (run_dir / BEST_DIR).is_dir():
            self.value, self.step = float(previous["value"]), int(previous["step"])
        elif previous is not None:
            print(f"note: {run_dir / BEST_FILE} chose by {previous.get('metric')}; this run chooses by {metric} "
                  "and replaces it at its first evaluation", flush=True)

    def better(self, value: float | None) -> bool:
        """Strictly better than the best so far (None and NaN never are)."""
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.lower_is_better else value > self.value

    def offer(
        self,
        values: dict[str, float | None],
        *,
        step: int,
        epoch: int,
        model: SpadeModel,
        ema_generator: nn.Module | None,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Write the copy and best.json if ``values[metric]`` beats the best so far; True if it did."""
        value = values.get(self.metric)
        if not self.better(value):
            return False
        record = {
            "format_version": BEST_FORMAT_VERSION,
            "metric": self.metric,
            "value": value,
            "lower_is_better": self.lower_is_better,
            "step": step,
            "epoch": epoch,
            "checkpoint": BEST_DIR,
            "eval": values,
            **(details or {}),
            "generator": "ema" if ema_generator is not None else "raw",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(record, indent=2) + "\n"
        exported = SpadeModel(model.config, ema_generator if ema_generator is not None else model.generator,
                              model.encoder, model.discriminator)
        tmp = self.run_dir / f"{_BEST_TMP}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(exported, tmp)
        (tmp / BEST_FILE).write_text(text)  # travels with the weights: _repair rebuilds RUN_DIR/best.json from it
        best, old = self.run_dir / BEST_DIR, self.run_dir / _BEST_OLD
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
        _atomic_text(self.run_dir / BEST_FILE, text)
        self.value, self.step = float(value), step  # type: ignore[arg-type]
        return True

    def _repair(self) -> None:
        """Clear what an interrupted write left: a temporary copy, or the old copy mid-swap."""
        for leftover in self.run_dir.glob(f"{_BEST_TMP}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        best, old = self.run_dir / BEST_DIR, self.run_dir / _BEST_OLD
        if old.is_dir() and not best.exists():
            os.replace(old, best)  # stopped between the renames: back to the old copy
        shutil.rmtree(old, ignore_errors=True)
        inside = best / BEST_FILE
        if inside.is_file():  # stopped after the swap, before best.json: it describes the copy
            text = inside.read_text()
            path = self.run_dir / BEST_FILE
            if not path.is_file() or path.read_text() != text:
                _atomic_text(path, text)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
