"""Prepare one dataset split as Parquet shards holding each pair's original encoded bytes.

    python -m train_job.prepare --dataset ade20k --root DIR --split train --out OUT_DIR_OR_URI

The output's layout, shard schema and manifest are ``train_job.shards``'s.

Every pair is decoded in full before it is written: a corrupt or truncated file, a label
map that is not single-channel, differing image and label sizes or label ids outside the
dataset's classes stop the run with an error naming the file (``--skip-bad``: the pair is
left out and counted by reason). Shards appear under their final name only when complete
(written to a temporary name, then moved), so rerunning an interrupted command resumes:
complete shards are kept, the rest are written. One run at a time per output split.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from spade_core.config import LabelConfig
from spade_core.preprocess import LABEL_MODES

from . import shards
from .datasets import DATASETS, DatasetError, Listing, Pair, list_pairs, max_label_id, normalize_split
from .progress import Progress

_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")  # a label saved lossily has blended ids at every edge
_ROW_GROUP_BYTES = 32 << 20  # flush a row group at this size: memory stays at one row group
_ROW_GROUP_ROWS = 256
_CHUNK = 8  # pairs per task sent to a worker process



class BadPairError(DatasetError):
    """A pair whose files fail validation; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PairData:
    """A validated pair: the encoded bytes as on disk, its size and label-id histogram."""

    key: str
    width: int
    height: int
    image: bytes
    label: bytes
    instance: bytes | None
    class_pixels: np.ndarray  # int64 counts of raw label ids 0..len-1

    @property
    def nbytes(self) -> int:
        return len(self.image) + len(self.label) + len(self.instance or b"")


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


def histogram_length(labels: LabelConfig) -> int:
    """Length of the class-pixel histograms: ids 0..255, or up to the largest class id if above."""
    return max(256, max_label_id(labels) + 1)


# ---------------------------------------------------------------------------------------
# Validation


def inspect_pair(pair: Pair, labels: LabelConfig) -> PairData:
    """Read and fully decode a pair's files; raise :class:`BadPairError` naming the file on any problem."""
    image_bytes = _read(pair.image, "image")
    label_bytes = _read(pair.label, "label")
    image = _decode(image_bytes, pair.image, "image")
    label = _decode(label_bytes, pair.label, "label")
    _check_map(label, pair.label, "label")
    if label.size != image.size:
        raise BadPairError(
            "size_mismatch",
            f"image {pair.image} is {_wh(image.size)} but label {pair.label} is {_wh(label.size)}",
        )
    counts = _class_pixels(np.asarray(label), pair.label, labels)
    instance_bytes = None
    if pair.instance is not None:
        instance_bytes = _read(pair.instance, "instance")
        instance = _decode(instance_bytes, pair.instance, "instance")
        _check_map(instance, pair.instance, "instance")
        if instance.size != image.size:
            raise BadPairError(
                "size_mismatch",
                f"image {pair.image} is {_wh(image.size)} but instance map {pair.instance} is {_wh(instance.size)}",
            )
    width, height = image.size
    return PairData(pair.key, width, height, image_bytes, label_bytes, instance_bytes, counts)


def _read(path: os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BadPairError(f"unreadable_{what}", f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _decode(data: bytes, path: os.PathLike[str], what: str) -> Image.Image:
    reason = f"corrupt_{what}"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # PNG: checks every chunk's CRC, which load() alone does not
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.UnidentifiedImageError:
        raise BadPairError(reason, f"{what} {path} is not a readable image (unknown format or corrupt header)") from None
    except Exception as exc:  # PIL reports broken files with many exception types
        raise BadPairError(reason, f"{what} {path} is corrupt: {exc}") from exc
    return image


def _check_map(image: Image.Image, path: os.PathLike[str], what: str) -> None:
    if image.format in _LOSSY_FORMATS:
        raise BadPairError(f"{what}_format", f"{what} {path} is {image.format}: id maps must be lossless (PNG)")
    if image.mode not in LABEL_MODES:
        raise BadPairError(
            f"{what}_mode", f"{what} {path} has mode {image.mode}; id maps must be single-channel (L, P, I or I;16)"
        )


def _class_pixels(ids: np.ndarray, path: os.PathLike[str], labels: LabelConfig) -> np.ndarray:
    length = histogram_length(labels)
    allowed = np.zeros(length, dtype=bool)
    allowed[: max_label_id(labels) + 1] = True
    if labels.contain_dontcare_label:
        allowed[labels.dontcare_value] = True
    flat = ids.ravel()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= length):
        values = np.unique(flat)  # only on the error path: bincount of a huge id would be huge
        bad = [int(v) for v in values if not (0 <= v < length and allowed[v])]
        raise BadPairError("label_values", _bad_ids_message(path, bad, labels))
    counts = np.bincount(flat, minlength=length).astype(np.int64)
    bad_ids = np.flatnonzero((counts > 0) & ~allowed)
    if bad_ids.size:
        raise BadPairError("label_values", _bad_ids_message(path, bad_ids.tolist(), labels))
    return counts


def _bad_ids_message(path: os.PathLike[str], bad: list[int], labels: LabelConfig) -> str:
    expected = f"0..{max_label_id(labels)}"
    if labels.contain_dontcare_label:
        expected += f" or {labels.dontcare_value} (don't care)"
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    return f"label {path} holds ids {bad[:10]}{more} outside the {labels.dataset} classes; expected {expected}"


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class _Bad:
    key: str
    reason: str
    message: str


def _inspect_chunk(pairs: Sequence[Pair], labels: LabelConfig) -> list[PairData | _Bad]:
    """Worker task: inspect consecutive pairs; problems come back as values, in order."""
    out: list[PairData | _Bad] = []
    for pair in pairs:
        try:
            out.append(inspect_pair(pair, labels))
        except BadPairError as exc:
            out.append(_Bad(pair.key, exc.reason, str(exc)))
    return out


class _Inspector:
    """Inspected pairs in listing order from any start index.

    With workers > 1 decoding runs ahead in a process pool, at most ``2 * workers`` chunks
    in flight, so memory stays bounded whatever the split size.
    """

    def __init__(self, pairs: Sequence[Pair], labels: LabelConfig, workers: int) -> None:
        self._pairs = pairs
        self._labels = labels
        # spawn: the parent holds pyarrow's thread pools, which fork would copy mid-state
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
        self._window = 2 * workers
        self._futures: deque[Future[list[PairData | _Bad]]] = deque()
        self._ready: deque[PairData | _Bad] = deque()
        self._submitted = 0  # pairs before this index are ready or in flight
        self.position = 0  # index of the pair peek() returns

    def seek(self, index: int) -> None:
        if index == self.position:
            return
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        self._ready.clear()
        self.position = self._submitted = index

    def peek(self) -> PairData | _Bad | None:
        if self.position >= len(self._pairs):
            return None
        if not self._ready:
            self._fill()
        return self._ready[0]

    def pop(self) -> PairData | _Bad:
        self.position += 1
        return self._ready.popleft()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self) -> None:
        if self._pool is None:
            self._ready.extend(_inspect_chunk(self._pairs[self.position : self.position + 1], self._labels))
            self._submitted = self.position + 1
            return
        self._submit()
        self._ready.extend(self._futures.popleft().result())
        self._submit()  # keep the workers busy while the caller consumes

    def _submit(self) -> None:
        while len(self._futures) < self._window and self._submitted < len(self._pairs):
            end = min(self._submitted + _CHUNK, len(self._pairs))
            self._futures.append(self._pool.submit(_inspect_chunk, self._pairs[self._submitted : end], self._labels))  # type: ignore[union-attr]
            self._submitted = end


# ---------------------------------------------------------------------------------------
# Shards


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


# ---------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like the other input errors
        self.exit(2, f"error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _dontcare(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an id in 0..255 or 'none', got {text!r}") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"expected an id in 0..255 or 'none', got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train_job.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", help="dataset root (ade20k, coco_stuff, cityscapes)")
    p.add_argument("--split", default="train", help="train/training or val/validation (default train)")
    p.add_argument("--out", required=True, help="output directory or URI (s3://, gs://, file://)")
    p.add_argument("--shard-rows", type=_positive, default=1000, help="pairs per shard (default 1000)")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad pairs and count them instead of stopping")
    p.add_argument("--workers", type=_positive, default=1, help="processes decoding pairs (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace this split's shards from an earlier, different run")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    custom = p.add_argument_group("custom dataset")
    custom.add_argument("--image-dir")
    custom.add_argument("--label-dir")
    custom.add_argument("--instance-dir", help="instance maps; the model then gets an instance-edge channel")
    custom.add_argument("--label-nc", type=_positive, help="number of classes: label ids 0..label_nc-1")
    custom.add_argument("--dontcare", type=_dontcare, help="don't-care label id, or 'none' (default none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        listing = list_pairs(
            args.dataset, split=args.split, root=args.root, image_dir=args.image_dir, label_dir=args.label_dir,
            instance_dir=args.instance_dir, label_nc=args.label_nc, dontcare=args.dontcare, skip_bad=args.skip_bad,
        )
        result = prepare_split(
            listing, args.out, shard_rows=args.shard_rows, skip_bad=args.skip_bad, workers=args.workers,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    n_skipped = sum(result.skipped.values())
    reasons = "".join(f", {reason} {n}" for reason, n in result.skipped.items())
    print(
        f"prepared {listing.dataset} {result.split}: {result.count} pairs in {len(result.shards)} shard(s) "
        f"({len(result.written)} written, {len(result.kept)} kept) at {args.out}; skipped {n_skipped}{reasons}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
