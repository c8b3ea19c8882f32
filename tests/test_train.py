"""The training job on a local Ray: 2 workers, checkpoints, fault tolerance, exact resume, synced BN."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spade_core
from train_job.__main__ import build_trainer, main as train_main
from train_job.callbacks import KillWorkerOnce, SaveNormStats, StopAtStep
from train_job.config import load_train_config
from train_job.prepare import main as prepare_main
from train_job.synthetic import write_dataset

from .conftest import REPO

pytestmark = pytest.mark.slow
TINY = REPO / "cluster/configs/tiny.yaml"
N_EXAMPLES = 24  # 2 workers x 2 per worker: 6 steps per epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root / "ade", n=N_EXAMPLES, size=64, seed=0, split="training")
    out = root / "shards"
    assert prepare_main(["--dataset", "ade20k", "--root", str(root / "ade"), "--split", "train", "--out", str(out),
                         "--shard-rows", "6"]) == 0
    return out


def tiny_config(shards: Path, runs: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    overrides = [
        f"data.shards={shards}", f"storage.path={runs}", f"storage.name={name}", "data.batch_size=4",
        "model.generator.ngf=8", "model.discriminator.ndf=8", "optim.niter=0", "optim.niter_decay=2",
        "checkpoint.every_steps=4", "checkpoint.keep=2", "logging.every_steps=1", "logging.sample_grid_every_steps=6",
        "logging.metrics_port=null", *extra,
    ]
    return load_train_config(TINY, overrides)


def metrics(runs: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]


def saved_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / "training/state.pt", weights_only=True)


def test_two_workers_train_and_the_checkpoint_loads(ray_cluster, shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(shards, tmp_path, "basic", "optim.niter_decay=1", "logging.sample_grid_every_steps=3")  # one epoch
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    result = build_trainer(cfg, callbacks=[SaveNormStats(stats_dir)]).fit()
    assert result.error is None and result.checkpoint is not None
    state = saved_state(result.checkpoint.path)
    assert state["state"] == {"step": 6, "epoch": 1, "epoch_step": 0}
    model = spade_core.load_checkpoint(result.checkpoint.path)  # what serving loads (EMA generator)
    assert model.config == cfg.model and model.discriminator is not None
    assert model.synthesize(torch.zeros(1, 64, 64, dtype=torch.long)).shape == (1, 3, 64, 64)
    assert [m["step"] for m in metrics(tmp_path, "basic")] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "basic/samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    # synced batch norm: both ranks hold the same global running statistics
    rank0, rank1 = (torch.load(stats_dir / f"rank{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], atol=1e-5, rtol=1e-5, msg=key)


def test_unsynced_batch_norm_statistics_differ_across_ranks(ray_cluster, shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The control for the test above: without synced BN the ranks' statistics drift apart."""
    cfg = tiny_config(shards, tmp_path, "unsynced", "scaling.sync_batchnorm=false", "optim.niter_decay=1")
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    assert build_trainer(cfg, callbacks=[SaveNormStats(stats_dir)]).fit().error is None
    rank0, rank1 = (torch.load(stats_dir / f"rank{r}.pt") for r in range(2))
    assert any(not torch.allclose(rank0[k], rank1[k], atol=1e-5) for k in rank0)


@pytest.mark.e2e  # a fault drill (a worker process exits mid-run), like tests/test_drills_train.py
def test_a_killed_worker_is_replaced_and_training_resumes(ray_cluster, shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(shards, tmp_path, "faulty", "scaling.max_failures=1", "optim.niter_decay=1")
    result = build_trainer(cfg, callbacks=[KillWorkerOnce(5)]).fit()
    assert result.error is None
    assert (tmp_path / "faulty/.fault_injected").exists()  # the worker really died once
    assert saved_state(result.checkpoint.path)["state"]["step"] == 6
    # step 5 ran, died, and ran again after resuming from step 4: its first record left the log
    assert [m["step"] for m in metrics(tmp_path, "faulty")] == list(range(1, 7))


def test_rerun_and_resume_flag_continue_the_exact_step_lr_schedule_and_optimiser_state(ray_cluster, shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(shards, tmp_path, "resumed")
    first = build_trainer(cfg, callbacks=[StopAtStep(4)]).fit()  # stops mid-epoch 0
    assert saved_state(first.checkpoint.path)["state"] == {"step": 4, "epoch": 0, "epoch_step": 4}
    # --resume (before the rerun below prunes that checkpoint): a new run, under its own name,
    # starts from the first run's step-4 checkpoint
    branched_cfg = tiny_config(shards, tmp_path, "branched", f"storage.resume_from={first.checkpoint.path}")
    branched = build_trainer(branched_cfg, callbacks=[StopAtStep(8)]).fit()
    assert saved_state(branched.checkpoint.path)["state"] == {"step": 8, "epoch": 1, "epoch_step": 2}
    assert [m["step"] for m in metrics(tmp_path, "branched")] == list(range(5, 9))  # 4 from the source, 4 here
    second = build_trainer(cfg).fit()  # same storage + name: Ray Train hands back the latest checkpoint
    final = saved_state(second.checkpoint.path)
    assert final["state"] == {"step": 12, "epoch": 2, "epoch_step": 0}
    records = metrics(tmp_path, "resumed")
    assert [m["step"] for m in records] == list(range(1, 13))  # no step repeated or lost
    # linear decay over niter_decay=2 epochs: full rate in epoch 0, half in epoch 1
    for m in records:
        assert m["lr_g"] == pytest.approx(cfg.optim.learning_rates(m["epoch"])[0])
        assert m["epoch"] == (m["step"] - 1) // 6
    assert {m["lr_g"] for m in records} == {1e-4, 5e-5}
    # Adam continued: its step count covers both runs
    adam_steps = {int(s["step"]) for s in final["optimizers"]["generator"]["state"].values()}
    assert adam_steps == {12}


def test_cli_reports_bad_configs_and_mismatched_shards(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", str(TINY), "--set", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "train_job", "--config", str(TINY), "--set", f"data.shards={shards}",
         "--set", f"storage.path={tmp_path}", "--set", "model.labels.label_nc=20"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "label_nc" in result.stderr
