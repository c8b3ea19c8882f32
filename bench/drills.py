"""Reliability drills against a running spade-serve on 127.0.0.1, each with its figures.

    python bench/drills.py fuzz [--cases 5000]        # schemathesis, all checks, every route
    python bench/drills.py hostile                    # bench/hostile_images.py on every image field
    python bench/drills.py kill-replica [--replicas 1] [--clients 4] [--seconds 30]
    python bench/drills.py broken-rollout             # broken checkpoints through user_config, under load
    python bench/drills.py kill-controller            # the Serve controller killed under load
    python bench/drills.py kill-proxy                 # the HTTP proxy killed; clients retry with backoff
    python bench/drills.py load [--load-clients 64] [--load-seconds 300]   # autoscaling 1 -> N, then a full queue
    python bench/drills.py disconnect                 # clients hang up while queued: no forward pass for them
    python bench/drills.py hang                       # a replica stops dead mid-batch (SIGSTOP) under load
    python bench/drills.py kill-train-driver          # spade-train's driver SIGKILLed mid-run, then rerun
    python bench/drills.py kill-train-upload          # the rank-0 worker SIGKILLed as it uploads a checkpoint
    python bench/drills.py kill-prepare [--runs 4]    # train_job.prepare SIGKILLed at random points, rerun
    python bench/drills.py all

Every drill starts its own local Ray and Serve app (tiny random-weight checkpoints: the
drills exercise the system, not the model), bounds its requests and its duration, and prints
what it sent, what failed, and what recovered. Load, hang-ups and a hung replica live in
bench/drills_load.py, the training and data drills in bench/drills_train.py. tests/test_drills.py, tests/test_drills_train.py and tests/test_serve.py
run CI-sized versions of the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402

import spade_core  # noqa: E402
from spade_core.config import EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig  # noqa: E402
from spade_core.testing import randomize_weights  # noqa: E402

SCHEMATHESIS_CONFIG = REPO / "tests" / "schemathesis.toml"
VAE = ModelConfig(
    labels=LabelConfig(label_nc=12),
    generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=16, spade=SpadeConfig(hidden=16)),
    encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64),
)


# ---------------------------------------------------------------------------------------
# The app under drill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(config: ModelConfig, path: Path, *, seed: int = 0) -> Path:
    model = randomize_weights(spade_core.build_model(config, discriminator=False, seed=seed), seed=seed + 1)
    return spade_core.save_checkpoint(model, path)


def deploy(args: dict[str, Any], *, name: str = "drill", deployments: list[dict[str, Any]] | None = None,
           timeout: float = 240.0) -> None:
    """Deploy the app as ``serve deploy`` does (declaratively: a later change of only a
    deployment's user_config reconfigures its running replicas) and wait until it runs."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": name, "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args}
    if deployments:
        app["deployments"] = deployments
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING" and not deployments:
            return
        if status is not None and deployments and all(
                d.status == "HEALTHY" for d in status.deployments.values()) and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {name} {status.status}: {status.message}")
        time.sleep(0.5)
    raise RuntimeError(f"app {name} not running after {timeout:.0f} s")


@contextlib.contextmanager
def running_app(args: dict[str, Any], *, name: str = "drill") -> Iterator[str]:
    """``serve_app`` with these ServeConfig args on the running Ray, at a fresh loopback port; yields its base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(args, name=name)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


# Serve's autoscaler reads the request counts replicas and handles push every 10 s by default;
# the drills (and tests/conftest.py's Ray) push every second, so that scaling follows a
# 30-second load. Read when Ray starts.
AUTOSCALING_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                   "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[None]:
    import ray

    os.environ.update(AUTOSCALING_ENV)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png(seed: int = 0, size: int = 64, classes: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    return png(np.kron(rng.integers(0, classes, (size // 8, size // 8)), np.ones((8, 8))).astype(np.uint8))


# ---------------------------------------------------------------------------------------
# Fuzzing


def run_schemathesis(base: str, *, max_examples: int, seed: int = 1, timeout: float = 600.0, workers: int = 1) -> dict[str, Any]:
    """``st run`` with every check against ``base``/openapi.json: return code, output, and the
    counts from its JSON report (cases, failures by check)."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        raise RuntimeError("schemathesis is not installed: pip install -e '.[test]'")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [st, "--config-file", str(SCHEMATHESIS_CONFIG), "run", f"{base}/openapi.json", "--url", base, "--checks", "all",
             "--max-examples", str(max_examples), "--seed", str(seed), "--no-shrink", "--continue-on-failure",
             "--workers", str(workers), "--request-timeout", "60", "--report", "json", "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=timeout, cwd=tmp,
        )
        data = json.loads(report.read_text()) if report.exists() else {}
    output = proc.stdout + proc.stderr
    counts = re.search(r"(\d+) generated, (\d+) (?:passed|found)", output)
    return {"returncode": proc.returncode, "output": output, "report": data,
            "cases": int(counts.group(1)) if counts else 0}


# ---------------------------------------------------------------------------------------
# Hostile images

IMAGE_FIELDS = {"labels": ("/v1/synthesize", "labels"), "style": ("/v1/synthesize", "style"), "encode": ("/v1/encode", "style")}


def hostile_drill(base: str, *, max_pixels: int, fields: tuple[str, ...] = tuple(IMAGE_FIELDS), z_dim: int = 16,
                  output_shape: tuple[int, int, int] = (64, 64, 3)) -> dict[str, Any]:
    """Every corpus entry on every image field; the answers a correct server may not give."""
    import io

    import requests
    from PIL import Image

    from hostile_images import corpus

    wrong: list[str] = []
    statuses: dict[str, int] = {}
    sent = 0
    for field_name in fields:
        route, part = IMAGE_FIELDS[field_name]
        for h in corpus(max_pixels=max_pixels):
            files = {part: (h.filename, h.data, h.content_type)}
            if field_name == "style":
                files["labels"] = ("labels.png", label_png(), "image/png")
            r = requests.post(base + route, files=files, timeout=120)
            sent += 1
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            allowed = h.label if field_name == "labels" else h.style
            if r.status_code == 200:
                good = "ok" in allowed and (
                    len(r.json()["mu"]) == z_dim if route == "/v1/encode"
                    else np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).shape == output_shape)
            else:
                good = r.status_code in allowed and part in r.json()["error"]["message"]
            if not good:
                wrong.append(f"{field_name} <- {h.name}: {r.status_code} {r.text[:160]!r} (allowed: {sorted(map(str, allowed))})")
    healthy = requests.get(base + "/readyz", timeout=60).status_code == 200
    return {"sent": sent, "statuses": statuses, "wrong": wrong, "healthy_after": healthy}


# ---------------------------------------------------------------------------------------
# Load: closed-loop clients, every answer recorded


@dataclass
class Answer:
    sent: float  # seconds since the load started
    latency: float
    status: int  # 0: no HTTP answer (connection refused or reset)
    retry_after: str | None = None
    client: int = 0


@dataclass
class Load:
    """``clients`` threads each POSTing a label map and waiting for the answer, until stopped."""

    url: str
    clients: int
    backoff: bool = False  # a client that got no answer / a 503 retries with exponential backoff
    answers: list[Answer] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _client(self, i: int) -> None:
        import requests

        body = label_png(seed=i)
        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(self.url, files={"labels": ("labels.png", body, "image/png")}, timeout=120)
                answer = Answer(t0 - self.started, time.monotonic() - t0, r.status_code, r.headers.get("Retry-After"), i)
            except requests.RequestException:
                answer = Answer(t0 - self.started, time.monotonic() - t0, 0, None, i)
                session = requests.Session()
            with self._lock:
                self.answers.append(answer)
            if self.backoff and answer.status in (0, 503):
                self._stop.wait(min(2.0, 0.1 * 2 ** sum(1 for a in self.answers[-8:] if a.status in (0, 503))))

    def now(self) -> float:
        return time.monotonic() - self.started


def p50(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def statuses(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[str(a.status)] = out.get(str(a.status), 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------
# Faults


def replica_names(deployment: str, app: str = "drill") -> list[str]:
    """The named Serve replica actors of ``deployment`` (GCS's list: needs no dashboard)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def running_replicas(deployment: str, app: str = "drill") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def kill_replica_drill(base: str, *, replicas: int, clients: int, seconds: float, kill_at: float) -> dict[str, Any]:
    """Kill one generator replica ``kill_at`` seconds into ``seconds`` of closed-loop load."""
    import ray

    recovered_at = None
    with Load(base + "/v1/synthesize", clients) as load:
        while load.now() < kill_at:
            time.sleep(0.1)
        before = replica_names("SpadeGenerator")
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        killed_at = load.now()
        while load.now() < seconds:
            if recovered_at is None:  # recovered: a new replica replaced the victim and runs
                names = replica_names("SpadeGenerator")
                if set(names) - set(before) and len(names) >= replicas and running_replicas("SpadeGenerator") >= replicas:
                    recovered_at = load.now()
            time.sleep(0.2)
    answers = load.answers
    before = [a.latency for a in answers if a.sent < killed_at and a.status == 200]
    after = [a.latency for a in answers if recovered_at is not None and a.sent > recovered_at + 2.0 and a.status == 200]
    bad = [a for a in answers if a.status != 200]
    return {
        "replicas": replicas, "clients": clients, "sent": len(answers), "statuses": statuses(answers),
        "non_200": len(bad), "non_200_share": len(bad) / max(len(answers), 1),
        "server_errors": sum(1 for a in answers if a.status >= 500 and a.status != 503),
        "503_without_retry_after": sum(1 for a in answers if a.status == 503 and not a.retry_after),
        "killed_at_s": killed_at, "recovered_after_s": None if recovered_at is None else recovered_at - killed_at,
        "p50_before_ms": 1e3 * p50(before), "p50_after_recovery_ms": 1e3 * p50(after),
    }


def broken_checkpoints(good: Path, root: Path) -> dict[str, Path]:
    """Checkpoints a rollout could bring: one with a file missing, one truncated, another architecture."""
    from safetensors.torch import load_file

    out: dict[str, Path] = {}
    missing = shutil.copytree(good, root / "missing_file")
    (missing / "generator.safetensors").unlink()
    out["missing generator.safetensors"] = missing
    truncated = shutil.copytree(good, root / "truncated")
    data = (truncated / "generator.safetensors").read_bytes()
    (truncated / "generator.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated safetensors"] = truncated
    other = shutil.copytree(good, root / "other_architecture")
    config = json.loads((other / "config.json").read_text())
    config["model"]["generator"]["ngf"] = 2 * config["model"]["generator"]["ngf"]  # the weights no longer fit
    (other / "config.json").write_text(json.dumps(config))
    assert load_file(str(other / "generator.safetensors"))  # same weights, another config
    out["another architecture"] = other
    out["no such directory"] = root / "absent"
    return out


def broken_rollout_drill(base: str, args: dict[str, Any], *, clients: int, tmp: Path, settle_s: float = 30.0) -> dict[str, Any]:
    """Roll each broken checkpoint out through the generator's user_config under load."""
    import requests

    identity = requests.get(base + "/v1/model", timeout=60).json()["checkpoint"]
    rollouts: list[dict[str, Any]] = []
    with Load(base + "/v1/synthesize", clients) as load:
        time.sleep(2.0)
        for what, path in broken_checkpoints(Path(args["checkpoint"]), tmp).items():
            deploy(args, deployments=[{"name": "SpadeGenerator", "user_config": {"checkpoint": str(path)}}], timeout=120)
            deadline = time.monotonic() + settle_s
            while True:  # until the replica reports this rollout's failure (the ingress caches /v1/model for 5 s)
                info = requests.get(base + "/readyz", timeout=60).json()
                if str(path) in (info.get("load_error") or "") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            rollouts.append({"checkpoint": what, "still_serving": info["checkpoint"] == identity,
                             "reported": info.get("load_error") if str(path) in (info.get("load_error") or "") else None})
        deploy(args, deployments=[{"name": "SpadeGenerator", "user_config": {"checkpoint": args["checkpoint"]}}], timeout=120)
        time.sleep(2.0)
    answers = load.answers
    return {"sent": len(answers), "statuses": statuses(answers), "non_200": sum(a.status != 200 for a in answers),
            "rollouts": rollouts}


def kill_controller_drill(base: str, *, clients: int, seconds: float, kill_at: float, restart_timeout: float = 60.0) -> dict[str, Any]:
    """Kill the Serve controller under load: the proxy and replicas serve on while Ray restarts it.
    The load runs ``seconds``, longer while the controller is not back (``restart_timeout`` at most)."""
    import ray
    from ray import serve

    def controller_pid() -> int:
        controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return ray.get(controller.__ray_call__.remote(lambda _: os.getpid()), timeout=2.0)

    restarted_at = None
    with Load(base + "/v1/synthesize", clients) as load:
        while load.now() < kill_at:
            time.sleep(0.1)
        old_pid = controller_pid()
        ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)  # Ray restarts it
        killed_at = load.now()
        while load.now() < seconds or (restarted_at is None and load.now() < seconds + restart_timeout):
            # ray.kill is asynchronous: the old controller may still answer for a moment, so
            # "back" means a new process whose application reads RUNNING again
            if restarted_at is None:
                with contextlib.suppress(Exception):
                    if controller_pid() != old_pid and serve.status().applications["drill"].status == "RUNNING":
                        restarted_at = load.now()
            time.sleep(0.1)
    answers = load.answers
    during = [a for a in answers if killed_at <= a.sent <= (restarted_at or load.now())]
    return {"clients": clients, "sent": len(answers), "statuses": statuses(answers), "sent_while_down": len(during),
            "non_200_while_down": sum(a.status != 200 for a in during), "non_200": sum(a.status != 200 for a in answers),
            "restarted_after_s": None if restarted_at is None else restarted_at - killed_at}


def unanswered(answers: list[Answer]) -> int:
    """Failed attempts that no later 200 of the same client followed."""
    last_ok: dict[int, float] = {}
    for a in answers:
        if a.status == 200:
            last_ok[a.client] = max(last_ok.get(a.client, -1.0), a.sent)
    return sum(1 for a in answers if a.status != 200 and last_ok.get(a.client, -1.0) <= a.sent)


def kill_proxy_drill(base: str, *, clients: int, seconds: float, kill_at: float, settle_s: float | None = None) -> dict[str, Any]:
    """Kill the HTTP proxy under load from clients that retry with backoff: the outage a
    client sees, and whether any request was lost (a failed attempt never followed by a 200).

    ``seconds`` is the whole run; with ``settle_s`` it ends earlier, once the outage was seen
    and every failed attempt has been followed by a 200 for ``settle_s`` seconds."""
    import ray

    with Load(base + "/v1/synthesize", clients, backoff=True) as load:
        while load.now() < kill_at:
            time.sleep(0.1)
        proxies = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and a["name"].startswith("SERVE_PROXY_ACTOR")]
        ray.kill(ray.get_actor(proxies[0], namespace="serve"), no_restart=True)  # the controller starts a new one
        killed_at = load.now()
        whole_since: float | None = None
        while load.now() < seconds:
            time.sleep(0.2)
            if settle_s is None:
                continue
            so_far = list(load.answers)
            whole = any(a.status != 200 and a.sent >= killed_at for a in so_far) and unanswered(so_far) == 0
            whole_since = (whole_since or load.now()) if whole else None
            if whole_since is not None and load.now() - whole_since >= settle_s:
                break
    answers = sorted(load.answers, key=lambda a: a.sent)
    failed = [a for a in answers if a.status != 200]
    lost = unanswered(answers)
    recovered = [a.sent + a.latency for a in answers if a.status == 200 and a.sent > killed_at
                 and any(f.sent >= killed_at for f in failed)]
    outage = (min(recovered) - killed_at) if failed and recovered else 0.0
    return {"clients": clients, "sent": len(answers), "statuses": statuses(answers), "failed_attempts": len(failed),
            "lost": lost, "outage_s": outage}


def print_kill(result: dict[str, Any]) -> None:
    print(f"kill a generator replica ({result['replicas']} replica(s), {result['clients']} clients): {result['sent']} requests, "
          f"statuses {result['statuses']}, non-200 {result['non_200_share']:.2%}, server errors {result['server_errors']}; "
          f"replaced after {result['recovered_after_s'] if result['recovered_after_s'] is None else round(result['recovered_after_s'], 1)} s; "
          f"p50 {result['p50_before_ms']:.0f} ms before, {result['p50_after_recovery_ms']:.0f} ms after")


def kill_ok(result: dict[str, Any]) -> bool:
    return (result["server_errors"] == 0 and result["503_without_retry_after"] == 0 and result["non_200_share"] <= 0.01
            and result["recovered_after_s"] is not None
            and result["p50_after_recovery_ms"] <= 1.5 * result["p50_before_ms"] + 50)


def plain_app(root: Path, *, replicas: int = 1, **overrides: Any) -> dict[str, Any]:
    config = ModelConfig(labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=64, spade=SpadeConfig(hidden=16)))
    checkpoint = write_checkpoint(config, root / "plain")
    fixed = {"min_replicas": replicas, "max_replicas": replicas}
    return {"checkpoint": str(checkpoint), "ingress": {"num_cpus": 0.1},
            "generator": {"num_cpus": 0.2, "autoscaling": fixed, "max_ongoing_requests": 16},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}, **overrides}


# ---------------------------------------------------------------------------------------
# The command line


def vae_app(root: Path, **overrides: Any) -> dict[str, Any]:
    checkpoint = write_checkpoint(VAE, root / "vae")
    return {"checkpoint": str(checkpoint), "generator": {"num_cpus": 0.2}, "encoder": {"num_cpus": 0.2},
            "ingress": {"num_cpus": 0.1}, "limits": {"max_pixels": 600 * 600}, **overrides}


def drill_fuzz(args: argparse.Namespace) -> bool:
    """Schemathesis runs with new seeds until ``--cases`` cases were sent (one run stops
    near 600 cases here: Hypothesis ends a phase when it finds nothing new to try)."""
    import requests

    cases, failed, runs = 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp, local_ray(), running_app(vae_app(Path(tmp))) as base:
        t0 = time.monotonic()
        while cases < args.cases:
            runs += 1
            result = run_schemathesis(base, max_examples=500, seed=runs, timeout=1800, workers=2)
            cases += result["cases"]
            failed += result["returncode"] != 0
            print(f"  seed {runs}: {result['cases']} cases, exit {result['returncode']} ({cases} in all)", flush=True)
            if result["returncode"] != 0:
                print(result["output"][-4000:])
            if result["cases"] == 0:
                break
        healthy = requests.get(base + "/readyz", timeout=60).status_code == 200
    print(f"fuzz: {cases} cases in {runs} schemathesis runs ({time.monotonic() - t0:.0f} s), {failed} runs with failures, "
          f"healthy afterwards: {healthy}")
    return failed == 0 and healthy and cases >= args.cases


def drill_hostile(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory() as tmp, local_ray(), running_app(vae_app(Path(tmp))) as base:
        result = hostile_drill(base, max_pixels=600 * 600)
    print(f"hostile images: {result['sent']} sent, statuses {result['statuses']}, {len(result['wrong'])} wrong, "
          f"healthy afterwards: {result['healthy_after']}")
    for line in result["wrong"]:
        print(f"  {line}")
    return not result["wrong"] and result["healthy_after"]


def drill_kill_replica(args: argparse.Namespace) -> bool:
    ok = True
    for replicas in args.replicas:
        with tempfile.TemporaryDirectory() as tmp, local_ray(), running_app(plain_app(Path(tmp), replicas=replicas)) as base:
            result = kill_replica_drill(base, replicas=replicas, clients=args.clients, seconds=args.seconds, kill_at=args.seconds / 3)
        print_kill(result)
        ok = ok and kill_ok(result)
    return ok


def drill_broken_rollout(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory() as tmp, local_ray():
        app_args = plain_app(Path(tmp), replicas=1)
        with running_app(app_args) as base:
            result = broken_rollout_drill(base, app_args, clients=args.clients, tmp=Path(tmp))
    print(f"broken checkpoint rollouts under load: {result['sent']} requests, statuses {result['statuses']}")
    for r in result["rollouts"]:
        print(f"  {r['checkpoint']:32s} old model still serving: {r['still_serving']}; reported: {str(r['reported'])[:110]}")
    return result["non_200"] == 0 and all(r["still_serving"] and r["reported"] for r in result["rollouts"])


def drill_kill_controller(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory() as tmp, local_ray(), running_app(plain_app(Path(tmp), replicas=1)) as base:
        result = kill_controller_drill(base, clients=args.clients, seconds=args.seconds, kill_at=args.seconds / 3)
    print(f"kill the Serve controller ({result['clients']} clients): {result['sent']} requests, statuses {result['statuses']}; "
          f"{result['sent_while_down']} sent while it was down, {result['non_200_while_down']} of them not 200; "
          f"the app reported RUNNING again after {result['restarted_after_s']} s")
    return result["non_200"] == 0 and result["restarted_after_s"] is not None


def drill_kill_proxy(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory() as tmp, local_ray(), running_app(plain_app(Path(tmp), replicas=1)) as base:
        result = kill_proxy_drill(base, clients=args.clients, seconds=args.seconds, kill_at=args.seconds / 3)
    print(f"kill the HTTP proxy ({result['clients']} clients retrying with backoff): {result['sent']} attempts, statuses "
          f"{result['statuses']}; outage {result['outage_s']:.1f} s; {result['lost']} requests lost")
    return result["lost"] == 0


def drill_load(args: argparse.Namespace) -> bool:
    import drills_load

    with tempfile.TemporaryDirectory() as tmp, local_ray():
        app_args = drills_load.autoscaling_app(Path(tmp), crop_size=args.crop, max_replicas=args.max_replicas,
                                               downscale_delay_s=args.downscale_s)
        with running_app(app_args) as base:
            r = drills_load.load_drill(base, clients=args.load_clients, seconds=args.load_seconds, cooldown_s=args.downscale_s + 90)
        drills_load.print_timeline(r)
        print(f"load: {r['clients']} clients for {r['seconds']:.0f} s on the ADE20K architecture at {args.crop}x{args.crop}: "
              f"{r['sent']} requests, statuses {r['statuses']}, {r['throughput_per_s']:.1f}/s, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms; replicas 1 -> {r['peak_replicas']} (at {r['peak_at_s']:.0f} s; metrics endpoint "
              f"{r['peak_healthy_metric']:.0f}) -> {r['final_replicas']} ({r['scaled_down_after_s']} s after the load)")
        full_args = {**app_args, "generator": {**app_args["generator"], "max_ongoing_requests": 4, "max_queued_requests": 4,
                                               "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}
        with running_app(full_args) as base:
            q = drills_load.queue_full_drill(base, clients=args.load_clients, seconds=30.0)
        print(f"queue full: {q['clients']} clients against 1 replica holding 4 + 4 queued: statuses {q['statuses']}, "
              f"503 without Retry-After {q['503_without_retry_after']}, p50 of a 503 {q['p50_503_ms']:.0f} ms, of a 200 "
              f"{q['p50_200_ms']:.0f} ms")
    ok = (r["other_errors"] == 0 and r["503_without_retry_after"] == 0 and r["peak_replicas"] > 1 and r["final_replicas"] == 1
          and q["503_without_retry_after"] == 0 and q["other"] == 0 and q["statuses"].get("200", 0) > 0)
    return ok


def drill_disconnect(args: argparse.Namespace) -> bool:
    import drills_load

    with tempfile.TemporaryDirectory() as tmp, local_ray():
        app_args = drills_load.autoscaling_app(Path(tmp), crop_size=args.crop, max_replicas=1)
        with running_app(app_args) as base:
            r = drills_load.disconnect_drill(base, patient=4, impatient=32, hang_up_after_s=1.0, seconds=20.0)
    print(f"clients hanging up: {r['hung_up']} hung up while queued behind {r['patient_clients']} busy clients; "
          f"images computed {r['images_computed']:.0f} for {r['answered']} answers ({r['computed_for_hung_up']:.0f} for the "
          f"hung-up requests); replica dropped {r['cancelled_queued']:.0f} queued, {r['cancelled_running']:.0f} were "
          f"already computing; 499s counted by Serve's proxy {r['proxy_499']:.0f}, by the app's ingress {r['ingress_499']:.0f}")
    return r["computed_for_hung_up"] <= 2 * 4 and r["proxy_499"] == r["hung_up"]


def drill_hang(args: argparse.Namespace) -> bool:
    import drills_load

    with tempfile.TemporaryDirectory() as tmp, local_ray():
        app_args = plain_app(Path(tmp), replicas=2)
        app_args["generator"].update(health_check_period_s=2.0, health_check_timeout_s=5.0, graceful_shutdown_timeout_s=5.0)
        with running_app(app_args) as base:
            r = drills_load.hang_drill(base, clients=args.clients, seconds=args.seconds, hang_at=args.seconds / 4)
    print(f"a replica hangs mid-batch (SIGSTOP, 2 replicas, {r['clients']} clients): {r['sent']} requests, statuses "
          f"{r['statuses']}; found after {r['found_after_s']} s, replaced after {r['replaced_after_s']} s, its process gone after "
          f"{r['process_gone_after_s']} s; {r['served_while_hung']} served around it meanwhile; slowest answer "
          f"{r['max_latency_s']:.1f} s; p50 {r['p50_before_ms']:.0f} ms before, {r['p50_after_ms']:.0f} ms after")
    return r["server_errors"] == 0 and r["replaced_after_s"] is not None and r["non_200"] <= 0.01 * r["sent"]


def drill_kill_train_driver(args: argparse.Namespace) -> bool:
    import drills_train

    with tempfile.TemporaryDirectory() as tmp:
        r = drills_train.kill_driver_drill(Path(tmp), steps=args.train_steps, kill_after_step=args.train_steps // 2 + 1)
    print(f"kill the spade-train driver at step {r['killed_at_step']} of {r['steps']}: newest whole checkpoint at step "
          f"{r['newest_whole_checkpoint_step']}; the rerun resumed at step {r['resumed_at_step']} and ended at step "
          f"{r['final_step']} (exit {r['rerun_exit']}, {r['rerun_s']:.0f} s); steps logged once each: "
          f"{r['logged_steps'] == list(range(1, r['steps'] + 1))}; Ray processes still running 20 s after the kill: "
          f"{[c.split()[0] for c in r['left_running']]}")
    return bool(r["ok"])


def drill_kill_train_upload(args: argparse.Namespace) -> bool:
    import drills_train

    with tempfile.TemporaryDirectory() as tmp:
        r = drills_train.kill_uploader_drill(Path(tmp), steps=args.train_steps)
    print(f"kill the rank-0 worker as it uploads a checkpoint: {r['files_present']} files of it had arrived "
          f"({r['gap_at_kill'] or 'the upload had finished'}); newest checkpoint for serving meanwhile: {r['newest_while_down']} "
          f"(partial taken: {r['partial_taken']}); Ray Train resumed at step {r['resumed_at_step']} and ended at step "
          f"{r['final_step']} (exit {r['exit']}, {r['total_s']:.0f} s in all); partial folder left in the run: {r['partial_left_behind']}")
    return bool(r["ok"])


def drill_kill_prepare(args: argparse.Namespace) -> bool:
    import drills_train

    with tempfile.TemporaryDirectory() as tmp:
        r = drills_train.kill_prepare_drill(Path(tmp), runs=args.runs)
    kills = [k for run in r["runs"] for k in run["kills"]]
    print(f"kill train_job.prepare ({r['pairs']} pairs, {r['shards']} shards, {r['uninterrupted_s']:.1f} s uninterrupted): "
          f"{len(r['runs'])} runs, {r['killed']} kills landed mid-work (shards complete at each: "
          f"{[k['shards_present'] for k in kills if not k['finished_first']]}, {sum(k['temp_files'] for k in kills)} temporary "
          f"files left by them); reruns identical to the uninterrupted run: {sum(run['identical'] for run in r['runs'])} of {len(r['runs'])}")
    return bool(r["ok"])


DRILLS = {"fuzz": drill_fuzz, "hostile": drill_hostile, "kill-replica": drill_kill_replica, "broken-rollout": drill_broken_rollout,
          "kill-controller": drill_kill_controller, "kill-proxy": drill_kill_proxy, "load": drill_load,
          "disconnect": drill_disconnect, "hang": drill_hang, "kill-train-driver": drill_kill_train_driver,
          "kill-train-upload": drill_kill_train_upload, "kill-prepare": drill_kill_prepare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drill", choices=[*DRILLS, "all"])
    parser.add_argument("--cases", type=int, default=5000, help="fuzz: schemathesis cases in all (about)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="kill-replica: generator replicas (each a run)")
    parser.add_argument("--clients", type=int, default=4, help="kill-replica: concurrent clients")
    parser.add_argument("--seconds", type=float, default=45.0, help="kill-replica: load duration (the kill at a third)")
    parser.add_argument("--load-clients", type=int, default=64, help="load: concurrent clients")
    parser.add_argument("--load-seconds", type=float, default=300.0, help="load: duration of the load")
    parser.add_argument("--crop", type=int, default=64, help="load, disconnect: output size of the ADE20K-architecture model")
    parser.add_argument("--max-replicas", type=int, default=4, help="load: autoscaling's max_replicas")
    parser.add_argument("--downscale-s", type=float, default=10.0, help="load: autoscaling's downscale_delay_s")
    parser.add_argument("--train-steps", type=int, default=12, help="kill-train-*: steps of the run (6 per epoch)")
    parser.add_argument("--runs", type=int, default=4, help="kill-prepare: outputs, each killed 3 times then finished")
    args = parser.parse_args(argv)
    chosen = list(DRILLS) if args.drill == "all" else [args.drill]
    results = {name: DRILLS[name](args) for name in chosen}
    print("\n" + "\n".join(f"{name:14s} {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
