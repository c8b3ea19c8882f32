"""Training observability: a console line, ``metrics.jsonl``, Prometheus, sample grids.

Only rank 0 exports. The Prometheus endpoint is a plain ``prometheus_client`` HTTP server
inside the rank-0 worker (metrics created in a worker do not reach Ray's own exporter).
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
        )
    try:
        prom.start_http_server(port, addr=host, registry=_PROM["registry"])
    except OSError as exc:
        print(f"warning: Prometheus metrics not served on {host}:{port}: {exc}", flush=True)
        return False
    return True


class MetricsLog:
    """Per-step records to ``metrics.jsonl`` and the console; Prometheus when started."""

    def __init__(self, run_dir: Path, *, prometheus: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.prometheus = prometheus and bool(_PROM)
        self._last_print = 0.0

    def record(self, record: dict[str, Any], *, images: int, step_seconds: float, data_wait: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.prometheus:
            _PROM["steps"].inc()
            _PROM["images"].inc(images)
            for key, value in record.items():
                if key.startswith(("G_", "D_", "KLD")):
                    _PROM["loss"].labels(term=key).set(value)
            _PROM["rate"].set(record["images_per_s"])
            _PROM["step_seconds"].observe(step_seconds)
            _PROM["data_wait"].observe(data_wait)
            _PROM["lr"].labels(network="generator").set(record["lr_g"])
            _PROM["lr"].labels(network="discriminator").set(record["lr_d"])
            _PROM["epoch"].set(record["epoch"])
            _PROM["workers"].set(record["workers"])

    def print_line(self, record: dict[str, Any]) -> None:
        losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith(("G_", "D_", "KLD")))
        print(
            f"epoch {record['epoch']} step {record['step']} | {losses} | {record['images_per_s']:.1f} img/s "
            f"step {record['step_s']:.2f}s data {record['data_wait_s']:.3f}s | lr G {record['lr_g']:.2e} D {record['lr_d']:.2e}",
            flush=True,
        )


def save_sample_grid(
    path: Path, labels: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, classes: ClassInfo, *, max_rows: int = 4
) -> Path:
    """A PNG with one row per example: colourised label | generated | real."""
    n = min(max_rows, labels.shape[0])
    colors = colorize(labels[:n].cpu(), classes).float() / 127.5 - 1
    rows = [torch.cat([colors[i], fake[i].float().cpu(), real[i].float().cpu()], dim=2) for i in range(n)]
    grid = torch.cat(rows, dim=1).clamp(-1, 1)
    array = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.png")
    Image.fromarray(np.ascontiguousarray(array)).save(tmp)
    os.replace(tmp, path)
    return path


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
