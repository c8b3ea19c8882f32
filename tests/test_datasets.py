"""Dataset readers: each layout, pairing by key, missing partners and skip counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SAMPLES
from train_job.datasets import (
    ADE20K_LABELS,
    CITYSCAPES_LABELS,
    COCO_STUFF_LABELS,
    DatasetError,
    label_config,
    list_ade20k,
    list_cityscapes,
    list_coco_stuff,
    list_custom,
    list_pairs,
    max_label_id,
    normalize_split,
)

ADE_SAMPLE = SAMPLES / "ade20k"
COCO_SAMPLE = SAMPLES / "coco_stuff"


def _touch(*paths: Path) -> None:
    # readers only list files; prepare decodes them
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_ade20k_official_sample() -> None:
    for root in (ADE_SAMPLE, ADE_SAMPLE / "ADEChallengeData2016"):
        for split in ("train", "training"):
            listing = list_ade20k(root, split)
            assert listing.split == "train" and listing.dataset == "ade20k"
            assert [p.key for p in listing.pairs] == ["ADE_train_00000001"]
            pair = listing.pairs[0]
            assert pair.image.name == "ADE_train_00000001.jpg" and pair.label.name == "ADE_train_00000001.png"
            assert pair.instance is None and listing.skipped == {}
    assert listing.labels == ADE20K_LABELS and ADE20K_LABELS.label_nc == 150 and ADE20K_LABELS.contain_dontcare_label
    assert max_label_id(ADE20K_LABELS) == 150  # 0 = unlabeled + 150 classes


def test_ade20k_validation_split_missing_is_an_error() -> None:
    with pytest.raises(DatasetError, match="validation does not exist"):
        list_ade20k(ADE_SAMPLE, "val")


def test_ade20k_flat_layout(tmp_path: Path) -> None:
    for stem in ("ADE_train_00000002", "ADE_train_00000001", "ADE_val_00000001"):
        _touch(tmp_path / f"{stem}.jpg", tmp_path / f"{stem}.png")
    _touch(tmp_path / "notes.txt", tmp_path / ".ADE_train_hidden.jpg")
    train = list_ade20k(tmp_path, "train")
    assert [p.key for p in train.pairs] == ["ADE_train_00000001", "ADE_train_00000002"]
    val = list_ade20k(tmp_path, "validation")
    assert [p.key for p in val.pairs] == ["ADE_val_00000001"] and val.split == "val"


def test_ade20k_root_without_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no images in .*ADE_train_\*\.jpg"):
        list_ade20k(tmp_path, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        list_ade20k(tmp_path / "nope", "train")


def test_coco_stuff_sample() -> None:
    train = list_coco_stuff(COCO_SAMPLE, "train")
    val = list_coco_stuff(COCO_SAMPLE, "val")
    assert len(train.pairs) == 13 and len(val.pairs) == 8
    keys = [p.key for p in train.pairs]
    assert keys == sorted(keys)
    for p in train.pairs + val.pairs:
        assert p.image.stem == p.label.stem == p.instance.stem == p.key  # type: ignore[union-attr]
        assert p.image.parent.name.endswith("_img") and p.instance.parent.name.endswith("_inst")  # type: ignore[union-attr]
    assert train.labels == COCO_STUFF_LABELS and COCO_STUFF_LABELS.instance_edges
    assert max_label_id(COCO_STUFF_LABELS) == 181


def _coco_tree(root: Path, keys: list[str]) -> None:
    for key in keys:
        _touch(root / f"train_img/{key}.jpg", root / f"train_label/{key}.png", root / f"train_inst/{key}.png")


def test_missing_partners_are_errors_naming_the_files(tmp_path: Path) -> None:
    _coco_tree(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "train_label/b.png").unlink()
    (tmp_path / "train_img/c.jpg").unlink()
    (tmp_path / "train_inst/d.png").unlink()
    with pytest.raises(DatasetError) as info:
        list_coco_stuff(tmp_path, "train")
    message = str(info.value)
    assert "3 unpaired" in message
    assert "train_img/b.jpg and " in message and "train_inst/b.png have no label file" in message
    assert "train_label/c.png and " in message and "train_inst/c.png have no image file" in message
    assert "train_img/d.jpg and " in message and "train_label/d.png have no instance file" in message

    listing = list_coco_stuff(tmp_path, "train", skip_bad=True)
    assert [p.key for p in listing.pairs] == ["a"]
    assert listing.skipped == {"missing_label": 1, "missing_image": 1, "missing_instance": 1}


def test_all_unpaired_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    _touch(tmp_path / "img/a.jpg", tmp_path / "lab/b.png")
    with pytest.raises(DatasetError, match="no complete pairs"):
        list_custom(tmp_path / "img", tmp_path / "lab", label_nc=3, skip_bad=True)


def test_cityscapes_tree(tmp_path: Path) -> None:
    keys = {"aachen": ["aachen_000000_000019", "aachen_000001_000019"], "bochum": ["bochum_000000_000313"]}
    for city, stems in keys.items():
        for stem in stems:
            _touch(
                tmp_path / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png",
                tmp_path / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png",
                tmp_path / f"gtFine/train/{city}/{stem}_gtFine_instanceIds.png",
                tmp_path / f"gtFine/train/{city}/{stem}_gtFine_color.png",
                tmp_path / f"gtFine/train/{city}/{stem}_gtFine_polygons.json",
            )
    listing = list_cityscapes(tmp_path, "train")
    assert [p.key for p in listing.pairs] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
    pair = listing.pairs[-1]
    assert pair.label.name == "bochum_000000_000313_gtFine_labelIds.png"
    assert pair.instance is not None and pair.instance.name.endswith("_gtFine_instanceIds.png")
    assert listing.labels == CITYSCAPES_LABELS and CITYSCAPES_LABELS.label_nc == 35
    assert not CITYSCAPES_LABELS.contain_dontcare_label and max_label_id(CITYSCAPES_LABELS) == 34

    (tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(DatasetError, match="aachen_000001_000019_gtFine_labelIds.png have no instance file"):
        list_cityscapes(tmp_path, "train")
    assert list_cityscapes(tmp_path, "train", skip_bad=True).skipped == {"missing_instance": 1}
    with pytest.raises(DatasetError, match=r"no images in .*leftImg8bit/val"):
        (tmp_path / "leftImg8bit/val").mkdir()
        list_cityscapes(tmp_path, "val")


def test_custom_layout_and_labels(tmp_path: Path) -> None:
    _touch(tmp_path / "img/b.png", tmp_path / "img/a.JPG", tmp_path / "lab/a.png", tmp_path / "lab/b.png")
    listing = list_custom(tmp_path / "img", tmp_path / "lab", label_nc=5)
    assert [p.key for p in listing.pairs] == ["a", "b"] and listing.pairs[0].instance is None
    assert listing.labels.dataset == "custom" and listing.labels.label_nc == 5
    assert not listing.labels.contain_dontcare_label and not listing.labels.instance_edges

    _touch(tmp_path / "inst/a.png", tmp_path / "inst/b.png")
    listing = list_pairs(
        "custom", split="val", image_dir=tmp_path / "img", label_dir=tmp_path / "lab", instance_dir=tmp_path / "inst",
        label_nc=5, dontcare=255,
    )
    assert listing.split == "val" and listing.pairs[1].instance == tmp_path / "inst/b.png"
    assert listing.labels.contain_dontcare_label and listing.labels.dontcare_value == 255 and listing.labels.instance_edges

    _touch(tmp_path / "img/a.png")
    with pytest.raises(DatasetError, match="two images for key 'a'"):
        list_custom(tmp_path / "img", tmp_path / "lab", label_nc=5)


def test_label_config_and_argument_errors(tmp_path: Path) -> None:
    assert label_config("coco_stuff") == COCO_STUFF_LABELS
    with pytest.raises(DatasetError, match="label_nc >= 1"):
        label_config("custom")
    with pytest.raises(DatasetError, match="collides"):
        label_config("custom", label_nc=10, dontcare=3)
    with pytest.raises(DatasetError, match="unknown dataset"):
        list_pairs("kitti", split="train", root=tmp_path)
    with pytest.raises(DatasetError, match="for 'custom' only"):
        list_pairs("ade20k", split="train", root=tmp_path, label_nc=3)
    with pytest.raises(DatasetError, match="needs image_dir"):
        list_pairs("custom", split="train", label_nc=3)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        normalize_split("test")
    with pytest.raises(DatasetError, match="does not exist"):
        list_custom(tmp_path / "img", tmp_path / "lab", label_nc=5)
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        list_custom(tmp_path / "img", tmp_path / "lab", label_nc=5)
