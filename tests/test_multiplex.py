"""Several models served at once (Ray Serve's model multiplexing): each route takes ``model``,
requests of one model still batch together, replicas hold a bounded number of models, and
the metrics say which model did the work."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

import spade_core
from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig

from .test_serve import decode, expected_image, labels_map, png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import drills  # noqa: E402
import drills_load  # noqa: E402

pytestmark = pytest.mark.slow
SQUARE = ModelConfig(labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=64, spade=SpadeConfig(hidden=16)))
WIDE = ModelConfig(labels=LabelConfig(label_nc=20), generator=GeneratorConfig(ngf=8, crop_size=64, aspect_ratio=2.0,
                                                                             spade=SpadeConfig(hidden=16)))


@pytest.fixture(scope="module")
def two_models(ray_cluster, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("multiplex")
    paths = {"square": drills.write_checkpoint(SQUARE, root / "square", seed=0),
             "wide": drills.write_checkpoint(WIDE, root / "wide", seed=1)}
    args = {"models": [{"name": name, "checkpoint": str(path)} for name, path in paths.items()],
            "max_models_per_replica": 1,  # two models, one slot: every switch unloads the other
            "ingress": {"num_cpus": 0.1},
            "generator": {"num_cpus": 0.2, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}}
    models = {name: spade_core.load_checkpoint(path) for name, path in paths.items()}
    for m in models.values():
        m.enable_fast_path()
    with drills.running_app(args) as base:
        yield base, models


def synth(base: str, labels: np.ndarray, model: str | None = None) -> requests.Response:
    data = {"model": model} if model else None
    return requests.post(base + "/v1/synthesize", files={"labels": ("l.png", png(labels), "image/png")}, data=data, timeout=120)


def test_models_are_listed_and_described_each(two_models) -> None:  # type: ignore[no-untyped-def]
    base, _ = two_models
    listed = requests.get(base + "/v1/models", timeout=60).json()["models"]
    assert [(m["name"], m["default"]) for m in listed] == [("square", True), ("wide", False)]
    square = requests.get(base + "/v1/model", timeout=60).json()
    wide = requests.get(base + "/v1/model", params={"model": "wide"}, timeout=60).json()
    assert square["name"] == "square" and len(square["classes"]) == 13 and square["input_size"] == {"height": 64, "width": 64}
    assert wide["name"] == "wide" and len(wide["classes"]) == 21 and wide["input_size"] == {"height": 32, "width": 64}
    r = requests.get(base + "/v1/model", params={"model": "nope"}, timeout=60)
    assert r.status_code == 400 and "square, wide" in r.json()["error"]["message"]


def test_each_request_is_drawn_by_the_model_it_names(two_models) -> None:  # type: ignore[no-untyped-def]
    base, models = two_models
    for name, labels in (("wide", labels_map(32, 64, seed=3, classes=20)), ("square", labels_map(64, 64, seed=4)),
                         (None, labels_map(64, 64, seed=5))):
        r = synth(base, labels, name)
        assert r.status_code == 200, r.text
        used = name or "square"
        assert r.headers["X-Model"] == used
        assert np.abs(decode(r.content).astype(int) - expected_image(models[used], labels).astype(int)).max() <= 1
    r = synth(base, labels_map(64, 64, seed=6, classes=20), "square")  # ids 12..19 exist in wide only
    assert r.status_code == 400
    r = synth(base, labels_map(64, 64), "nope")
    assert r.status_code == 400 and "no model named 'nope'" in r.json()["error"]["message"]


def test_requests_of_one_model_batch_together_and_metrics_name_the_model(two_models) -> None:  # type: ignore[no-untyped-def]
    base, _ = two_models
    sizes: dict[str, list[int]] = {"square": [], "wide": []}
    lock = threading.Lock()

    def send(name: str, i: int) -> None:
        shape, classes = ((64, 64), 12) if name == "square" else ((32, 64), 20)
        r = synth(base, labels_map(*shape, seed=i, classes=classes), name)
        assert r.status_code == 200 and r.headers["X-Model"] == name
        with lock:
            sizes[name].append(int(r.headers["X-Batch-Size"]))

    # Merging needs requests to meet within the batch wait: on a busy 2-core machine one
    # burst's decoding can spread them out, so up to three bursts of 6 + 6 (one suffices).
    for burst in range(3):
        threads = [threading.Thread(target=send, args=(name, 6 * burst + i)) for i in range(6) for name in ("square", "wide")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if max(sizes["square"]) > 1 and max(sizes["wide"]) > 1:
            break
    assert max(sizes["square"]) > 1 and max(sizes["wide"]) > 1, sizes  # merged, each with its own model's requests
    sent = 6 * (burst + 1)
    url = drills_load.metrics_url()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = drills_load.scrape(url)
        computed = {m: drills_load.total(samples, "ray_spade_serve_computed_requests_total", model=m) for m in ("square", "wide")}
        loads = {m: drills_load.total(samples, "ray_spade_serve_model_loads_total", model=m) for m in ("square", "wide")}
        if computed["square"] >= sent and computed["wide"] >= sent:
            break
        time.sleep(2)
    assert computed["square"] >= sent and computed["wide"] >= sent, computed
    assert loads["square"] >= 1 and loads["wide"] >= 1, loads
