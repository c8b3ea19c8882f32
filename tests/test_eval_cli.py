"""spade-eval: pytorch-fid's CLI over spade_core.metrics, and a checkpoint's evaluation through Ray Data."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import spade_core
from spade_core.config import EncoderConfig
from spade_core.metrics import ADE20K, ConfusionMatrix, fid_of_paths, load_fid_inception, load_statistics
from train_job.config import load_train_config
from train_job.eval_cli import main
from train_job.eval_inputs import EvalError, EvalOptions, prepare_evaluation
from train_job.evaluate import Evaluator, actor_settings
from train_job.pipeline import decode_augment
from train_job.prepare import main as prepare_main
from train_job.synthetic import default_oracle, write_dataset

from .conftest import REPO
from .test_metrics_fid import _images

TINY = REPO / "cluster/configs/tiny.yaml"
N_VAL = 8


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def inception(random_inception_file: Path) -> Path:
    return random_inception_file


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fid_images")
    dirs = root / "one", root / "two"
    for d, (seed, n, size) in zip(dirs, ((40, 4, (32, 32)), (41, 5, (32, 40)))):
        d.mkdir()
        for i, img in enumerate(_images(seed, n, size)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return dirs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(synthetic dataset root, shards with a 'val' split only): 8 scenes of 64 px in 3 shards."""
    root = tmp_path_factory.mktemp("eval_data")
    write_dataset(root / "ade", n=N_VAL, size=64, seed=3, split="validation")
    shards = root / "shards"
    assert prepare_main(["--dataset", "ade20k", "--root", str(root / "ade"), "--split", "val", "--out", str(shards),
                         "--shard-rows", "3", "--no-progress"]) == 0
    return root / "ade", shards


def _checkpoint(path: Path, config: spade_core.ModelConfig) -> Path:
    return spade_core.save_checkpoint(spade_core.build_model(config, discriminator=False, seed=0), path, include_discriminator=False)


@pytest.fixture(scope="module")
def tiny_config() -> spade_core.ModelConfig:
    return load_train_config(TINY).model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: spade_core.ModelConfig) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config)


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: spade_core.ModelConfig) -> Path:
    config = dataclasses.replace(
        tiny_config,
        generator=dataclasses.replace(tiny_config.generator, z_dim=16),
        encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64),
    )
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_vae", config)


# ---------------------------------------------------------------------------------------
# fid: python -m pytorch_fid's interface


def test_fid_prints_pytorch_fids_line_and_equals_fid_of_paths(
    inception: Path, image_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = image_dirs
    assert main(["fid", str(one), str(two), "--inception", str(inception), "--allow-any-inception", "--dims", "64",
                 "--device", "cpu", "--batch-size", "3", "--num-workers", "4"]) == 0
    out = capsys.readouterr().out
    want = fid_of_paths([one, two], load_fid_inception(inception, allow_any_inception=True), dims=64, batch_size=3).fid
    assert out == f"FID:  {want}\n"  # print('FID: ', value): two spaces, the float's repr
    assert np.isfinite(want) and want > 0


def test_save_stats_then_fid_of_the_npz_files_is_the_same(
    inception: Path, image_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = image_dirs
    common = ["--inception", str(inception), "--allow-any-inception", "--dims", "64", "--device", "cpu"]
    assert main(["fid", str(one), str(two), *common]) == 0
    direct = float(capsys.readouterr().out.split()[1])
    assert main(["fid", "--save-stats", str(one), str(tmp_path / "one"), *common]) == 0  # numpy's savez adds .npz
    assert capsys.readouterr().out == f"Saving statistics for {one}\n"
    assert main(["fid", "--save-stats", str(two), str(tmp_path / "two.npz"), *common]) == 0
    stats = load_statistics(tmp_path / "one.npz")
    assert stats.dims == 64 and stats.count == 4 and stats.inception_sha256 == hashlib.sha256(inception.read_bytes()).hexdigest()
    capsys.readouterr()
    for pair in ((tmp_path / "one.npz", tmp_path / "two.npz"), (one, tmp_path / "two.npz")):
        assert main(["fid", *map(str, pair), *common]) == 0
        assert float(capsys.readouterr().out.split()[1]) == pytest.approx(direct, rel=1e-12)
    # like pytorch-fid: an existing output file is refused
    assert main(["fid", "--save-stats", str(one), str(tmp_path / "two.npz"), *common]) == 2
    assert "existing output file" in _one_error_line(capsys.readouterr().err)


def test_fid_errors_are_one_line(inception: Path, image_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = image_dirs
    cases = [
        (["fid", str(one), str(tmp_path / "absent"), "--inception", str(inception), "--allow-any-inception"], "invalid path"),
        (["fid", str(one), str(two)], "--inception PATH is required"),
        (["fid", str(one), str(two), "--inception", str(tmp_path / "none.pth")], "does not exist"),
        (["fid", str(one), str(two), "--inception", str(inception)], "--allow-any-inception"),  # not pytorch-fid's sha256
        (["fid", str(one), str(two), "--inception", str(inception), "--allow-any-inception", "--dims", "100"], "invalid choice"),
    ]
    (tmp_path / "single").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "single" / "a.png")
    cases.append((["fid", str(one), str(tmp_path / "single"), "--inception", str(inception), "--allow-any-inception",
                   "--dims", "64", "--device", "cpu"], "at least 2"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert message in _one_error_line(captured.err) and captured.out == "", (argv, captured)


# ---------------------------------------------------------------------------------------
# run: inputs checked before Ray starts


def test_run_input_errors_exit_2_before_ray(
    dataset: tuple[Path, Path], checkpoint: Path, inception: Path, tiny_config: spade_core.ModelConfig,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, shards = dataset
    base = ["run", "--checkpoint", str(checkpoint), "--data", str(shards), "--out", str(tmp_path / "out")]
    other_labels = _checkpoint(tmp_path / "coco", dataclasses.replace(
        tiny_config, labels=dataclasses.replace(tiny_config.labels, label_nc=182, dataset="coco_stuff")))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoint, no_weights)
    (no_weights / "generator.safetensors").unlink()
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoint_2026-01-01_00-00-00.000000")
    cases = [
        ([*base, "--oracle", "--split", "train"], "no 'train' split"),
        ([*base, "--oracle", "--split", "test"], "unknown split"),
        ([*base], "no metric asked for"),
        ([*base, "--oracle", "--data", str(tmp_path)], "prepare the data first"),
        (["run", "--checkpoint", str(other_labels), "--data", str(shards), "--out", str(tmp_path / "o"), "--oracle"], "label_nc 182"),
        (["run", "--checkpoint", str(no_weights), "--data", str(shards), "--out", str(tmp_path / "o"), "--oracle"], "incomplete: generator.safetensors is missing"),
        (["run", "--checkpoint", str(run_dir), "--select", "best", "--data", str(shards), "--out", str(tmp_path / "o"), "--oracle"],
         "has no best.json"),
        ([*base, "--oracle", "--select", "best"], "is a checkpoint, not a training run"),
        (["run", "--checkpoint", str(tmp_path), "--data", str(shards), "--out", str(tmp_path / "o"), "--oracle"], "nor a training run"),
        (["run", "--checkpoint", str(tmp_path / "absent"), "--data", str(shards), "--out", str(tmp_path / "o"), "--oracle"], "does not exist"),
        ([*base, "--inception", str(tmp_path / "none.pth")], "Inception weights"),
        ([*base, "--inception", str(inception)], "--allow-any-inception"),
        ([*base, "--segmenter", str(tmp_path / "seg.pt")], "segmenter file"),
        ([*base, "--segmenter", str(tmp_path / "seg.pt"), "--oracle"], "not allowed with"),
        ([*base, "--inception", str(inception), "--allow-any-inception", "--num-images", "1"], "at least 2 images"),
        ([*base, "--oracle", "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    import sys

    had_ray = "ray" in sys.modules
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys.readouterr().err), argv
    if not had_ray:
        assert "ray" not in sys.modules  # every input error comes before Ray is imported
    assert not (tmp_path / "out").exists()


def test_plan_uses_the_whole_split_when_asked_for_more_and_reads_keys_in_order(dataset: tuple[Path, Path], checkpoint: Path, tmp_path: Path) -> None:
    _, shards = dataset
    plan = prepare_evaluation(EvalOptions(checkpoint=str(checkpoint), data=str(shards), out=str(tmp_path), oracle=True, num_images=100, samples=3))
    assert plan.num_images == N_VAL and plan.notes == [f"asked for 100 images but the val split holds {N_VAL}: using all {N_VAL}"]
    assert plan.keys == [f"ADE_val_{i:08d}" for i in range(1, N_VAL + 1)] and plan.sample_keys == plan.keys[:3]
    assert plan.sets == ("generated",) and plan.space == ADE20K and plan.resolution == (64, 64)
    assert (plan.preprocess.mode, plan.preprocess.load_size, plan.preprocess.crop_size, plan.preprocess.flip) == ("resize_and_crop", 64, 64, False)
    files = {name: (checkpoint / name).read_bytes() for name in ("config.json", "generator.safetensors")}
    assert plan.checkpoint["files"] == {name: hashlib.sha256(b).hexdigest() for name, b in files.items()}
    assert plan.checkpoint["path"] == str(checkpoint.resolve()) and len(plan.checkpoint["sha256"]) == 64
    assert prepare_evaluation(dataclasses.replace(plan.options, num_images=5)).keys == plan.keys[:5]
    run_dir = tmp_path / "run"  # a training run: its newest checkpoint, or best/ as best.json names it
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000", "best"):
        shutil.copytree(checkpoint, run_dir / name)
    (run_dir / "best.json").write_text(json.dumps({"metric": "miou", "value": 0.5, "checkpoint": "best"}))
    for select, name in (("latest", "checkpoint_2026-01-02_00-00-00.000000"), ("best", "best")):
        resolved = prepare_evaluation(dataclasses.replace(plan.options, checkpoint=str(run_dir), select=select)).checkpoint
        assert resolved["path"] == str((run_dir / name).resolve()), select
    with pytest.raises(EvalError, match="--samples must be >= 0"):
        prepare_evaluation(dataclasses.replace(plan.options, samples=-1))


# ---------------------------------------------------------------------------------------
# The actor, in process: VAE sets and per-image style codes


def _decoded(shards: Path, plan) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The first shard's pairs decoded as the pipeline decodes them (no Ray)."""
    table = pq.read_table(sorted((shards / "val").glob("part-*.parquet"))[0], columns=["key", "image", "label"])
    batch = {k: np.asarray(v, dtype=object) for k, v in table.to_pydict().items()}
    return decode_augment(batch, preprocess=plan.preprocess, train=False, seed=0)


def _sample_images(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(data)) as f:
        return {str(k): {name: f[name][i] for name in f.files if name != "keys"} for i, k in enumerate(f["keys"])}


def test_evaluator_vae_sets_are_per_image_deterministic(
    dataset: tuple[Path, Path], vae_checkpoint: Path, inception: Path, tmp_path: Path, one_thread: None
) -> None:
    _, shards = dataset
    plan = prepare_evaluation(EvalOptions(checkpoint=str(vae_checkpoint), data=str(shards), out=str(tmp_path), oracle=True,
                                          inception=str(inception), allow_any_inception=True, dims=64, samples=3, seed=5))
    assert plan.sets == ("style", "random") and plan.checkpoint["files"].keys() == {"config.json", "encoder.safetensors", "generator.safetensors"}
    actor = Evaluator(plan.payload, actor_settings(plan, "cpu"))
    batch = _decoded(shards, plan)  # the first shard: 3 pairs
    out = actor(batch)
    assert out["rows"].tolist() == [3] and out["keys"][0].split("\n") == plan.keys[:3]
    for name in ("real", "style", "random"):
        assert out[f"features_{name}"][0].shape == (3, 64) and out[f"features_{name}"][0].dtype == np.float32
        assert out[f"confusion_{name}"].shape == (1, 151, 151) and out[f"confusion_{name}"].sum() == 3 * 64 * 64
    assert not np.allclose(out["features_style"][0], out["features_random"][0])
    images = _sample_images(out["samples"][0])
    assert list(images) == plan.keys[:3] and set(images[plan.keys[0]]) == {"label", "real", "style", "random"}
    assert images[plan.keys[0]]["random"].shape == (64, 64, 3) and images[plan.keys[0]]["random"].dtype == np.uint8
    # the third pair alone: the same images (z comes from (seed, key), not from the batch)
    alone = _sample_images(actor({k: v[2:] for k, v in batch.items()})["samples"][0])
    for name in ("style", "random", "real", "label"):
        diff = np.abs(alone[plan.keys[2]][name].astype(int) - images[plan.keys[2]][name].astype(int))
        assert diff.max() <= 1, name  # float rounding of another batch size may move a pixel by one level
    actor.seed, actor.sample_keys = 6, set()  # as if built with seed 6 and no samples (one load less)
    other = actor(batch)
    assert other["samples"][0] == b""  # only sampled keys come back as images
    assert not np.allclose(other["features_random"][0], out["features_random"][0])  # another seed, other codes
    np.testing.assert_allclose(other["features_style"][0], out["features_style"][0], rtol=1e-6)  # z = mu: no seed


# ---------------------------------------------------------------------------------------
# run end to end on the session's Ray


@pytest.mark.slow
def test_run_end_to_end_on_ray(
    ray_cluster, dataset: tuple[Path, Path], checkpoint: Path, inception: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, shards = dataset
    out = tmp_path / "eval"
    argv = ["run", "--checkpoint", str(checkpoint), "--data", str(shards), "--out", str(out), "--oracle",
            "--inception", str(inception), "--allow-any-inception", "--dims", "64", "--batch-size", "3", "--samples", "8", "--seed", "1"]
    # --dims 64: scipy's sqrtm of a 2048 x 2048 product alone takes ~20 s on 2 cores
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^generated: FID [\d.]+  KID -?[\d.]+ \+- [\d.]+  mIoU [\d.]+  pixel accuracy [\d.]+$", stdout, re.M), stdout
    assert ray_cluster.is_initialized()  # the CLI used the session's Ray and left it running

    record = json.loads((out / "eval.json").read_text())
    sha = hashlib.sha256(inception.read_bytes()).hexdigest()
    assert record["num_images"] == N_VAL and record["resolution"] == {"height": 64, "width": 64}
    assert record["inception"] == {"path": str(inception.resolve()), "sha256": sha, "official": False, "dims": 64}
    assert record["segmenter"]["kind"] == "oracle" and record["seeds"]["seed"] == 1
    assert record["checkpoint"]["path"] == str(checkpoint.resolve()) and len(record["checkpoint"]["sha256"]) == 64
    assert record["data"]["split"] == "val" and record["data"]["split_count"] == N_VAL and record["notes"] == []
    assert record["precision"]["generator"] == "fp32" and record["ray"]["actors"] == 1 and record["ray"]["device"] == "cpu"
    assert record["wall_time_s"]["total"] >= record["wall_time_s"]["pipeline"] > 0
    assert set(record["metrics"]) == {"real", "generated"}
    gen, real = record["metrics"]["generated"], record["metrics"]["real"]
    assert np.isfinite(gen["fid"]) and gen["fid"] > 0 and gen["kid"]["subset_size"] == N_VAL
    assert real["miou"] > 0.9 and real["pixels"] == N_VAL * 64 * 64  # the oracle on the real scenes: pairs stayed paired
    assert 0 <= gen["miou"] < real["miou"]

    # the page's PNGs are the evaluated images: recompute the metrics from them
    keys = record["samples"]["keys"]
    assert keys == [f"ADE_val_{i:08d}" for i in range(1, N_VAL + 1)]
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 3 * N_VAL and all((out / s).is_file() for s in srcs)
    assert srcs[:3] == [f"images/{c}/{keys[0]}.png" for c in ("label", "generated", "real")]
    model = load_fid_inception(inception, allow_any_inception=True)
    again = fid_of_paths([out / "images/real", out / "images/generated"], model, dims=64).fid
    assert again == pytest.approx(gen["fid"], rel=1e-5)  # measured 6e-8: only the batch composition differs
    oracle = default_oracle()
    matrix = ConfusionMatrix.for_space(ADE20K)
    for key in keys:
        fake = np.array(Image.open(out / f"images/generated/{key}.png"))
        label = np.array(Image.open(root / f"ADEChallengeData2016/annotations/validation/{key}.png"))
        matrix.update(oracle(fake), label)
    assert matrix.scores().miou == pytest.approx(gen["miou"], abs=1e-12)
    real_again = np.asarray(Image.open(out / f"images/real/{keys[0]}.png"))
    assert np.array_equal(real_again, np.asarray(Image.open(root / f"ADEChallengeData2016/images/validation/{keys[0]}.jpg").convert("RGB")))

    # a second run into the same folder replaces the page's images; fewer images, fewer samples
    assert main([*argv[:-4], "--samples", "2", "--num-images", "4", "--no-progress"]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["num_images"] == 4 and record["samples"]["keys"] == keys[:2]
    assert sorted(p.name for p in (out / "images/generated").iterdir()) == [f"{k}.png" for k in keys[:2]]
