"""bench/gpu_check.py: the prepared GPU check runs every stage at toy sizes on the CPU (so it is
ready when a GPU is lent), and its verdicts are the ones a GPU run would give."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

STAGES = {"1 correctness", "2 sync BN", "3 training", "4 inference", "5 serving", "6 VAE", "8 evaluation"}


def make_run(tmp_path: Path) -> gpu_check.Run:
    return gpu_check.Run(sizes=gpu_check.SMOKE, device=torch.device("cpu"), smoke=True, deadline=math.inf, tmp=tmp_path)


def test_relative_error_never_passes_nan_or_a_wrong_shape() -> None:
    ref = torch.randn(2, 3, 8, 8)
    assert gpu_check.relative_error(ref.clone(), ref) == 0.0
    assert gpu_check.relative_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-4)
    poisoned = ref.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    assert gpu_check.relative_error(poisoned, ref) == math.inf
    assert gpu_check.relative_error(ref[:1], ref) == math.inf


def test_a_check_over_its_tolerance_fails_the_run(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    assert run.check("1 correctness", "within", 5e-6, 1e-5)
    assert not run.check("1 correctness", "over", 2e-5, 1e-5)
    assert not run.check("1 correctness", "nan", float("nan"), 1e-5)
    assert len(run.failures) == 2 and "over" in run.failures[0]


def test_low_precision_floor_only_forgives_rounding_the_cpu_shares(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    run.device = torch.device("cuda")  # a GPU run: the floor comes from the CPU computation
    asked = []
    assert run.check("6 VAE", "bf16 at the floor", 0.012, 0.01, floor=lambda: asked.append(1) or 0.011)
    assert not run.check("6 VAE", "bf16 far worse than the CPU", 0.05, 0.01, floor=lambda: 0.011)
    assert run.check("6 VAE", "within: floor not computed", 0.005, 0.01, floor=lambda: asked.append(2) or 1.0)
    assert asked == [1]
    assert run.stage("6 VAE")["checks"][0]["within_tolerance"] is False


def test_refuses_to_run_without_a_gpu_unless_told_to_smoke() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_cpu_smoke_runs_every_stage_and_writes_the_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    stages = results["stages"]
    assert STAGES <= set(stages)
    for name in STAGES:
        assert stages[name].get("status", "ok") == "ok", stages[name].get("error")
    checks = {c["name"]: c for name in STAGES for c in stages[name]["checks"]}
    for name in ("generator plain fp32", "generator fast bf16", "generator fast fp16", "discriminator fp16", "encoder bf16",
                 "2a world size 1 forced_sync_computation", "2b input grad", "2b running stats", "encode fp32 vs CPU"):
        assert checks[name]["ok"], checks[name]
    assert any(n.startswith("fast-path generator gradients vs float64") for n in checks)
    training = stages["3 training"]["rows"]
    assert {r["path"] for r in training} == {"optimised"}  # the smoke run makes no plain fp32 run
    for row in training:
        assert row["images_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1 and row["tflops"] > 0 and row["loss_terms_finite"]
    inference = {(r["variant"], r["precision"], r["batch"]) for r in stages["4 inference"]["rows"]}
    for batch in gpu_check.SMOKE.infer_batches:
        assert {("plain eager", "fp32", batch), ("fast eager", "bf16", batch), ("fast eager", "fp16", batch)} <= inference
    serving = stages["5 serving"]["rows"]
    assert [r["clients"] for r in serving] == list(gpu_check.SMOKE.serve_clients)
    assert all(r["requests"] > 0 for r in serving)
    assert checks["Inception pool features fp32 vs CPU fp32"]["ok"] and checks["spade-eval run: FID, KID and mIoU computed"]["ok"]
    evaluation = {r["what"]: r for r in stages["8 evaluation"]["rows"]}
    assert evaluation["Inception features fp32"]["images_per_s"] > 0
    assert evaluation["spade-eval run"]["images"] == gpu_check.SMOKE.eval_images and evaluation["spade-eval run"]["device"] == "cpu"
    assert {g["goal"].split(" ")[0] for g in results["goals"]} == {"training", "inference", "fast", "serving"}
    assert any(g["goal"].startswith("training data wait") for g in results["goals"])
    profiles = stages["7 profiles"]
    for kind in ("inference", "training"):
        table = next(v for k, v in profiles.items() if k.startswith(kind))
        assert table and all(row["self_ms"] >= 0 and row["name"] for row in table)
    assert results["machine"]["smoke"] is True and results["failures"] == []
    tail = proc.stdout.strip().splitlines()
    assert tail[-2] == "correctness: all checks passed" and tail[-1] == f"results: {out}"
    print(f"cpu smoke took {time.monotonic() - t0:.0f} s")
