"""Training observability: a console line, ``metrics.jsonl``, Prometheus, TensorBoard, sample grids.

Only rank 0 exports. The Prometheus endpoint is a plain ``prometheus_client`` HTTP server
inside the rank-0 worker (metrics created in a worker do not reach Ray's own exporter).

TensorBoard (``tensorboardX``, installed with Ray Train) writes under ``RUN_DIR/tensorboard/``:
scalars ``loss/<term>``, ``train/images_per_s``, ``train/step_s``, ``train/data_wait_s``,
``train/lr_g``, ``train/lr_d``, ``eval/<value>`` (fid, kid, kid_std, miou, pixel_accuracy),
``eval/seconds``, and images ``samples/train`` (the batch's grid) and ``samples/eval`` (the
fixed validation subset's). A run resumed from step S hides the events of steps after S
written before the restart, so steps trained again after a failure are not shown twice.

Evaluation records in ``metrics.jsonl`` are lines of their own: ``{"step", "epoch", "eval":
{...}, "eval_s", "eval_images", "best", "time"}``; the per-step records have no ``eval`` key.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from spade_core.preprocess import to_uint8, to_unit_range
from spade_core.semantics import ClassInfo, colorize

_PROM: dict[str, Any] = {}


def start_prometheus(port: int, host: str) -> bool:
    """Serve the training series on ``host:port``; False (with a warning) if the port is taken."""
    import prometheus_client as prom

    if not _PROM:
        registry = prom.CollectorRegistry()
        _PROM.update(
            registry=registry,
            steps=prom.Counter("spade_train_steps_total", "Training iterations completed", registry=registry),
            images=prom.Counter("spade_train_images_total", "Training images consumed (all workers)", registry=registry),
            loss=prom.Gauge("spade_train_loss", "Latest loss term value", ["term"], registry=registry),
            rate=prom.Gauge("spade_train_images_per_second", "Training throughput, all workers", registry=registry),
            step_seconds=prom.Histogram(
                "spade_train_step_seconds", "Wall time of one iteration", registry=registry,
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            data_wait=prom.Histogram(
                "spade_train_data_wait_seconds", "Time waiting for the next batch", registry=registry,
                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            ),
            lr=prom.Gauge("spade_train_learning_rate", "Current learning rate", ["network"], registry=registry),
            epoch=prom.Gauge("spade_train_epoch", "Current epoch (0-based)", registry=registry),
            workers=prom.Gauge("spade_train_workers", "Training workers in the group", registry=registry),
            eval=prom.Gauge(
                "spade_train_eval", "Latest evaluation during training (fid, kid, miou, pixel_accuracy)", ["metric"],
                registry=registry,
            ),
        )
    try:
        prom.start_http_server(port, addr=host, registry=_PROM["registry"])
    except OSError as exc:
        print(f"warning: Prometheus metrics not served on {host}:{port}: {exc}", flush=True)
        return False
    return True


# What Prometheus shows of an evaluation (kid_std stays in metrics.jsonl and TensorBoard)
PROM_EVAL_VALUES = ("fid", "kid", "miou", "pixel_accuracy")
TENSORBOARD_DIR = "tensorboard"


def _step_of(line: str) -> int | None:
    """A record's step; None for a line a kill cut off."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _is_loss(key: str) -> bool:
    return key.startswith(("G_", "D_", "KLD"))


class MetricsLog:
    """Per-step and evaluation records to ``metrics.jsonl`` and the console; Prometheus when
    started; TensorBoard event files when asked (``resume_step``: where a resumed run restarts)."""

    def __init__(self, run_dir: Path, *, prometheus: bool, tensorboard: bool = False, resume_step: int = 0) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_step > 0:
            self._drop_after(resume_step)
        self.prometheus = prometheus and bool(_PROM)
        self._last_print = 0.0
        self.writer: Any = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as exc:
                print(f"warning: no TensorBoard event files: {exc} (pip install tensorboardX)", flush=True)
            else:
                # resumed from step S: events of steps > S from before the restart are hidden (trained again)
                self.writer = SummaryWriter(
                    str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step > 0 else None, flush_secs=30
                )

    def _drop_after(self, step: int) -> None:
        """Resumed at ``step``: records of later steps (trained again now) leave the log, as
        TensorBoard's purge_step hides their events, so each step appears once."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)
            print(f"metrics.jsonl: dropped {len(lines) - len(kept)} record(s) of steps after {step} (trained again) "
                  "or cut off", flush=True)

    def record(self, record: dict[str, Any], *, images: int, step_seconds: float, data_wait: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if _is_loss(key):
                    self.writer.add_scalar(f"loss/{key}", value, step)
            for key in ("images_per_s", "step_s", "data_wait_s", "lr_g", "lr_d"):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        if self.prometheus:
            _PROM["steps"].inc()
            _PROM["images"].inc(images)
            for key, value in record.items():
                if _is_loss(key):
                    _PROM["loss"].labels(term=key).set(value)
            _PROM["rate"].set(record["images_per_s"])
            _PROM["step_seconds"].observe(step_seconds)
            _PROM["data_wait"].observe(data_wait)
            _PROM["lr"].labels(network="generator").set(record["lr_g"])
            _PROM["lr"].labels(network="discriminator").set(record["lr_d"])
            _PROM["epoch"].set(record["epoch"])
            _PROM["workers"].set(record["workers"])

    def record_eval(self, record: dict[str, Any]) -> None:
        """An evaluation: ``record["eval"]`` maps fid, kid, kid_std, miou, pixel_accuracy (those
        computed) to floats, or None where a value could not be computed."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step, values = record["step"], record["eval"]
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"eval/{key}", value, step)
            self.writer.add_scalar("eval/seconds", record["eval_s"], step)
            self.writer.flush()  # evaluations are rare and what one looks for
        if self.prometheus:
            for key in PROM_EVAL_VALUES:
                if key in values:
                    _PROM["eval"].labels(metric=key).set(float("nan") if values[key] is None else values[key])
        shown = "  ".join(f"{k} {'n/a' if v is None else f'{v:.4g}'}" for k, v in values.items())
        best = " (new best)" if record.get("best") else ""
        print(f"eval step {step}: {shown} | {record['eval_images']} images in {record['eval_s']:.1f}s{best}", flush=True)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 grid as a TensorBoard image."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def print_line(self, record: dict[str, Any]) -> None:
        losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if _is_loss(k))
        print(
            f"epoch {record['epoch']} step {record['step']} | {losses} | {record['images_per_s']:.1f} img/s "
            f"step {record['step_s']:.2f}s data {record['data_wait_s']:.3f}s | lr G {record['lr_g']:.2e} D {record['lr_d']:.2e}",
            flush=True,
        )


def sample_grid(
    labels: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, classes: ClassInfo, *, max_rows: int = 4
) -> np.ndarray:
    """An (H, W, 3) uint8 image with one row per example: colourised label | generated | real
    (images in [-1, 1], labels raw ids)."""
    n = min(max_rows, labels.shape[0])
    colors = to_unit_range(colorize(labels[:n].cpu(), classes))
    rows = [torch.cat([colors[i], fake[i].float().cpu(), real[i].float().cpu()], dim=2) for i in range(n)]
    return np.ascontiguousarray(to_uint8(torch.cat(rows, dim=1)).permute(1, 2, 0).numpy())


def save_grid(path: Path, grid: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 grid as a PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path


def save_sample_grid(
    path: Path, labels: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, classes: ClassInfo, *, max_rows: int = 4
) -> Path:
    """A PNG with one row per example: colourised label | generated | real."""
    return save_grid(path, sample_grid(labels, fake, real, classes, max_rows=max_rows))


class Throughput:
    """Images/s over the recent window of steps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> float:
        self.images += images
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
