"""train_job.synthetic: the procedural ADE20K-layout scenes, the oracle segmenter fitted on them, mean_iou and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_core.metrics import mean_iou
from spade_core.metrics.oracle import LUMA
from spade_core.semantics import ade20k_classes
from train_job import synthetic as syn


def _scenes(seed: int, n: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [syn.generate_scene(np.random.default_rng([seed, i]), size) for i in range(n)]


def _read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_dir, ann_dir = syn.split_dirs(root, split)
    prefix = syn.PREFIX[split]
    jpgs = sorted(img_dir.glob(f"{prefix}_*.jpg"))
    images = np.stack([np.array(Image.open(p).convert("RGB")) for p in jpgs])
    labels = np.stack([np.array(Image.open(ann_dir / (p.stem + ".png"))) for p in jpgs])
    return images, labels


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Datasets the CLI wrote: 64 px (20 training + 20 validation) and 256 px (20 validation)."""
    out = {}
    for size, args in ((64, ["--split", "both", "--val-n", "20"]), (256, ["--split", "validation"])):
        root = tmp_path_factory.mktemp(f"synthetic{size}")
        assert syn.main(["--out", str(root), "--n", "20", "--size", str(size), "--seed", "7", *args]) == 0
        out[size] = root
    return out


# ---------------------------------------------------------------------------------------
# Generator


def test_generate_scene_is_deterministic_and_well_formed() -> None:
    for size in (32, 64, 97):
        a_img, a_lab = syn.generate_scene(np.random.default_rng(5), size)
        b_img, b_lab = syn.generate_scene(np.random.default_rng(5), size)
        assert a_img.shape == (size, size, 3) and a_img.dtype == np.uint8
        assert a_lab.shape == (size, size) and a_lab.dtype == np.uint8
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, _ = syn.generate_scene(np.random.default_rng(6), 97)
    assert not np.array_equal(a_img, c_img)
    with pytest.raises(ValueError, match=">= 32"):
        syn.generate_scene(np.random.default_rng(0), 16)


def test_class_ids_are_the_real_ade20k_ids() -> None:
    names = ade20k_classes().names
    for style in syn.STYLES:
        assert names[style.id] == style.name, (style.id, names[style.id], style.name)
    assert len(set(syn.CLASS_IDS)) == len(syn.STYLES)
    assert syn.class_names() == {s.id: s.name for s in syn.STYLES}


def test_labels_hold_only_scene_class_ids_and_coverage() -> None:
    seen: set[int] = set()
    for _, label in _scenes(11, 50, 64):
        ids = set(np.unique(label).tolist())
        assert ids <= set(syn.CLASS_IDS), ids - set(syn.CLASS_IDS)
        assert 0 not in ids  # every pixel labelled
        assert len(ids) >= 3  # a scene, not a single flat region
        seen |= ids
    assert len(seen) >= 8, seen
    assert syn.SKY in seen and syn.MOUNTAIN in seen and syn.TREE in seen


def test_each_class_has_a_consistent_colour_and_texture_signature() -> None:
    per_class: dict[int, list[np.ndarray]] = {}
    for image, label in _scenes(12, 40, 64):
        img = image.astype(np.float64)
        lum = img @ LUMA
        dx = np.abs(np.diff(lum, axis=1))
        dy = np.abs(np.diff(lum, axis=0))
        for c in np.unique(label).tolist():
            m = label == c
            mx, my = m[:, 1:] & m[:, :-1], m[1:] & m[:-1]  # differences inside the region
            if mx.sum() < 20 or my.sum() < 20:
                continue
            per_class.setdefault(c, []).append(np.r_[img[m].mean(0), dx[mx].mean(), dy[my].mean()])
    assert len(per_class) >= 8
    signature = {c: np.mean(v, 0) for c, v in per_class.items()}
    for c, v in per_class.items():
        v = np.array(v)
        assert np.abs(v[:, :3] - signature[c][:3]).max() < 20, (c, "colour varies across scenes")
        assert np.abs(v[:, 3:] - signature[c][3:]).max() < 8, (c, "texture varies across scenes")
        # every region is nearest its own class's signature (colour + texture)
        for row in v:
            nearest = min(signature, key=lambda k: np.linalg.norm(row - signature[k]))
            assert nearest == c, (c, nearest)
    ids = sorted(signature)
    colour_gap = min(np.linalg.norm(signature[a][:3] - signature[b][:3]) for a in ids for b in ids if a < b)
    assert colour_gap > 35, colour_gap
    # textures differ too: e.g. vertical stripes (grass) vs horizontal ones (water) vs flat (sky)
    assert signature[syn.GRASS][3] > 3 * signature[syn.GRASS][4]
    assert signature[syn.WATER][4] > 3 * signature[syn.WATER][3]
    assert signature[syn.SKY][3] < 3 and signature[syn.SKY][4] < 3


# ---------------------------------------------------------------------------------------
# mean_iou


def test_mean_iou_is_the_standard_confusion_matrix_miou() -> None:
    target = np.array([[1, 1, 2, 2], [1, 1, 2, 0]])
    pred = np.array([[1, 1, 1, 2], [1, 3, 2, 2]])
    # class 1: tp 3, fp 1, fn 1 -> 3/5; class 2: tp 2, fp 0, fn 1 -> 2/3; class 3: only predicted -> 0
    assert mean_iou(pred, target) == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert mean_iou(target, target) == 1.0
    assert mean_iou(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx(mean_iou(pred, target))
    # predicting the ignore label on a labelled pixel is a miss
    assert mean_iou(np.zeros_like(target), target) == 0.0
    with pytest.raises(ValueError):
        mean_iou(pred[:, :3], target)


# ---------------------------------------------------------------------------------------
# Oracle


@pytest.mark.parametrize("size", [64, 256])
def test_oracle_segments_the_written_jpegs(written: dict[int, Path], size: int) -> None:
    images, labels = _read_split(written[size], "validation")
    assert len(images) == 20
    pred = syn.segment(images)
    assert pred.shape == labels.shape and pred.dtype == np.int64
    miou = mean_iou(pred, labels)
    assert miou >= 0.95, miou  # measured ~0.99 at 64 px, ~0.999 at 256 px
    per_image = [mean_iou(p, t) for p, t in zip(pred, labels)]
    assert np.mean(per_image) >= 0.9, per_image


def test_oracle_is_not_fooled_by_garbage(written: dict[int, Path]) -> None:
    images, labels = _read_split(written[64], "validation")
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert mean_iou(syn.segment(noise), labels) < 0.2
    grey = np.full_like(images, 128)
    assert mean_iou(syn.segment(grey), labels) < 0.2
    # right layout, wrong colours: every class painted in another class's look
    oracle = syn.default_oracle()
    lut = np.zeros((256, 3), np.uint8)
    ids = oracle.ids
    for j, c in enumerate(ids):
        lut[c] = np.rint(oracle.pixel_mean[(j + 5) % len(ids)])
    assert mean_iou(syn.segment(lut[labels]), labels) < 0.2
    # pixels of a real scene, shuffled: the colours are right, the layout is not
    shuffled = images.reshape(len(images), -1, 3)[:, np.random.default_rng(1).permutation(64 * 64)].reshape(images.shape)
    assert mean_iou(syn.segment(shuffled), labels) < 0.2


def test_oracle_takes_torch_tensors_and_float_images_in_minus1_1(written: dict[int, Path]) -> None:
    images, _ = _read_split(written[64], "validation")
    images = images[:3]
    want = syn.segment(images)
    as_float = images.astype(np.float32) / 127.5 - 1
    assert np.array_equal(syn.segment(as_float), want)
    tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)  # (B, 3, H, W), the generator's output layout
    assert np.array_equal(syn.segment(tensor), want)
    assert np.array_equal(syn.segment(tensor[0]), want[0])
    bf16 = syn.segment(tensor.to(torch.bfloat16))  # bf16 rounding moves a few pixel values
    assert mean_iou(bf16, want) > 0.9
    assert np.array_equal(syn.segment(torch.from_numpy(images).permute(0, 3, 1, 2)), want)
    assert np.array_equal(syn.fit_oracle()(images[0]), want[0])  # deterministic fit
    with pytest.raises(ValueError, match="RGB"):
        syn.segment(np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_writes_the_ade20k_layout(written: dict[int, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = written[64] / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", 20), ("validation", "ADE_val", 20)):
        jpgs = sorted((root / "images" / split).iterdir())
        pngs = sorted((root / "annotations" / split).iterdir())
        assert [p.name for p in jpgs] == [f"{prefix}_{i:08d}.jpg" for i in range(1, n + 1)]
        assert [p.name for p in pngs] == [f"{prefix}_{i:08d}.png" for i in range(1, n + 1)]
        label = Image.open(pngs[0])
        assert label.mode == "L" and label.size == (64, 64)
        assert Image.open(jpgs[0]).mode == "RGB"
        # scene i depends only on (seed, split, i): the written labels are exact
        _, expected = syn.generate_scene(syn.scene_rng(7, split, 1), 64)
        assert np.array_equal(np.array(label), expected)
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["training"]["n"] == 20 and manifest["validation"]["size"] == 64
    assert not (written[256] / "ADEChallengeData2016/images/training").exists()
    # training and validation scenes differ
    train, _ = _read_split(written[64], "training")
    val, _ = _read_split(written[64], "validation")
    assert not np.array_equal(train[0], val[0])


def test_cli_reports_what_it_wrote_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert syn.main(["--out", str(out), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "wrote 3 training scenes (32x32" in text and "3 sky" in text
    # the same command again is fine (same dataset); a different one is refused
    assert syn.main(["--out", str(out), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    assert syn.main(["--out", str(out), "--n", "2", "--size", "32", "--seed", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert len(list((out / "ADEChallengeData2016/images/training").iterdir())) == 3
    assert syn.main(["--out", str(out), "--n", "2", "--size", "32", "--seed", "2", "--overwrite"]) == 0
    assert len(list((out / "ADEChallengeData2016/images/training").iterdir())) == 2
    # foreign files in a split folder count as another dataset
    foreign = tmp_path / "foreign"
    (foreign / "ADEChallengeData2016/images/validation").mkdir(parents=True)
    (foreign / "ADEChallengeData2016/images/validation/x.jpg").write_bytes(b"")
    assert syn.main(["--out", str(foreign), "--n", "1", "--size", "32", "--split", "validation"]) == 2
    capsys.readouterr()
    for bad, message in (
        (["--n", "0", "--size", "64"], "--n must be >= 1"),
        (["--n", "2", "--size", "16"], "--size must be >= 32"),
        (["--n", "2", "--size", "64", "--val-n", "3"], "--val-n only applies"),
        (["--n", "2", "--size", "64", "--split", "both", "--val-n", "0"], "--val-n must be >= 1"),
        (["--n", "2", "--size", "64", "--seed", "-1"], "seed must be >= 0"),
    ):
        assert syn.main(["--out", str(tmp_path / "bad"), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
    assert not (tmp_path / "bad").exists()
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    assert syn.main(["--out", str(file_out), "--n", "1", "--size", "32"]) == 2


def test_cli_module_entry_point_exit_codes(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "train_job.synthetic", "--out", str(tmp_path), "--n", "0", "--size", "64"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--n must be >= 1" in bad.stderr


def test_workers_write_the_same_files(tmp_path: Path) -> None:
    """Scenes drawn in several processes are byte-identical to one process's (each depends only on (seed, split, i))."""
    syn.write_dataset(tmp_path / "one", 6, 32, seed=3)
    syn.write_dataset(tmp_path / "two", 6, 32, seed=3, workers=2)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("ADE_*"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("ADE_*"))
    assert one == two and len(one) == 12
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
    assert syn.main(["--out", str(tmp_path / "bad"), "--n", "2", "--size", "32", "--workers", "0"]) == 2
