"""Prepare one dataset split as Parquet shards holding each pair's original encoded bytes.

The command line of :func:`~train_job.prepare.writing.prepare_split`::

    python -m train_job.prepare --dataset ade20k --root DIR --split train --out OUT_DIR_OR_URI
        [--shard-rows N] [--skip-bad] [--workers N] [--overwrite] [--no-progress]
    python -m train_job.prepare --dataset custom --image-dir DIR --label-dir DIR --label-nc N
        [--instance-dir DIR] [--dontcare ID|none] --split train --out OUT_DIR_OR_URI ...

lists the split's pairs (:func:`train_job.datasets.list_pairs`), writes them and prints one
``prepared ...`` line. Exit status 2 on a bad argument or a dataset error (a bad pair
included), 1 on an I/O error, 130 when interrupted (rerunning the same command resumes);
each error is one ``error: ...`` line on stderr. The first paragraph of this docstring is
``--help``'s description.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..datasets import DATASETS, DatasetError, list_pairs
from .writing import prepare_split


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

