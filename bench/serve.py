"""Serving throughput and latency over HTTP vs. the raw batched model, in one run.

    python bench/serve.py [--model ade20k|tiny] [--precision bf16] [--batch 8] [--clients 1,4,8,16] [--seconds 20]

1. Raw: the generator's fast path at batch ``--batch`` in this process (same dtype, same
   thread count as the replica gets), images/s over ``--seconds``.
2. Served: ``serve_app`` on a local Ray (one generator replica holding every CPU, batching
   at ``--batch``), then closed-loop load: N clients each POST a 256x256 label-map PNG to
   /v1/synthesize and wait for the PNG, for ``--seconds`` per N. Prints images/s, p50 / p99
   latency end to end, the mean merged batch size, and served / raw.

Target: served >= 0.9 x raw at saturation (clients >= batch). Weights are random (speed
does not depend on them); the ADE20K architecture is the paper's (ngf 64, 256x256).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import spade_core  # noqa: E402
from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig  # noqa: E402
from spade_core.precision import DTYPES  # noqa: E402

DTYPES = {name: DTYPES[name] for name in ("fp32", "bf16")}  # what this benchmark compares


def model_config(name: str) -> ModelConfig:
    if name == "ade20k":
        return ModelConfig()  # ADE20K defaults: 151 channels, ngf 64, 256x256
    return ModelConfig(labels=LabelConfig(label_nc=150), generator=GeneratorConfig(ngf=16, crop_size=64, spade=SpadeConfig(hidden=32)))


def scene(seed: int, size: int = 256) -> np.ndarray:
    """A label map with a few large regions (like a real scene), raw ADE20K ids."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 151, (4, 4)).astype(np.uint8)
    return np.kron(coarse, np.ones((size // 4, size // 4), np.uint8))


def raw_throughput(model: spade_core.SpadeModel, batch: int, seconds: float) -> float:
    """Images/s of the batched model as a replica runs it: synthesis, then uint8 on the host."""
    from serve_app.deployments import photos

    labels = torch.from_numpy(np.stack([scene(i) for i in range(batch)]).astype(np.int64))
    photos(model.synthesize(labels))  # warm-up; the host copy also waits for a GPU to finish
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        photos(model.synthesize(labels))
        n += batch
    return n / (time.perf_counter() - start)


def closed_loop(url: str, clients: int, seconds: float) -> tuple[float, list[float], list[int]]:
    import requests

    bodies = []
    for i in range(16):
        buf = io.BytesIO()
        Image.fromarray(scene(100 + i)).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = session.post(url, files={"labels": ("l.png", bodies[i % len(bodies)], "image/png")}, timeout=600)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                else:
                    latencies.append(dt)
                    batches.append(int(r.headers.get("x-batch-size", 0)))
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
    return len(latencies) / elapsed, latencies, batches


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["ade20k", "tiny"], default="ade20k")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)

    config = model_config(args.model)
    model = spade_core.build_model(config, discriminator=False, seed=0).eval()
    model.enable_fast_path(dtype=DTYPES[args.precision])
    print(f"model {args.model} ({config.generator.output_size[0]}x{config.generator.output_size[1]}), {args.precision}, "
          f"batch {args.batch}, {cpus} CPUs, torch threads {torch.get_num_threads()}")
    raw = raw_throughput(model, args.batch, args.seconds)
    print(f"raw batched model: {raw:.2f} img/s")
    del model

    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    # the replica's torch gets every core, as the raw run did; Ray sets its threads from num_cpus
    with served_app(config, precision=args.precision, batch=args.batch, generator={"num_cpus": cpus}) as url:
        closed_loop(url, 1, min(5.0, args.seconds))  # warm-up
        print(f"{'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'served/raw':>10}")
        for n in [int(c) for c in args.clients.split(",")]:
            rate, lat, batches = closed_loop(url, n, args.seconds)
            mean_batch = statistics.fmean(batches) if batches else 0.0
            print(f"{n:>7} {rate:>7.2f} {percentile(lat, 50) * 1e3:>8.0f} {percentile(lat, 99) * 1e3:>8.0f} "
                  f"{mean_batch:>6.1f} {rate / raw:>10.2f}", flush=True)
    ray.shutdown()


@contextlib.contextmanager
def served_app(
    config: ModelConfig, *, precision: str, batch: int, generator: dict, ingress_replicas: int = 1
) -> Iterator[str]:
    """serve_app on a fresh checkpoint of ``config`` in the running Ray; yields the synthesis URL.

    ``generator``: the generator deployment's resources (``num_cpus``, ``num_gpus``). The
    ingress takes no CPU reservation, so that it never starves the model of one.
    """
    from ray import serve

    from serve_app.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        spade_core.save_checkpoint(spade_core.build_model(config, discriminator=False, seed=0), Path(tmp) / "ckpt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        replicas = {"min_replicas": ingress_replicas, "max_replicas": ingress_replicas}
        serve.run(build_app({
            "checkpoint": str(Path(tmp) / "ckpt"), "precision": precision,
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05},
            "generator": {**generator, "max_ongoing_requests": 2 * batch, "max_queued_requests": -1},
            "ingress": {"num_cpus": 0, "max_ongoing_requests": 512, "max_queued_requests": -1, "autoscaling": replicas},
        }), name="bench", route_prefix="/")
        try:
            yield f"http://127.0.0.1:{port}/v1/synthesize"
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
