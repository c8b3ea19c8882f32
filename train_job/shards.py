"""The prepared-data format: Parquet shards holding each pair's original encoded bytes, and
the manifest that lists them. ``train_job.prepare`` writes it, ``train_job.pipeline`` and the
evaluator read it; this module is the one place that knows its names, schema and version.

Layout::

    OUT/manifest.json                      written last, atomically; one entry per prepared split
    OUT/{train,val}/part-00000.parquet     shard i: valid pairs [i*N, (i+1)*N) in key order

Shard columns: ``key`` string, ``split`` string, ``width`` int32, ``height`` int32,
``image`` binary, ``label`` binary, ``instance`` binary (null without instance maps); the
bytes are the files exactly as on disk. Each shard's schema metadata ``spade_ray.stats``
holds JSON: ``rows``, ``first_key``, ``last_key``, ``class_pixels`` (int64 pixel count of
each raw label id 0..255, longer when a dataset's ids go higher), ``skipped`` (reason ->
count), ``source`` (the range of the listing it covers) and ``plan`` (what a rerun must
match), so a rerun can check it and rebuild the manifest without reading an image.

The manifest::

    {"format_version": 1, "dataset": "ade20k", "labels": {LabelConfig as a dict},
     "splits": {"train": {"count": N, "shards": ["train/part-00000.parquet", ...],
                          "class_pixels": [...], "skipped": {"reason": count}}}}
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spade_core import locations
from spade_core.config import LabelConfig

from .datasets import DatasetError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATS_KEY = b"spade_ray.stats"
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.binary(), nullable=False),
        pa.field("instance", pa.binary(), nullable=True),
    ]
)
PART = re.compile(r"part-(\d{5,})\.parquet")
TEMP = re.compile(r"\.(part-\d{5,}\.parquet|manifest\.json)\.tmp-[0-9a-f]+")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def read_shard_stats(path: str, *, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """The ``spade_ray.stats`` JSON of one shard (path or URI)."""
    fs, p = resolve(path, filesystem)
    stats = read_stats(fs, p)
    if stats is None:
        raise DatasetError(f"{path} is not a complete spade-ray shard (unreadable parquet or no {STATS_KEY.decode()} metadata)")
    return stats


def read_stats(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A shard's stats, or None when it is no readable shard of ours (it gets rewritten)."""
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        stats = json.loads(meta[STATS_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def read_manifest(out: str, *, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """The manifest of a prepared output (path or URI)."""
    fs, base = resolve(out, filesystem)
    path = join(base, MANIFEST_NAME)
    manifest = load_manifest(fs, path)
    if manifest is None:
        raise DatasetError(f"{path} does not exist: prepare the data first (python -m train_job.prepare ...)")
    return manifest


def load_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The manifest at ``path``, None if there is none yet; DatasetError if it is not one of ours
    in this format_version (readers and the writer refuse the same files)."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or type(manifest.get("format_version")) is not int or manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{path} is not a spade-ray manifest of format_version {FORMAT_VERSION}")
    if not isinstance(manifest.get("splits"), dict):
        raise DatasetError(f"{path} has no 'splits' mapping")
    return manifest


def check_manifest(manifest: dict[str, Any] | None, path: str, dataset: str, labels: dict[str, Any]) -> None:
    """A new split may join an output only if the output holds the same dataset and labels."""
    if manifest is None:
        return
    if manifest.get("dataset") != dataset:
        raise DatasetError(f"{path} describes dataset {manifest.get('dataset')}, not {dataset}: use a new --out")
    if manifest.get("labels") != labels:
        raise DatasetError(f"{path} describes labels {manifest.get('labels')}, not {labels}: use a new --out")


def write_manifest(fs: pafs.FileSystem, base: str, dataset: str, labels: dict[str, Any], split: str, entry: dict[str, Any]) -> None:
    """Add or replace one split's entry, atomically (a temporary file moved into place)."""
    path = join(base, MANIFEST_NAME)
    manifest = load_manifest(fs, path)  # again: another split may have been prepared meanwhile
    check_manifest(manifest, path, dataset, labels)
    if manifest is None:
        manifest = {"format_version": FORMAT_VERSION, "dataset": dataset, "labels": labels, "splits": {}}
    manifest["splits"] = dict(sorted({**manifest["splits"], split: entry}.items()))
    temp = join(base, f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(temp) as f:
            f.write(json.dumps(manifest, indent=2).encode() + b"\n")
        fs.move(temp, path)
    finally:
        with contextlib.suppress(Exception):
            if fs.get_file_info(temp).type != pafs.FileType.NotFound:
                fs.delete_file(temp)


def resolve(out: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a prepared output: a filesystem given by the caller, else the location's."""
    if filesystem is not None:
        return filesystem, out.rstrip("/")
    try:
        return locations.filesystem(out)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, as the manifest lists them."""

    filesystem: pafs.FileSystem
    paths: list[str]
    count: int
    labels: LabelConfig
    has_instance: bool


def open_shards(root: str, split: str) -> ShardSet:
    """The split's shard files in a prepared output (local path or URI), checked against the
    manifest's format_version; ValueError naming what is missing."""
    fs, base = resolve(root, None)
    manifest = read_manifest(root)
    splits = manifest["splits"]
    if split not in splits:
        raise DatasetError(f"{root} has no '{split}' split; prepared splits: {sorted(splits)}")
    entry = splits[split]
    if not entry["shards"] or entry["count"] < 1:
        raise DatasetError(f"the '{split}' split in {root} is empty")
    labels = LabelConfig(**manifest["labels"])
    return ShardSet(fs, [join(base, name) for name in entry["shards"]], int(entry["count"]), labels, labels.instance_edges)
