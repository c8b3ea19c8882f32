"""Ray Data streaming from prepared shards to training batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spade_core.preprocess import PreprocessConfig
from train_job.pipeline import build_dataset, iter_training_batches
from train_job.shards import open_shards
from train_job.prepare import main as prepare_main

from .conftest import SAMPLES

PRE = PreprocessConfig(mode="resize_and_crop", load_size=72, crop_size=64)


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco_shards")
    assert prepare_main(["--dataset", "coco_stuff", "--root", str(SAMPLES / "coco_stuff"), "--split", "train",
                         "--out", str(out), "--shard-rows", "4"]) == 0
    return out


def test_open_shards_reads_the_manifest(coco_shards: Path) -> None:
    shards = open_shards(str(coco_shards), "train")
    assert shards.count == 13 and len(shards.paths) == 4
    assert shards.labels.label_nc == 182 and shards.has_instance
    with pytest.raises(ValueError, match="no 'val' split"):
        open_shards(str(coco_shards), "val")
    with pytest.raises(ValueError, match="prepare the data first"):
        open_shards(str(coco_shards / "nowhere"), "train")


def test_training_refuses_data_of_another_format_version(coco_shards: Path, tmp_path: Path) -> None:
    """The reader checks the manifest exactly as prepare does, so data written by a newer
    (or older) format is refused by name instead of misread."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(coco_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="not a spade-ray manifest of format_version 1"):
        open_shards(str(other), "train")


@pytest.mark.slow
def test_dataset_yields_preprocessed_examples(ray_cluster, coco_shards: Path) -> None:  # type: ignore[no-untyped-def]
    ds = build_dataset(str(coco_shards), split="train", preprocess=PRE, train=False, seed=0)
    rows = ds.take_all()
    assert len(rows) == 13
    for row in rows:
        assert row["image"].shape == (64, 64, 3) and row["image"].dtype == np.uint8
        assert row["label"].shape == (64, 64) and row["instance"].shape == (64, 64)
        assert set(np.unique(row["label"])) <= set(range(182)) | {255}
    again = {r["key"]: r for r in build_dataset(str(coco_shards), split="train", preprocess=PRE, train=False, seed=0).take_all()}
    for row in rows:  # evaluation with a seed is reproducible
        assert np.array_equal(again[row["key"]]["image"], row["image"])


@pytest.mark.slow
def test_two_train_workers_get_equal_whole_batches_reshuffled_per_epoch(ray_cluster, coco_shards: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = str(tmp_path)

    def loop(config: dict) -> None:
        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        log = []
        for epoch in range(2):
            keys, shapes = [], []
            for batch in iter_training_batches(shard, batch_size=2, epoch=epoch, seed=0):
                shapes.append(tuple(batch["image"].shape))
                assert batch["image"].dtype == torch.float32 and -1 <= float(batch["image"].min())
                assert float(batch["image"].max()) <= 1 and batch["label"].dtype == torch.int64
                keys.append(float(batch["image"].sum()))
            log.append({"steps": len(shapes), "shapes": shapes, "sums": keys})
        Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(log))
        ray.train.report({"done": 1})

    ds = build_dataset(str(coco_shards), split="train", preprocess=PRE, train=True, seed=0, decode_cpus=0.5)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": out_dir},
        # 0.5 CPU per worker leaves room for Ray Data's tasks on a 2-CPU node (1 each would hang)
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="pipeline"),
    )
    trainer.fit()
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = {epoch["steps"] for log in logs for epoch in log}
    assert steps == {3}  # 13 rows split equally (6 each), whole batches of 2
    assert all(s == [2, 3, 64, 64] for log in logs for epoch in log for s in epoch["shapes"])
    # new crops and order every epoch
    assert any(log[0]["sums"] != log[1]["sums"] for log in logs)
