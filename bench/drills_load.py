"""Serving under sustained load: autoscaling seen to happen, clients that hang up, a replica that hangs.

* ``load_drill``: closed-loop clients for a while against an autoscaling generator (1 -> N
  replicas of fractional CPUs) with the ADE20K architecture; the replica count over time from
  Serve's status and from the metrics endpoint, latency percentiles over time, every answer
  a 200 or a 503 with Retry-After; then the load stops and Serve scales back down.
* ``queue_full_drill``: more clients than the generator's queue holds: the surplus gets 503 +
  Retry-After at once, the rest is served.
* ``disconnect_drill``: clients that hang up while their request waits; the metrics show the
  work was dropped before its forward pass.
* ``hang_drill``: one of two generator replicas stops dead mid-batch (SIGSTOP: to Serve a
  forward pass that never returns, holding the process); the health check finds it, Serve
  replaces it, and the requests go around it.

bench/drills.py runs them from its command line; tests/test_drills.py runs short versions.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

import drills
from drills import Answer, Load, label_png, statuses, write_checkpoint

GENERATOR = "SpadeGenerator"


def ade20k_architecture(crop_size: int) -> Any:
    """spade_core's ADE20K model (151 label channels, ngf 64, SPADE hidden 128, 7 blocks) drawing
    ``crop_size`` pixels: the layers of the paper's model, fewer pixels than its 256 for 2 cores."""
    from spade_core.config import ModelConfig

    config = ModelConfig()
    return dataclasses.replace(config, generator=dataclasses.replace(config.generator, crop_size=crop_size))


def autoscaling_app(root: Path, *, crop_size: int = 64, max_replicas: int = 4, upscale_delay_s: float = 2.0,
                    downscale_delay_s: float = 10.0, batch: int = 4, max_queued: int = 64) -> dict[str, Any]:
    checkpoint = write_checkpoint(ade20k_architecture(crop_size), root / "ade20k")
    autoscaling = {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": batch,
                   "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s, "look_back_period_s": 12.0}
    return {"checkpoint": str(checkpoint), "ingress": {"num_cpus": 0.1},
            "generator": {"num_cpus": 0.25, "max_ongoing_requests": 2 * batch, "max_queued_requests": max_queued,
                          "autoscaling": autoscaling},
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.01},
            "limits": {"request_timeout_s": 120.0}}


# ---------------------------------------------------------------------------------------
# Metrics endpoint


def metrics_url() -> str:
    """The Ray node's metrics export endpoint (ray.init(_metrics_export_port=...) or a random port)."""
    import ray

    return f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


# ---------------------------------------------------------------------------------------
# Sustained load and autoscaling


def replica_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["drill"].deployments[GENERATOR].replica_states)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load_drill(base: str, *, clients: int, seconds: float, cooldown_s: float, window_s: float = 5.0,
               min_replicas: int = 1, tail_s: float = 12.0) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``, then quiet until the generator is back at
    ``min_replicas`` (at most ``cooldown_s``). Samples every second: replicas by Serve's status,
    healthy replicas by the metrics endpoint."""
    url = metrics_url()
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            row: dict[str, Any] = {"t": time.monotonic() - t0}
            try:
                states = replica_states()
                row["running"], row["starting"] = states.get("RUNNING", 0), states.get("STARTING", 0)
            except Exception:  # noqa: BLE001 - a sample missed is a gap in the timeline, not a failure
                row["running"] = row["starting"] = None
            try:
                row["healthy_metric"] = total(scrape(url), "ray_serve_deployment_replica_healthy", deployment=GENERATOR)
            except Exception:  # noqa: BLE001
                row["healthy_metric"] = None
            samples.append(row)
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Load(base + "/v1/synthesize", clients) as load:
        while load.now() < seconds:
            time.sleep(0.2)
    shift = load.started - t0  # answers are timed from the load's start, samples from t0
    answers = [dataclasses.replace(a, sent=a.sent + shift) for a in load.answers]
    load_end = time.monotonic() - t0  # the clients' last requests have been answered (Load joins them)
    while time.monotonic() - t0 < load_end + cooldown_s:
        if samples and samples[-1]["t"] > load_end and samples[-1]["running"] == min_replicas and samples[-1]["starting"] == 0 \
                and max((s["running"] or 0) for s in samples) > min_replicas:
            break
        time.sleep(1.0)
    time.sleep(tail_s)  # the metrics endpoint lags Serve's status by an export interval or two
    stop.set()
    sampler.join(timeout=15)
    timeline = []
    end = samples[-1]["t"] if samples else load_end
    for start in np.arange(0.0, end, window_s):
        done = [a for a in answers if start <= a.sent + a.latency < start + window_s]
        ok = [a.latency for a in done if a.status == 200]
        in_window = [s for s in samples if start <= s["t"] < start + window_s]
        timeline.append({
            "t": float(start), "answers": len(done), "non_200": sum(a.status != 200 for a in done),
            "p50_ms": 1e3 * percentile(ok, 50), "p99_ms": 1e3 * percentile(ok, 99),
            "replicas": max((s["running"] or 0) for s in in_window) if in_window else None,
            "starting": max((s["starting"] or 0) for s in in_window) if in_window else None,
            "healthy_metric": max((s["healthy_metric"] or 0) for s in in_window) if in_window else None,
        })
    peak = max((s["running"] or 0) for s in samples) if samples else 0
    peak_at = next((s["t"] for s in samples if (s["running"] or 0) == peak), None)
    last = samples[-1] if samples else {}
    scaled_down_at = None
    if peak > min_replicas:
        scaled_down_at = next((s["t"] for s in samples if s["t"] > load_end and s["running"] == min_replicas
                               and s["starting"] == 0), None)
    return {
        "clients": clients, "seconds": seconds, "sent": len(answers), "statuses": statuses(answers),
        "non_200": sum(a.status != 200 for a in answers),
        "503_without_retry_after": sum(1 for a in answers if a.status == 503 and not a.retry_after),
        "other_errors": sum(1 for a in answers if a.status not in (200, 503)),
        "throughput_per_s": sum(a.status == 200 for a in answers) / max(load_end, 1e-9),
        "p50_ms": 1e3 * percentile([a.latency for a in answers if a.status == 200], 50),
        "p99_ms": 1e3 * percentile([a.latency for a in answers if a.status == 200], 99),
        "peak_replicas": peak, "peak_at_s": peak_at, "peak_healthy_metric": max((s["healthy_metric"] or 0) for s in samples),
        "load_end_s": load_end, "scaled_down_after_s": None if scaled_down_at is None else scaled_down_at - load_end,
        "final_replicas": last.get("running"), "final_healthy_metric": last.get("healthy_metric"), "timeline": timeline,
    }


def print_timeline(result: dict[str, Any]) -> None:
    print(f"{'t (s)':>6} {'answers':>8} {'non-200':>8} {'p50 ms':>8} {'p99 ms':>8} {'replicas':>9} {'starting':>9} "
          f"{'healthy (metrics)':>18}")
    for row in result["timeline"]:
        print(f"{row['t']:6.0f} {row['answers']:8d} {row['non_200']:8d} {row['p50_ms']:8.0f} {row['p99_ms']:8.0f} "
              f"{row['replicas'] if row['replicas'] is not None else '-':>9} {row['starting'] if row['starting'] is not None else '-':>9} "
              f"{row['healthy_metric'] if row['healthy_metric'] is not None else '-':>18}")


def queue_full_drill(base: str, *, clients: int, seconds: float) -> dict[str, Any]:
    """Load beyond what the replica holds plus its queue: the surplus is answered 503 at once."""
    with Load(base + "/v1/synthesize", clients) as load:
        while load.now() < seconds:
            time.sleep(0.2)
    answers = load.answers
    full = [a for a in answers if a.status == 503]
    return {"clients": clients, "sent": len(answers), "statuses": statuses(answers),
            "503_without_retry_after": sum(1 for a in full if not a.retry_after),
            "p50_503_ms": 1e3 * percentile([a.latency for a in full], 50),
            "p50_200_ms": 1e3 * percentile([a.latency for a in answers if a.status == 200], 50),
            "other": sum(1 for a in answers if a.status not in (200, 503))}


# ---------------------------------------------------------------------------------------
# Clients that hang up


def _settled(url: str, names: tuple[str, ...], *, timeout: float = 60.0) -> dict[str, float]:
    """Scrape until the named totals stop changing across more than Ray's 10-s report interval."""
    previous: dict[str, float] | None = None
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        now = {n: total(samples, n) for n in names}
        now.update({f"{n}:{k}={v}": total(samples, n, **{k: v}) for n, k, v in (
            ("ray_spade_serve_cancelled_requests_total", "stage", "queued"),
            ("ray_spade_serve_cancelled_requests_total", "stage", "running"),
            ("ray_spade_serve_requests_total", "status", "499"),
            ("ray_spade_serve_requests_total", "status", "200"),
            ("ray_serve_num_http_requests_total", "status_code", "499"))})
        if now == previous or time.monotonic() > deadline:
            return now
        previous = now
        time.sleep(11.0)


def disconnect_drill(base: str, *, patient: int, impatient: int, hang_up_after_s: float, seconds: float) -> dict[str, Any]:
    """``patient`` closed-loop clients keep the generator busy; meanwhile ``impatient`` clients
    each send one request and hang up after ``hang_up_after_s``. Images computed (the replicas'
    counter) are compared with the answers clients received.

    Totals are summed over series of live processes only (Ray drops a dead worker's series), so
    the app must not lose replicas during the drill."""
    import requests

    url = metrics_url()
    names = ("ray_spade_serve_computed_requests_total",)
    before = _settled(url, names, timeout=20.0)
    gone: list[bool] = []
    lock = threading.Lock()

    def hang_up(i: int) -> None:
        try:
            requests.post(base + "/v1/synthesize", files={"labels": ("l.png", label_png(seed=100 + i), "image/png")},
                          timeout=hang_up_after_s)
            hung = False
        except requests.RequestException:
            hung = True
        with lock:
            gone.append(hung)

    with Load(base + "/v1/synthesize", patient) as load:
        time.sleep(2.0)
        threads = [threading.Thread(target=hang_up, args=(i,)) for i in range(impatient)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        while load.now() < seconds:
            time.sleep(0.2)
    after = _settled(url, names)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    answered = sum(a.status == 200 for a in load.answers) + sum(not g for g in gone)
    computed = delta["ray_spade_serve_computed_requests_total"]
    return {
        "patient_clients": patient, "hung_up": sum(gone), "answered": answered, "images_computed": computed,
        "computed_for_hung_up": computed - answered,
        "cancelled_queued": delta["ray_spade_serve_cancelled_requests_total:stage=queued"],
        "cancelled_running": delta["ray_spade_serve_cancelled_requests_total:stage=running"],
        "ingress_499": delta["ray_spade_serve_requests_total:status=499"],
        "proxy_499": delta["ray_serve_num_http_requests_total:status_code=499"],
        "patient_statuses": statuses(load.answers),
    }


# ---------------------------------------------------------------------------------------
# A replica that hangs


def replica_pids() -> dict[int, str]:
    """PID -> process title of the generator's replica processes ("ray::ServeReplica:drill:SpadeGenerator")."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ServeReplica:drill:" + GENERATOR):
                out[int(entry)] = title
    return out


def hang_drill(base: str, *, clients: int, seconds: float, hang_at: float, replicas: int = 2) -> dict[str, Any]:
    """SIGSTOP one generator replica ``hang_at`` seconds into the load; follow Serve's view of it."""
    before_names = set(drills.replica_names(GENERATOR))
    victim = None
    events: dict[str, float] = {}
    with Load(base + "/v1/synthesize", clients) as load:
        while load.now() < hang_at:
            time.sleep(0.1)
        pids = sorted(replica_pids())
        victim = pids[0]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = load.now()
        while load.now() < seconds:
            states = replica_states()
            names = set(drills.replica_names(GENERATOR))
            if "unhealthy" not in events and (states.get("RUNNING", 0) < replicas or names != before_names):
                events["unhealthy"] = load.now()  # Serve stopped counting it as running
            if "replaced" not in events and names - before_names and states.get("RUNNING", 0) >= replicas:
                events["replaced"] = load.now()
            if "gone" not in events and not os.path.exists(f"/proc/{victim}"):
                events["gone"] = load.now()
            time.sleep(0.25)
    deadline = time.monotonic() + 30.0
    while "gone" not in events and time.monotonic() < deadline:  # Serve kills it after its graceful shutdown timeout
        if not os.path.exists(f"/proc/{victim}"):
            events["gone"] = load.now()
        time.sleep(0.25)
    if os.path.exists(f"/proc/{victim}"):  # never leave a stopped process behind
        os.kill(victim, signal.SIGKILL)
    answers: list[Answer] = load.answers
    routed_around = [a for a in answers if stopped_at + 1.0 < a.sent < events.get("unhealthy", seconds) and a.status == 200]
    during = [a for a in answers if stopped_at < a.sent < events.get("replaced", seconds)]
    return {
        "replicas": replicas, "clients": clients, "sent": len(answers), "statuses": statuses(answers),
        "non_200": sum(a.status != 200 for a in answers), "server_errors": sum(a.status >= 500 and a.status != 503 for a in answers),
        "found_after_s": events["unhealthy"] - stopped_at if "unhealthy" in events else None,
        "replaced_after_s": events["replaced"] - stopped_at if "replaced" in events else None,
        "process_gone_after_s": events["gone"] - stopped_at if "gone" in events else None,
        "served_while_hung": len(routed_around), "sent_while_hung": len(during),
        "max_latency_s": max((a.latency for a in answers), default=0.0),
        "stuck_over_5s": sum(a.latency > 5.0 for a in answers),  # were inside it: answered once Serve killed it
        "p50_before_ms": 1e3 * percentile([a.latency for a in answers if a.sent < stopped_at and a.status == 200], 50),
        "p50_after_ms": 1e3 * percentile([a.latency for a in answers if "replaced" in events and a.sent > events["replaced"] + 2
                                          and a.status == 200], 50),
    }
