"""Evaluation during training: the eval section, the best checkpoint, records, and a real TorchTrainer run."""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
import torch

import spade_core
from train_job.__main__ import build_trainer
from spade_core.runs import BEST_DIR, BEST_FILE, read_best
from train_job.checkpointing import BestCheckpoint
from train_job.config import TrainConfig, dump_yaml, load_train_config
from train_job.metrics import MetricsLog, start_prometheus
from train_job.prepare import main as prepare_main
from train_job.synthetic import write_dataset
from train_job.validation import TrainingEvaluator

from .conftest import REPO

TINY = REPO / "cluster/configs/tiny.yaml"
N_TRAIN = 8  # 1 worker x batch 4: 2 steps per epoch
N_VAL = 8


@pytest.fixture(scope="module")
def inception(random_inception_file: Path) -> Path:
    return random_inception_file


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 64 px scenes: a train split and a val split in one manifest."""
    root = tmp_path_factory.mktemp("eval_train")
    write_dataset(root / "ade", n=N_TRAIN, size=64, seed=0, split="both", val_n=N_VAL)
    out = root / "shards"
    for split in ("train", "val"):
        assert prepare_main(["--dataset", "ade20k", "--root", str(root / "ade"), "--split", split, "--out", str(out),
                             "--shard-rows", "3", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def train_only_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_only")
    write_dataset(root / "ade", n=4, size=64, seed=0, split="training")
    out = root / "shards"
    assert prepare_main(["--dataset", "ade20k", "--root", str(root / "ade"), "--split", "train", "--out", str(out),
                         "--no-progress"]) == 0
    return out


def tiny_config(shards: Path, runs: Path, name: str, *extra: str) -> TrainConfig:
    return load_train_config(TINY, [
        f"data.shards={shards}", f"storage.path={runs}", f"storage.name={name}", "data.batch_size=4",
        "model.generator.ngf=8", "model.discriminator.ndf=8", "scaling.num_workers=1", "optim.niter=0",
        "optim.niter_decay=3", "logging.every_steps=1", "logging.sample_grid_every_steps=0", "logging.metrics_port=null",
        *extra,
    ])


def eval_overrides(inception: Path, every: int = 2) -> list[str]:
    return [f"eval.every_steps={every}", f"eval.num_images={N_VAL}", "eval.metrics=[fid, kid, miou]", "eval.oracle=true",
            f"eval.inception={inception}", "eval.allow_any_inception=true", "eval.dims=64", "eval.batch_size=4"]


# ---------------------------------------------------------------------------------------
# The eval section


BAD = [
    (["eval.every_steps=-1"], "eval.every_steps must be >= 0"),
    (["eval.every_steps=2", "eval.oracle=false", "eval.metrics=null"], "eval.every_steps is 2 but there is nothing to compute"),
    (["eval.every_steps=2", "eval.metrics=[fid]"], "eval.metrics includes fid, which needs eval.inception"),
    (["eval.every_steps=2", "eval.metrics=[kid]", "eval.oracle=true"], "eval.metrics includes kid, which needs eval.inception"),
    (["eval.every_steps=2", "eval.oracle=false", "eval.inception=/w.pth"], "eval.metrics includes miou, which needs eval.segmenter"),
    (["eval.metrics=[lpips]"], "eval.metrics has an unknown metric 'lpips'"),
    (["eval.metrics=fid"], "eval.metrics has a wrong value 'fid'"),
    (["eval.metrics=[fid, fid]"], "eval.metrics lists a metric twice"),
    (["eval.metrics=[]"], "eval.metrics is empty"),
    (["eval.dims=100"], "eval.dims must be one of 64, 192, 768, 2048"),
    (["eval.split=test"], "eval.split must be train, training, val or validation"),
    (["eval.num_images=0"], "eval.num_images must be >= 1"),
    (["eval.every_steps=2", "eval.metrics=[kid]", "eval.inception=/w.pth", "eval.num_images=1"],
     "eval.num_images must be >= 2 for fid and kid"),
    (["eval.batch_size=0"], "eval.batch_size must be >= 1"),
    (["eval.batch_size=true"], "eval.batch_size has a wrong value True"),
    (["eval.segmenter=/s.pt"], "eval.segmenter and eval.oracle are both set"),
    (["eval.oracle=false", "eval.segmenter_offset=1"], "eval.segmenter_offset is set but eval.segmenter is not"),
    (["eval.inception=''"], "eval.inception must be a path or null"),
    (["eval.nope=1"], "unknown key eval.nope"),
    (["checkpoint.best_by=miou"], "checkpoint.best_by is 'miou' but eval.every_steps is 0"),
    (["eval.every_steps=2", "checkpoint.best_by=fid"], "checkpoint.best_by is 'fid' but eval computes only miou"),
    (["checkpoint.best_by=lpips"], "checkpoint.best_by has a wrong value 'lpips'"),
    (["eval.every_steps=2", "model.labels.dataset=cityscapes"], "eval.oracle labels the synthetic ADE20K-layout scenes"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_eval_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_config(TINY, overrides)


def test_eval_defaults_off_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    off = load_train_config(TINY, ["eval.oracle=false", "eval.metrics=null"])
    assert not off.eval.enabled and off.eval.chosen_metrics == () and off.checkpoint.best_by is None
    assert load_train_config(TINY).eval.every_steps == 0  # the quickstart stays as fast as before
    c = load_train_config(TINY, ["eval.every_steps=5", "eval.metrics=null", "eval.inception=weights/inc.pth",
                                 "checkpoint.best_by=kid", "eval.split=validation"])
    assert c.eval.chosen_metrics == ("fid", "kid", "miou")  # null: every metric the given files allow
    assert c.eval.value_names == ("fid", "kid", "kid_std", "miou", "pixel_accuracy")
    assert c.eval.inception == str(tmp_path / "weights/inc.pth")  # made absolute, like the other paths
    assert c.eval.split == "val"
    listed = load_train_config(TINY, ["eval.every_steps=5", "eval.metrics=[miou]"])
    assert listed.eval.metrics == ("miou",)
    for config in (c, listed):
        assert TrainConfig.from_dict(config.to_dict()) == config
        dump_yaml(config, tmp_path / "dumped.yaml")
        assert load_train_config(tmp_path / "dumped.yaml") == config


def test_job_start_checks_the_eval_split_and_its_size(train_only_shards: Path, shards: Path, tmp_path: Path) -> None:
    on = ["eval.every_steps=2", "eval.num_images=4"]
    with pytest.raises(ValueError, match=r"eval.split 'val': .* has no 'val' split; prepared splits: \['train'\]"):
        build_trainer(tiny_config(train_only_shards, tmp_path, "no_val", *on))
    with pytest.raises(ValueError, match=rf"eval.num_images is 9 but the 'val' split .* holds {N_VAL} pairs"):
        build_trainer(tiny_config(shards, tmp_path, "too_many", "eval.every_steps=2", "eval.num_images=9"))


# ---------------------------------------------------------------------------------------
# The best checkpoint and the records, without Ray


@pytest.fixture(scope="module")
def tiny_model() -> spade_core.SpadeModel:
    return spade_core.build_model(tiny_config(Path("/x"), Path("/r"), "m").model, seed=0)


def test_best_checkpoint_keeps_the_best_value_and_survives_a_restart(tmp_path: Path, tiny_model: spade_core.SpadeModel) -> None:
    best = BestCheckpoint(tmp_path, "fid")
    kw = {"model": tiny_model, "ema_generator": None, "epoch": 0}
    assert best.offer({"fid": 30.0, "miou": 0.1}, step=2, **kw)
    assert not best.offer({"fid": 31.0}, step=4, **kw)  # lower is better for fid
    assert not best.offer({"fid": 30.0}, step=5, **kw)  # a tie keeps the earlier model
    assert not best.offer({"fid": None}, step=6, **kw) and not best.offer({"fid": math.nan}, step=7, **kw)
    with torch.no_grad():
        next(tiny_model.generator.parameters()).add_(1.0)  # the weights of step 8 differ
    assert best.offer({"fid": 20.0}, step=8, **kw)
    record = read_best(tmp_path)
    assert record is not None and (record["metric"], record["value"], record["step"]) == ("fid", 20.0, 8)
    assert record["checkpoint"] == str(tmp_path / BEST_DIR) and json.loads((tmp_path / BEST_FILE).read_text())["checkpoint"] == BEST_DIR
    loaded = spade_core.load_checkpoint(record["checkpoint"])
    for key, value in tiny_model.generator.state_dict().items():
        torch.testing.assert_close(loaded.generator.state_dict()[key], value, msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR, BEST_FILE]  # no temporary folders left
    # a restart reads it back: a worse value after resuming replaces nothing
    again = BestCheckpoint(tmp_path, "fid")
    assert (again.value, again.step) == (20.0, 8) and not again.offer({"fid": 25.0}, step=9, **kw)
    # higher is better for miou; a run choosing by another metric starts over
    by_miou = BestCheckpoint(tmp_path, "miou")
    assert by_miou.value is None and by_miou.offer({"miou": 0.2}, step=10, **kw) and not by_miou.offer({"miou": 0.1}, step=11, **kw)


def test_best_checkpoint_repairs_an_interrupted_swap(tmp_path: Path, tiny_model: spade_core.SpadeModel) -> None:
    kw = {"model": tiny_model, "ema_generator": None, "epoch": 0}
    BestCheckpoint(tmp_path, "miou").offer({"miou": 0.5}, step=3, **kw)
    (tmp_path / BEST_DIR).rename(tmp_path / ".best.old")  # stopped between the two renames
    (tmp_path / ".best.tmp-123").mkdir()  # and a half-written copy
    best = BestCheckpoint(tmp_path, "miou")
    assert (tmp_path / BEST_DIR / "config.json").is_file() and not (tmp_path / ".best.old").exists()
    assert not (tmp_path / ".best.tmp-123").exists() and best.value == 0.5
    # stopped after the swap, before best.json: the record inside the copy wins
    inner = json.loads((tmp_path / BEST_DIR / BEST_FILE).read_text())
    (tmp_path / BEST_FILE).write_text(json.dumps({**inner, "value": 0.1, "step": 1}))
    assert BestCheckpoint(tmp_path, "miou").step == 3 and read_best(tmp_path)["value"] == 0.5  # type: ignore[index]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_records_reach_metrics_jsonl_and_prometheus(tmp_path: Path) -> None:
    port = _free_port()
    assert start_prometheus(port, "127.0.0.1")
    log = MetricsLog(tmp_path, prometheus=True, tensorboard=False)
    log.record_eval({"step": 4, "epoch": 1, "eval": {"fid": 12.5, "kid": 0.25, "kid_std": 0.01, "miou": None,
                     "pixel_accuracy": 0.75}, "eval_s": 1.0, "eval_images": 8, "best": False, "time": 0.0})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["eval"]["miou"] is None
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'spade_train_eval{metric="fid"} 12.5' in text and 'spade_train_eval{metric="kid"} 0.25' in text
    assert 'spade_train_eval{metric="pixel_accuracy"} 0.75' in text and 'spade_train_eval{metric="miou"} NaN' in text
    assert "kid_std" not in text


# ---------------------------------------------------------------------------------------
# A real run


def tensorboard_events(folder: Path) -> list:  # type: ignore[type-arg]
    """Every Event in the folder's event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            events.append(event)
            i += 12 + n + 4
    return events


@pytest.mark.slow
def test_a_run_evaluates_records_and_keeps_the_best_checkpoint(ray_cluster, shards: Path, inception: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(
        shards, tmp_path, "evaluated", *eval_overrides(inception, every=2), "optim.max_steps=3",
        "checkpoint.every_steps=2", "checkpoint.keep=1", "checkpoint.best_by=miou",
    )
    result = build_trainer(cfg).fit()
    assert result.error is None
    run = tmp_path / "evaluated"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end of the run
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3]
    for r in evals:
        assert set(r["eval"]) == {"fid", "kid", "kid_std", "miou", "pixel_accuracy"} and r["eval_images"] == N_VAL
        assert all(isinstance(v, float) and math.isfinite(v) for v in r["eval"].values()), r
        assert 0 <= r["eval"]["miou"] <= 1 and r["eval"]["fid"] >= 0
    fids = [r["eval"]["fid"] for r in evals]
    assert fids[0] != fids[1]  # the generator changed between the evaluations

    # best.json: the highest mIoU recorded (a tie keeps the earlier step), and a copy that serving loads
    mious = [r["eval"]["miou"] for r in evals]
    best_at = mious.index(max(mious))
    best = read_best(run)
    assert best is not None and (best["metric"], best["value"], best["step"]) == ("miou", max(mious), evals[best_at]["step"])
    assert best["eval"] == evals[best_at]["eval"] and best["generator"] == "ema"
    assert [r["best"] for r in evals] == [m > max(mious[:i], default=-1.0) for i, m in enumerate(mious)]
    # Ray kept only its newest checkpoint (step 3); the best copy lives beside it, whatever its step
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 1
    model = spade_core.load_checkpoint(best["checkpoint"])
    assert model.config == cfg.model
    # the copy holds the weights that scored: evaluated again here, the same numbers
    # (FID to 1e-2 only: 8 images in 64 dims give a singular covariance, whose square root
    # amplifies the rounding of another thread count in this process to ~5e-4 relative)
    evaluator = TrainingEvaluator(cfg, device=torch.device("cpu"))
    again = evaluator(model.generator).values
    assert again["miou"] == best["value"] and again["fid"] == pytest.approx(fids[best_at], rel=1e-2)
    final = evaluator(spade_core.load_checkpoint(result.checkpoint.path).generator).values
    assert final["fid"] == pytest.approx(fids[-1], rel=1e-2)

    events = tensorboard_events(run / "tensorboard")
    scalars: dict[str, list[int]] = {}
    images: dict[str, list[int]] = {}
    for e in events:
        for v in e.summary.value:
            (images if v.HasField("image") else scalars).setdefault(v.tag, []).append(e.step)
    assert scalars["eval/fid"] == scalars["eval/miou"] == scalars["eval/seconds"] == [2, 3]
    assert scalars["loss/G_GAN"] == scalars["train/images_per_s"] == [1, 2, 3]
    assert images["samples/eval"] == [2, 3]
    eval_s = [round(r["eval_s"], 2) for r in evals]
    step_s = [round(r["step_s"], 2) for r in records if "eval" not in r]
    print(f"\neval seconds {eval_s} ({N_VAL} images each); training step seconds {step_s}")
