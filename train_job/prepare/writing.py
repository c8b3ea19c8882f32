"""The resumable shard writer: a listing written as Parquet shards under an output path or URI.

:func:`prepare_split` resolves the output's filesystem (a local path, ``file://``, ``s3://``,
``gs://``, or a path in a given pyarrow filesystem), keeps the complete shards an earlier
run of the same plan left, writes the rest from the pairs :mod:`.reading` hands it, and
writes the split's manifest entry last. Each shard is written to a temporary name and moved
to its final one only when complete, so a run killed at any point resumes when rerun. The
format itself (names, schema, stats, manifest) is :mod:`train_job.shards`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import shards
from ..datasets import DatasetError, Listing, Pair, normalize_split
from ..progress import Progress
from .checks import BadPairError, PairData, histogram_length
from .reading import _Bad, _Inspector

_ROW_GROUP_BYTES = 32 << 20  # flush a row group at this size: memory stays at one row group
_ROW_GROUP_ROWS = 256


@dataclass(frozen=True)
class PrepareResult:
    out: str
    split: str
    count: int
    shards: tuple[str, ...]  # relative to out
    written: tuple[int, ...]  # shard indices this run wrote
    kept: tuple[int, ...]  # complete shards found and kept
    skipped: dict[str, int]
    class_pixels: tuple[int, ...]


def prepare_split(
    listing: Listing,
    out: str,
    *,
    shard_rows: int = 1000,
    skip_bad: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    filesystem: pafs.FileSystem | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> PrepareResult:
    """Write ``listing`` as shards under ``out`` (a path or URI; with ``filesystem``, a path in it).

    Complete shards of an earlier run of the same plan are kept; a different plan (another
    shard_rows, file set or dataset) is an error unless ``overwrite``. Shards that skipped
    pairs are kept only with ``skip_bad`` (without, rewriting them raises on the bad pair).
    """
    if shard_rows < 1:
        raise DatasetError(f"shard_rows must be >= 1, got {shard_rows}")
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    fs, base = shards.resolve(out, filesystem)
    split = normalize_split(listing.split)
    pairs = listing.pairs
    labels = dataclasses.asdict(listing.labels)
    plan = {
        "dataset": listing.dataset,
        "split": split,
        "labels": labels,
        "shard_rows": shard_rows,
        "pairs": len(pairs),
        "listing_sha256": listing.fingerprint(),
    }
    manifest_path = shards.join(base, shards.MANIFEST_NAME)
    shards.check_manifest(shards.load_manifest(fs, manifest_path), manifest_path, listing.dataset, labels)

    split_dir = shards.join(base, split)
    fs.create_dir(split_dir, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if shards.TEMP.fullmatch(info.base_name):
            fs.delete_file(info.path)  # a manifest temp file left by an interrupted run
    parts: dict[int, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(split_dir, allow_not_found=True)):
        name = info.base_name
        if shards.TEMP.fullmatch(name):
            fs.delete_file(info.path)  # left by an interrupted run
        elif (m := shards.PART.fullmatch(name)) and info.type == pafs.FileType.File:
            if overwrite:
                fs.delete_file(info.path)
            else:
                parts[int(m.group(1))] = info.path
    found = {index: shards.read_stats(fs, path) for index, path in sorted(parts.items())}
    for index, stats in found.items():
        if stats is not None and stats.get("plan") != plan:
            raise DatasetError(_plan_mismatch(parts[index], stats.get("plan"), plan))

    bar = Progress(len(pairs), label=f"{listing.dataset} {split}: ", unit="pairs", enabled=progress, stream=log)
    inspector = _Inspector(pairs, listing.labels, workers)
    shard_stats: list[dict[str, Any]] = []
    written: list[int] = []
    kept: list[int] = []
    try:
        start = 0
        while start < len(pairs):
            index = len(shard_stats)
            stats = found.get(index)
            if stats is not None and _is_complete(
                fs, parts[index], stats, index=index, start=start, pairs=pairs, shard_rows=shard_rows, skip_bad=skip_bad
            ):
                kept.append(index)
                bar.skip(stats["source"]["end"] - start)
            else:
                stats = _write_shard(
                    fs, split_dir, index, start, inspector, listing=listing, plan=plan, shard_rows=shard_rows,
                    skip_bad=skip_bad, bar=bar,
                )
                written.append(index)
            shard_stats.append(stats)
            start = stats["source"]["end"]
    finally:
        inspector.close()
        bar.close()
    for index, path in parts.items():
        if index >= len(shard_stats):  # beyond this plan's last shard: not part of the split
            fs.delete_file(path)

    skipped = Counter(listing.skipped)
    class_pixels = np.zeros(histogram_length(listing.labels), dtype=np.int64)
    for stats in shard_stats:
        skipped.update(stats["skipped"])
        class_pixels += np.asarray(stats["class_pixels"], dtype=np.int64)
    files = tuple(f"{split}/{shards.part_name(i)}" for i in range(len(shard_stats)))
    entry = {
        "count": sum(s["rows"] for s in shard_stats),
        "shards": list(files),
        "class_pixels": class_pixels.tolist(),
        "skipped": dict(sorted(skipped.items())),
    }
    shards.write_manifest(fs, base, listing.dataset, labels, split, entry)
    return PrepareResult(
        out=out, split=split, count=entry["count"], shards=files, written=tuple(written), kept=tuple(kept),
        skipped=entry["skipped"], class_pixels=tuple(entry["class_pixels"]),
    )


def _write_shard(
    fs: pafs.FileSystem,
    split_dir: str,
    index: int,
    start: int,
    inspector: _Inspector,
    *,
    listing: Listing,
    plan: dict[str, Any],
    shard_rows: int,
    skip_bad: bool,
    bar: Progress,
) -> dict[str, Any]:
    """Write shard ``index`` from the pair at ``start`` on: ``shard_rows`` valid pairs, plus the bad
    pairs up to the next valid one (so every skip belongs to exactly one shard)."""
    final = shards.join(split_dir, shards.part_name(index))
    temp = shards.join(split_dir, f".{shards.part_name(index)}.tmp-{uuid.uuid4().hex}")
    split = plan["split"]
    counts = np.zeros(histogram_length(listing.labels), dtype=np.int64)
    skipped: Counter[str] = Counter()
    keys: list[str] = []
    batch: list[PairData] = []
    batch_bytes = 0
    inspector.seek(start)
    sink = fs.open_output_stream(temp)
    writer: pq.ParquetWriter | None = None
    try:
        # store_schema=False: the stats, added once known, then land in the schema metadata readers see
        writer = pq.ParquetWriter(sink, shards.SCHEMA, compression="none", store_schema=False)
        while (item := inspector.peek()) is not None:
            if len(keys) == shard_rows and isinstance(item, PairData):
                break
            inspector.pop()
            bar.advance()
            if isinstance(item, _Bad):
                if not skip_bad:
                    raise BadPairError(item.reason, item.message)
                skipped[item.reason] += 1
                bar.write(f"skipped ({item.reason}): {item.message}")
                continue
            keys.append(item.key)
            counts += item.class_pixels
            batch.append(item)
            batch_bytes += item.nbytes
            if len(batch) >= _ROW_GROUP_ROWS or batch_bytes >= _ROW_GROUP_BYTES:
                writer.write_table(_table(batch, split))
                batch, batch_bytes = [], 0
        end = inspector.position
        if not keys:  # only possible when every pair of the split is bad
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()))
            raise DatasetError(f"no valid pairs in {listing.dataset} {split}: all {end - start} skipped ({reasons})")
        if batch:
            writer.write_table(_table(batch, split))
        stats = {
            "format_version": shards.FORMAT_VERSION,
            "split": split,
            "index": index,
            "rows": len(keys),
            "first_key": keys[0],
            "last_key": keys[-1],
            "class_pixels": counts.tolist(),
            "skipped": dict(sorted(skipped.items())),
            "source": {"start": start, "end": end, "first_key": listing.pairs[start].key, "last_key": listing.pairs[end - 1].key},
            "plan": plan,
        }
        writer.add_key_value_metadata({shards.STATS_KEY: json.dumps(stats)})
        writer.close()
        writer = None
        sink.close()
        fs.move(temp, final)
        return stats
    except BaseException:
        with contextlib.suppress(Exception):
            if writer is not None:
                writer.close()
        with contextlib.suppress(Exception):
            sink.close()
        with contextlib.suppress(Exception):
            fs.delete_file(temp)
        raise


def _table(batch: list[PairData], split: str) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "key": [p.key for p in batch],
            "split": [split] * len(batch),
            "width": [p.width for p in batch],
            "height": [p.height for p in batch],
            "image": [p.image for p in batch],
            "label": [p.label for p in batch],
            "instance": [p.instance for p in batch],
        },
        schema=shards.SCHEMA,
    )


def _is_complete(
    fs: pafs.FileSystem,
    path: str,
    stats: dict[str, Any],
    *,
    index: int,
    start: int,
    pairs: Sequence[Pair],
    shard_rows: int,
    skip_bad: bool,
) -> bool:
    """Whether an existing shard is exactly what this run would write at ``index`` from ``start``."""
    try:
        source = stats["source"]
        end, rows, skipped = source["end"], stats["rows"], sum(stats["skipped"].values())
        if stats["index"] != index or source["start"] != start or not start < end <= len(pairs):
            return False
        if source["first_key"] != pairs[start].key or source["last_key"] != pairs[end - 1].key:
            return False
        if rows + skipped != end - start or rows > shard_rows or (rows < shard_rows and end < len(pairs)):
            return False
        if skipped and not skip_bad:  # left pairs out, which this run must not: redo it (and fail on them)
            return False
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_rows != rows:
                return False
            keys = parquet.read(columns=["key"]).column("key").to_pylist()
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return False
    expected = {p.key for p in pairs[start:end]}
    return (
        keys == sorted(set(keys))
        and set(keys) <= expected
        and keys[0] == stats["first_key"]
        and keys[-1] == stats["last_key"]
    )


def _plan_mismatch(path: str, theirs: Any, ours: dict[str, Any]) -> str:
    if not isinstance(theirs, dict):
        what = "by another tool or version"
    elif theirs.get("shard_rows") != ours["shard_rows"]:
        what = f"with --shard-rows {theirs.get('shard_rows')} (this run: {ours['shard_rows']})"
    elif theirs.get("dataset") != ours["dataset"] or theirs.get("labels") != ours["labels"]:
        what = f"for dataset {theirs.get('dataset')} with other labels"
    else:
        what = f"from another file set ({theirs.get('pairs')} pairs then, {ours['pairs']} now, or files changed)"
    return f"{path} was written {what}: use a new --out, or --overwrite to replace the {ours['split']} shards"
