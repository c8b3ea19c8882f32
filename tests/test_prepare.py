"""prepare: Parquet shards of the original bytes, manifest, resume, validation, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, SAMPLES
from train_job.datasets import DatasetError, list_ade20k, list_cityscapes, list_coco_stuff, list_custom
from train_job.prepare import BadPairError, main, prepare_split, reading, writing
from train_job.shards import SCHEMA, STATS_KEY, read_manifest, read_shard_stats
from train_job.progress import Progress

ADE_SAMPLE = SAMPLES / "ade20k"
COCO_SAMPLE = SAMPLES / "coco_stuff"


# ---------------------------------------------------------------------------------------
# Tiny generated data


def _jpeg(path: Path, size: tuple[int, int] = (12, 8), seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, "JPEG")


def _png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(path, "PNG")


def _ids(seed: int, high: int = 151, size: tuple[int, int] = (12, 8), dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (size[1], size[0])).astype(dtype)


def _ade_tree(root: Path, n: int) -> Path:
    """Official ADE20K layout with ``n`` tiny pairs ADE_train_00000000.. (ids 0..150)."""
    base = root / "ADEChallengeData2016"
    for i in range(n):
        _jpeg(base / f"images/training/ADE_train_{i:08d}.jpg", seed=i)
        _png(base / f"annotations/training/ADE_train_{i:08d}.png", _ids(i))
    return base


def _ade_paths(base: Path, i: int) -> tuple[Path, Path]:
    return base / f"images/training/ADE_train_{i:08d}.jpg", base / f"annotations/training/ADE_train_{i:08d}.png"


def _decoded(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _prepare(listing, out, **kwargs):  # type: ignore[no-untyped-def]
    return prepare_split(listing, str(out), progress=False, **kwargs)


# ---------------------------------------------------------------------------------------
# Round trip


def test_ade_sample_round_trip(tmp_path: Path) -> None:
    listing = list_ade20k(ADE_SAMPLE, "training")
    result = _prepare(listing, tmp_path / "out")
    assert result.count == 1 and result.shards == ("train/part-00000.parquet",) and result.written == (0,)

    shard = tmp_path / "out/train/part-00000.parquet"
    table = pq.read_table(shard)
    assert table.schema.remove_metadata() == SCHEMA
    row = table.to_pylist()[0]
    pair = listing.pairs[0]
    assert row["key"] == "ADE_train_00000001" and row["split"] == "train"
    assert (row["width"], row["height"]) == (683, 512)
    assert row["image"] == pair.image.read_bytes() and row["label"] == pair.label.read_bytes()
    assert row["instance"] is None

    hist = np.bincount(_decoded(pair.label).ravel(), minlength=256).tolist()
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest == {
        "format_version": 1,
        "dataset": "ade20k",
        "labels": {"label_nc": 150, "contain_dontcare_label": True, "instance_edges": False, "dontcare_value": 255, "dataset": "ade20k"},
        "splits": {"train": {"count": 1, "shards": ["train/part-00000.parquet"], "class_pixels": hist, "skipped": {}}},
    }
    stats = json.loads(pq.read_schema(shard).metadata[STATS_KEY])
    assert stats["rows"] == 1 and stats["first_key"] == stats["last_key"] == "ADE_train_00000001"
    assert stats["class_pixels"] == hist and stats == read_shard_stats(str(shard))
    assert sorted(os.listdir(tmp_path / "out/train")) == ["part-00000.parquet"]  # no temp files left


def test_coco_sample_shards_and_uri_output(tmp_path: Path) -> None:
    train = list_coco_stuff(COCO_SAMPLE, "train")
    result = _prepare(train, tmp_path / "out", shard_rows=5)
    assert result.shards == tuple(f"train/part-{i:05d}.parquet" for i in range(3))
    tables = [pq.read_table(tmp_path / "out" / s) for s in result.shards]
    assert [t.num_rows for t in tables] == [5, 5, 3]
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["key"] for r in rows] == [p.key for p in train.pairs]
    hist = np.zeros(256, np.int64)
    for row, pair in zip(rows, train.pairs):
        assert row["image"] == pair.image.read_bytes()
        assert row["label"] == pair.label.read_bytes()
        assert row["instance"] == pair.instance.read_bytes()  # type: ignore[union-attr]
        label = _decoded(pair.label)
        assert (row["height"], row["width"]) == label.shape
        hist += np.bincount(label.ravel(), minlength=256)

    # the val split into the same output, addressed as a file:// URI: the manifest merges
    val = list_coco_stuff(COCO_SAMPLE, "validation")
    _prepare(val, (tmp_path / "out").as_uri(), shard_rows=5)
    manifest = read_manifest((tmp_path / "out").as_uri())
    assert manifest["dataset"] == "coco_stuff" and manifest["labels"]["instance_edges"] is True
    assert manifest["splits"]["train"]["count"] == 13 and manifest["splits"]["train"]["class_pixels"] == hist.tolist()
    assert manifest["splits"]["val"] == {
        "count": 8,
        "shards": ["val/part-00000.parquet", "val/part-00001.parquet"],
        "class_pixels": manifest["splits"]["val"]["class_pixels"],
        "skipped": {},
    }
    assert sum(manifest["splits"]["val"]["class_pixels"]) == sum(_decoded(p.label).size for p in val.pairs)


def test_subtree_filesystem_output(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    listing = list_custom(ADE_SAMPLE / "ADEChallengeData2016/images/training",
                          ADE_SAMPLE / "ADEChallengeData2016/annotations/training", label_nc=151)
    result = prepare_split(listing, "prepared/ade", filesystem=fs, progress=False)
    assert result.count == 1
    assert (tmp_path / "prepared/ade/train/part-00000.parquet").is_file()
    assert read_manifest("prepared/ade", filesystem=fs)["labels"]["dataset"] == "custom"


def test_workers_write_the_same_shards(tmp_path: Path) -> None:
    listing = list_coco_stuff(COCO_SAMPLE, "val")
    _prepare(listing, tmp_path / "one", shard_rows=3)
    _prepare(listing, tmp_path / "two", shard_rows=3, workers=2)
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert pq.read_table(tmp_path / "one/val" / name).equals(pq.read_table(tmp_path / "two/val" / name))
    assert read_manifest(str(tmp_path / "one")) == read_manifest(str(tmp_path / "two"))


def test_row_groups_bound_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writing, "_ROW_GROUP_ROWS", 2)
    _prepare(list_coco_stuff(COCO_SAMPLE, "val"), tmp_path / "out", shard_rows=5)
    assert pq.ParquetFile(tmp_path / "out/val/part-00000.parquet").metadata.num_row_groups == 3


def test_sixteen_bit_maps(tmp_path: Path) -> None:
    for i, city in enumerate(["aachen", "bochum"]):
        stem = f"{city}_000000_00001{i}"
        image = tmp_path / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(image)
        _png(tmp_path / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png", _ids(i, high=34))
        _png(tmp_path / f"gtFine/train/{city}/{stem}_gtFine_instanceIds.png", _ids(i, high=30000, dtype=np.uint16) + 1000)
    listing = list_cityscapes(tmp_path, "train")
    result = _prepare(listing, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out/train/part-00000.parquet").to_pylist()
    assert [r["instance"] for r in rows] == [p.instance.read_bytes() for p in listing.pairs]  # type: ignore[union-attr]
    assert len(result.class_pixels) == 256 and sum(result.class_pixels) == 2 * 12 * 8 and sum(result.class_pixels[34:]) == 0

    # 16-bit labels of a custom dataset with more than 256 classes: the histogram reaches label_nc
    ids = _ids(0, high=300, dtype=np.uint16)
    _png(tmp_path / "lab/a.png", ids)
    _jpeg(tmp_path / "img/a.jpg")
    result = _prepare(list_custom(tmp_path / "img", tmp_path / "lab", label_nc=300), tmp_path / "custom")
    assert list(result.class_pixels) == np.bincount(ids.ravel(), minlength=300).tolist()
    _png(tmp_path / "lab/a.png", ids + 1)  # ids up to 300: one too many
    with pytest.raises(BadPairError, match=r"holds ids \[300\] outside the custom classes; expected 0..299$"):
        _prepare(list_custom(tmp_path / "img", tmp_path / "lab", label_nc=300), tmp_path / "custom2")


# ---------------------------------------------------------------------------------------
# Resume


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("part-*.parquet"))}


def test_resume_rewrites_only_the_missing_shard(tmp_path: Path) -> None:
    listing = list_ade20k(_ade_tree(tmp_path / "data", 12), "train")
    out = tmp_path / "out"
    first = _prepare(listing, out, shard_rows=5)
    assert first.written == (0, 1, 2) and first.kept == ()
    before = _stamps(out / "train")
    manifest = (out / "manifest.json").read_text()

    (out / "train/part-00001.parquet").unlink()
    again = _prepare(listing, out, shard_rows=5)
    assert again.written == (1,) and again.kept == (0, 2)
    after = _stamps(out / "train")
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    assert after["part-00001.parquet"] != before["part-00001.parquet"]
    assert (out / "manifest.json").read_text() == manifest

    third = _prepare(listing, out, shard_rows=5)
    assert third.written == () and third.kept == (0, 1, 2) and _stamps(out / "train") == after

    # a complete shard under the wrong index is not what the plan wants there: rewritten
    (out / "train/part-00001.parquet").unlink()
    (out / "train/part-00002.parquet").rename(out / "train/part-00001.parquet")
    fourth = _prepare(listing, out, shard_rows=5)
    assert fourth.written == (1, 2) and fourth.kept == (0,)
    assert (out / "manifest.json").read_text() == manifest


def test_interrupted_run_leaves_no_partial_shard_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = list_ade20k(_ade_tree(tmp_path / "data", 12), "train")
    out = tmp_path / "out"
    real = reading._inspect_chunk

    def interrupted(pairs, labels):  # type: ignore[no-untyped-def]
        if any(p.key == "ADE_train_00000007" for p in pairs):
            raise KeyboardInterrupt
        return real(pairs, labels)

    monkeypatch.setattr(reading, "_inspect_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(listing, out, shard_rows=5)
    assert sorted(os.listdir(out / "train")) == ["part-00000.parquet"]  # shard 1's temp file was removed
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(reading, "_inspect_chunk", real)

    # what a killed process leaves: a temp file of a half-written shard, a stray manifest temp,
    # and (copied by hand, say) a truncated file under a final name
    complete = (out / "train/part-00000.parquet").read_bytes()
    (out / "train/.part-00001.parquet.tmp-0123abcd").write_bytes(complete[: len(complete) // 2])
    (out / ".manifest.json.tmp-4567ef").write_bytes(b"{")
    (out / "train/part-00002.parquet").write_bytes(complete[: len(complete) // 2])

    result = _prepare(listing, out, shard_rows=5)
    assert result.kept == (0,) and result.written == (1, 2) and result.count == 12
    assert sorted(os.listdir(out / "train")) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert sorted(os.listdir(out)) == ["manifest.json", "train"]
    keys = [k for i in range(3) for k in pq.read_table(out / f"train/part-{i:05d}.parquet").column("key").to_pylist()]
    assert keys == [p.key for p in listing.pairs]


def test_changed_plan_needs_new_out_or_overwrite(tmp_path: Path) -> None:
    data = _ade_tree(tmp_path / "data", 12)
    out = tmp_path / "out"
    _prepare(list_ade20k(data, "train"), out, shard_rows=5)
    with pytest.raises(DatasetError, match=r"part-00000.parquet was written with --shard-rows 5 \(this run: 6\): use a new --out, or --overwrite"):
        _prepare(list_ade20k(data, "train"), out, shard_rows=6)
    result = _prepare(list_ade20k(data, "train"), out, shard_rows=6, overwrite=True)
    assert result.written == (0, 1) and sorted(os.listdir(out / "train")) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_manifest(str(out))["splits"]["train"]["shards"] == ["train/part-00000.parquet", "train/part-00001.parquet"]

    _jpeg(data / "images/training/ADE_train_00000099.jpg")
    _png(data / "annotations/training/ADE_train_00000099.png", _ids(99))
    with pytest.raises(DatasetError, match=r"another file set \(12 pairs then, 13 now"):
        _prepare(list_ade20k(data, "train"), out, shard_rows=6)
    with pytest.raises(DatasetError, match="describes dataset ade20k"):
        _prepare(list_coco_stuff(COCO_SAMPLE, "val"), out)


def test_rerun_with_skip_bad_keeps_the_good_shards(tmp_path: Path) -> None:
    data = _ade_tree(tmp_path / "data", 8)
    _break_ids(*_ade_paths(data, 7))
    listing = list_ade20k(data, "train")
    out = tmp_path / "out"
    with pytest.raises(BadPairError, match="ADE_train_00000007.png holds ids"):
        _prepare(listing, out, shard_rows=3)
    assert sorted(os.listdir(out / "train")) == ["part-00000.parquet", "part-00001.parquet"]
    result = _prepare(listing, out, shard_rows=3, skip_bad=True)
    assert result.kept == (0, 1) and result.written == (2,) and result.skipped == {"label_values": 1}
    # without --skip-bad the shard that left a pair out is redone, and fails on that pair
    with pytest.raises(BadPairError, match="ADE_train_00000007.png holds ids"):
        _prepare(listing, out, shard_rows=3)


# ---------------------------------------------------------------------------------------
# Bad data


def _break_truncated_png(image: Path, label: Path) -> None:
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])


def _break_rgb_label(image: Path, label: Path) -> None:
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(label)


def _break_size(image: Path, label: Path) -> None:
    _png(label, _ids(0, size=(10, 8)))


def _break_ids(image: Path, label: Path) -> None:
    ids = _ids(0)
    ids[0, :3] = [151, 200, 255]  # 255 is ADE20K's don't-care value: allowed
    _png(label, ids)


def _break_jpeg_garbage(image: Path, label: Path) -> None:
    image.write_bytes(bytes(range(256)) * 4)


def _break_truncated_jpeg(image: Path, label: Path) -> None:
    data = image.read_bytes()
    image.write_bytes(data[:-40])  # cut inside the scan data, as an interrupted copy does


def _break_jpeg_label(image: Path, label: Path) -> None:
    Image.fromarray(_ids(0)).save(label, "JPEG")  # a lossy label under a .png name


BREAKAGES = {
    "corrupt_image": (_break_jpeg_garbage, "image", "not a readable image"),
    "corrupt_image/truncated": (_break_truncated_jpeg, "image", "is corrupt: image file is truncated"),
    "corrupt_label": (_break_truncated_png, "label", "is corrupt"),
    "label_mode": (_break_rgb_label, "label", "has mode RGB; id maps must be single-channel"),
    "label_format": (_break_jpeg_label, "label", "is JPEG: id maps must be lossless"),
    "size_mismatch": (_break_size, "label", "is 12x8 but label .* is 10x8"),
    "label_values": (_break_ids, "label", r"holds ids \[151, 200\] outside the ade20k classes; expected 0..150 or 255"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_bad_pairs_are_errors_or_skipped(tmp_path: Path, case: str) -> None:
    data = _ade_tree(tmp_path / "data", 4)
    image, label = _ade_paths(data, 2)
    breaker, which, message = BREAKAGES[case]
    breaker(image, label)
    listing = list_ade20k(data, "train")
    named = image if which == "image" else label
    with pytest.raises(BadPairError, match=message) as info:
        _prepare(listing, tmp_path / "out", shard_rows=2)
    assert str(named) in str(info.value)
    reason = case.split("/")[0]
    assert info.value.reason == reason
    assert not list((tmp_path / "out/train").glob(".*"))  # the temp file of the failed shard is gone

    result = _prepare(listing, tmp_path / "skip", shard_rows=2, skip_bad=True)
    assert result.count == 3 and result.skipped == {reason: 1}
    manifest = read_manifest(str(tmp_path / "skip"))["splits"]["train"]
    assert manifest["count"] == 3 and manifest["skipped"] == {reason: 1}
    keys = [k for s in manifest["shards"] for k in pq.read_table(tmp_path / "skip" / s).column("key").to_pylist()]
    assert keys == ["ADE_train_00000000", "ADE_train_00000001", "ADE_train_00000003"]
    assert [pq.read_metadata(tmp_path / "skip" / s).num_rows for s in manifest["shards"]] == [2, 1]
    good = [_ade_paths(data, i)[1] for i in (0, 1, 3)]
    assert manifest["class_pixels"] == np.sum([np.bincount(_decoded(p).ravel(), minlength=256) for p in good], axis=0).tolist()


def test_coco_instance_problems(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    for i in range(3):
        _jpeg(root / f"train_img/{i:03d}.jpg", seed=i)
        ids = _ids(i, high=182)
        ids[0, 0] = 255
        _png(root / f"train_label/{i:03d}.png", ids)
        _png(root / f"train_inst/{i:03d}.png", _ids(i, high=9))
    assert _prepare(list_coco_stuff(root, "train"), tmp_path / "ok").count == 3
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(root / "train_inst/001.png")
    ids = _ids(2, high=182)
    ids[1, 1] = 182  # one past COCO-Stuff's classes
    _png(root / "train_label/002.png", ids)
    with pytest.raises(BadPairError, match=r"instance .*train_inst/001.png has mode RGB"):
        _prepare(list_coco_stuff(root, "train"), tmp_path / "bad")
    result = _prepare(list_coco_stuff(root, "train", skip_bad=True), tmp_path / "skip", skip_bad=True)
    assert result.count == 1 and result.skipped == {"instance_mode": 1, "label_values": 1}


def test_trailing_and_leading_bad_pairs(tmp_path: Path) -> None:
    data = _ade_tree(tmp_path / "data", 7)
    for i in (0, 6):
        _break_truncated_jpeg(*_ade_paths(data, i))
    listing = list_ade20k(data, "train")
    result = _prepare(listing, tmp_path / "out", shard_rows=5, skip_bad=True)
    assert result.count == 5 and result.shards == ("train/part-00000.parquet",) and result.skipped == {"corrupt_image": 2}
    stats = read_shard_stats(str(tmp_path / "out/train/part-00000.parquet"))
    assert stats["source"] == {"start": 0, "end": 7, "first_key": "ADE_train_00000000", "last_key": "ADE_train_00000006"}
    assert _prepare(listing, tmp_path / "out", shard_rows=5, skip_bad=True).kept == (0,)

    for i in range(1, 6):
        _break_truncated_jpeg(*_ade_paths(data, i))
    with pytest.raises(DatasetError, match="no valid pairs in ade20k train: all 7 skipped"):
        _prepare(list_ade20k(data, "train"), tmp_path / "none", skip_bad=True)


# ---------------------------------------------------------------------------------------
# CLI and progress


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _ade_tree(tmp_path / "data", 3)
    _break_ids(*_ade_paths(data, 1))
    args = ["--dataset", "ade20k", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: label ") and "ADE_train_00000001.png holds ids [151, 200]" in err
    assert err.count("\n") == 1

    assert main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "prepared ade20k train: 2 pairs in 1 shard(s) (1 written, 0 kept)" in captured.out
    assert "skipped 1, label_values 1" in captured.out
    assert "skipped (label_values): label " in captured.err

    for bad in (
        ["--dataset", "ade20k", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--dataset", "custom", "--image-dir", str(data), "--out", str(tmp_path / "o")],
        ["--dataset", "ade20k", "--root", str(data), "--out", "nosuchscheme://bucket/x"],
    ):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err

    with pytest.raises(SystemExit) as info:  # argparse's own errors: same code, same one line
        main(["--dataset", "ade20k", "--root", str(data), "--out", str(tmp_path / "o"), "--shard-rows", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: argument --shard-rows: expected a positive integer, got 0 (see --help)\n"


def test_cli_subprocess_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train_job.prepare", "--dataset", "coco_stuff", "--root", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: images directory") and "train_img" in proc.stderr


def test_progress_lines() -> None:
    log = io.StringIO()
    bar = Progress(10, label="x: ", unit="pairs", stream=log, interval=0.0)
    bar.skip(4)
    bar.advance(3)
    bar.write("note")
    bar.close()  # nothing new since the last line: no repeat
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == "note"
    assert lines[0].startswith("x: 7/10 pairs (70.0%)") and "/s ETA " in lines[0]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress(2, stream=tty, interval=0.0)
    bar.advance()
    bar.advance()
    bar.close()
    assert tty.getvalue().startswith("\r\033[K1/2 items") and tty.getvalue().endswith("\n")
    assert "\r\033[K2/2 items (100.0%)" in tty.getvalue()
