"""Training and data drills: the processes of ``spade-train`` and ``train_job.prepare`` SIGKILLed
at the worst moments, then started again; each returns its figures (bench/drills.py prints them).

* ``kill_driver_drill``: the ``spade-train`` driver killed mid-run; the rerun of the same
  command must continue from the newest whole checkpoint with the step count exact.
* ``kill_uploader_drill``: the rank-0 worker killed the moment it starts uploading a
  checkpoint; the partial folder must never be taken as the newest (training, serving,
  evaluation) and Ray Train must restart the workers from the checkpoint before.
* ``kill_prepare_drill``: ``train_job.prepare`` killed at random points, several times per
  run; the rerun must end with shards identical, byte for byte, to an uninterrupted run's.

Processes are found through /proc (Linux), so no extra dependency is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "cluster" / "configs" / "tiny.yaml"
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


# ---------------------------------------------------------------------------------------
# Processes


def session_pids(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (a drill starts each command in its own session)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def holds_file_under(pid: int, folder: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)):
                return True
        except OSError:
            continue
    return False


def wait_session_gone(sid: int, timeout: float) -> list[str]:
    """Wait for a killed command's other processes to exit; the ones left (then killed) are
    returned as their command lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = session_pids(sid)
        if not left:
            return []
        time.sleep(0.5)
    left = session_pids(sid)
    names = [cmdline(pid)[:160] for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return names


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_for(predicate: Callable[[], Any], *, timeout: float, proc: subprocess.Popen[bytes] | None = None, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the command exited ({proc.returncode}) before the drill's moment came")
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s")


# ---------------------------------------------------------------------------------------
# Training


def training_data(root: Path, *, n: int = 24, size: int = 64) -> Path:
    """A small synthetic ADE20K-layout split as shards (6 rows each)."""
    from train_job.prepare import main as prepare_main
    from train_job.synthetic import write_dataset

    write_dataset(root / "ade", n=n, size=size, seed=0, split="training")
    out = root / "shards"
    if prepare_main(["--dataset", "ade20k", "--root", str(root / "ade"), "--split", "train", "--out", str(out),
                     "--shard-rows", "6", "--no-progress"]) != 0:
        raise RuntimeError("preparing the drill's shards failed")
    return out


def train_command(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """``spade-train`` on the tiny preset, 2 workers, 4 examples per step, a checkpoint every 4 steps."""
    overrides = [f"data.shards={shards}", f"storage.path={runs}", f"storage.name={name}", "data.batch_size=4",
                 "model.generator.ngf=8", "checkpoint.every_steps=4", "checkpoint.keep=2", "logging.every_steps=1",
                 "logging.sample_grid_every_steps=0", "logging.metrics_port=null", *extra]
    return [sys.executable, "-m", "train_job", "--config", str(TINY), *(a for o in overrides for a in ("--set", o))]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            steps.append(int(json.loads(line)["step"]))
    return steps


def checkpoint_step(path: Path | None) -> int | None:
    import torch

    if path is None:
        return None
    return int(torch.load(path / "training" / "state.pt", weights_only=True)["state"]["step"])


def kill_driver_drill(root: Path, *, steps: int = 12, kill_after_step: int = 7, timeout: float = 600.0) -> dict[str, Any]:
    """SIGKILL the driver once the run has logged ``kill_after_step``; rerun; check the step count."""
    from spade_core.runs import latest_in_run

    shards = training_data(root)
    runs, name = root / "runs", "driver"
    run = runs / name
    cmd = train_command(shards, runs, name, f"optim.niter=0", f"optim.niter_decay={steps // 6}")  # 6 steps per epoch
    log = root / "driver.log"
    t0 = time.monotonic()
    first = start(cmd, log)
    wait_for(lambda: max(logged_steps(run), default=0) >= kill_after_step, timeout=timeout, proc=first)
    os.kill(first.pid, signal.SIGKILL)
    killed_at_step = max(logged_steps(run))
    first.wait()
    leaked = wait_session_gone(first.pid, timeout=20.0)
    newest = latest_in_run(run)
    expected = checkpoint_step(newest)
    restart = time.monotonic()
    second = start(cmd, log)
    rc = second.wait(timeout=timeout)
    wait_session_gone(second.pid, timeout=30.0)
    text = log.read_text(errors="replace")
    resumed = [int(m.group(2)) for m in RESUMED.finditer(text)]
    final = latest_in_run(run)
    return {
        "killed_at_step": killed_at_step, "newest_whole_checkpoint_step": expected, "left_running": leaked,
        "rerun_exit": rc, "resumed_at_step": resumed[-1] if resumed else None, "final_step": checkpoint_step(final),
        "steps": steps, "logged_steps": logged_steps(run), "rerun_s": time.monotonic() - restart,
        "total_s": time.monotonic() - t0,
        "ok": (rc == 0 and resumed and resumed[-1] == expected and checkpoint_step(final) == steps
               and logged_steps(run) == list(range(1, steps + 1))),
    }


def kill_uploader_drill(root: Path, *, steps: int = 12, timeout: float = 600.0) -> dict[str, Any]:
    """SIGKILL the rank-0 worker the moment the first file of its second checkpoint arrives in the run directory.

    A wide discriminator (ndf 64: ~90 MB with its Adam state) makes the upload last long enough
    for the kill to land inside it; where it landed (files present) is part of the figures."""
    from spade_core.checkpoint import incomplete
    from spade_core.runs import CHECKPOINT_PREFIX, latest_in_run

    shards = training_data(root)
    runs, name = root / "runs", "uploader"
    run = runs / name
    cmd = train_command(shards, runs, name, "optim.niter=0", f"optim.niter_decay={steps // 6}", "scaling.max_failures=1",
                        "model.discriminator.ndf=64")
    log = root / "uploader.log"
    t0 = time.monotonic()
    proc = start(cmd, log)
    folders = lambda: sorted(p for p in run.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())  # noqa: E731
    wait_for(lambda: len(folders()) >= 1 and latest_in_run(run) is not None, timeout=timeout, proc=proc)
    first = folders()

    def rank0() -> int | None:  # the worker holding files of the run open (TensorBoard's event file)
        workers = [p for p in session_pids(proc.pid) if "RayTrainWorker" in cmdline(p)]
        holders = [p for p in workers if holds_file_under(p, run)]
        return holders[0] if len(holders) == 1 else None

    uploader = wait_for(rank0, timeout=timeout, proc=proc)
    def arriving() -> list[Path]:  # the next checkpoint folder, once its first file is there
        return [p for p in folders() if p not in first and any(f.is_file() for f in p.rglob("*"))]

    new = wait_for(arriving, timeout=timeout, proc=proc, poll=0.0005)
    os.kill(uploader, signal.SIGKILL)
    partial = new[0]
    time.sleep(0.5)
    gap = incomplete(partial)
    present = sum(1 for f in partial.rglob("*") if f.is_file())
    newest_while_down = latest_in_run(run)
    expected = checkpoint_step(newest_while_down)  # 4, or the new one's if the kill came after its last byte
    rc = proc.wait(timeout=timeout)
    wait_session_gone(proc.pid, timeout=30.0)
    text = log.read_text(errors="replace")
    resumed = [int(m.group(2)) for m in RESUMED.finditer(text)]
    final = latest_in_run(run)
    logged = logged_steps(run)
    return {
        "partial_folder": partial.name, "gap_at_kill": gap, "files_present": present, "newest_while_down": None if newest_while_down is None else newest_while_down.name,
        "partial_taken": newest_while_down == partial and gap is not None, "exit": rc, "expected_resume_step": expected,
        "resumed_at_step": resumed[-1] if resumed else None, "final_step": checkpoint_step(final), "steps": steps,
        "logged_steps": logged, "partial_left_behind": partial.exists(), "total_s": time.monotonic() - t0,
        "ok": (rc == 0 and not (newest_while_down == partial and gap is not None) and resumed and resumed[-1] == expected
               and checkpoint_step(final) == steps and logged[-1] == steps and sorted(set(logged)) == list(range(1, steps + 1))),
    }


# ---------------------------------------------------------------------------------------
# Data preparation


def shard_digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def kill_prepare_drill(root: Path, *, runs: int = 4, kills_per_run: int = 3, n: int = 600, shard_rows: int = 25,
                       seed: int = 0) -> dict[str, Any]:
    """An uninterrupted prepare, then ``runs`` outputs each killed ``kills_per_run`` times and
    finished by a last run. Each kill lands at a random point of the work still to do: once a
    random number of shards is complete (from those present up to all of them, which targets
    the manifest's write), after a random fraction of one shard's writing time."""
    from train_job.synthetic import write_dataset

    write_dataset(root / "ade", n=n, size=64, seed=0, split="training")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "train_job.prepare", "--dataset", "ade20k", "--root", str(root / "ade"), "--split", "train",
                "--out", str(out), "--shard-rows", str(shard_rows), "--workers", "2", "--no-progress"]

    def parts(out: Path) -> list[str]:
        return sorted(p.name for p in (out / "train").glob("part-*.parquet")) if (out / "train").is_dir() else []

    clean = root / "clean"
    t0 = time.monotonic()
    proc = start(cmd(clean), root / "clean.log")
    first_shard = wait_for(lambda: parts(clean) and time.monotonic(), timeout=600, proc=proc, poll=0.01)
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted prepare failed: see {root / 'clean.log'}")
    duration = time.monotonic() - t0
    reference = shard_digests(clean)
    shards = len(parts(clean))
    per_shard = (time.monotonic() - first_shard) / max(shards - 1, 1)
    rng = random.Random(seed)
    results = []
    for r in range(runs):
        out = root / f"killed{r}"
        kills = []
        for _ in range(kills_per_run):
            target = rng.randint(len(parts(out)), shards)
            proc = start(cmd(out), root / f"prepare{r}.log")
            with contextlib.suppress(RuntimeError):  # it may finish first: then nothing was left to interrupt
                wait_for(lambda: len(parts(out)) >= target, timeout=600, proc=proc, poll=0.01)
                time.sleep(rng.uniform(0.0, per_shard))
            finished = proc.poll() is not None
            if not finished:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and its decoding processes
            proc.wait()
            wait_session_gone(proc.pid, timeout=30.0)
            names = [p.name for p in (out / "train").iterdir()] if (out / "train").is_dir() else []
            kills.append({"after_shards": target, "shards_present": len(parts(out)), "temp_files": sum(n.startswith(".") for n in names),
                          "manifest": (out / "manifest.json").is_file(), "finished_first": finished})
        rc = subprocess.run(cmd(out), cwd=REPO, capture_output=True).returncode
        digests = shard_digests(out)
        results.append({"kills": kills, "exit": rc, "identical": digests == reference,
                        "differing": sorted(k for k in set(digests) | set(reference) if digests.get(k) != reference.get(k))})
    return {"pairs": n, "shards": shards, "uninterrupted_s": duration, "runs": results,
            "killed": sum(not k["finished_first"] for r in results for k in r["kills"]),
            "ok": all(r["exit"] == 0 and r["identical"] for r in results)}
