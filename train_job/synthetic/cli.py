"""The command line of the synthetic dataset writer (:func:`~train_job.synthetic.dataset.write_dataset`)::

    python -m train_job.synthetic --out DIR --n N --size S [--seed K]
        [--split training|validation|both] [--val-n M] [--overwrite] [--workers N]

writes ``DIR/ADEChallengeData2016/{images,annotations}/{training,validation}/`` and prints
what it wrote and the classes used. Exit status 2 on a bad argument (argparse's message) and
on a value or file error (one ``error: ...`` line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from .dataset import split_dirs, write_dataset
from .scenes import CLASS_IDS, MIN_SIZE, class_names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_job.synthetic",
        description="Write a procedurally generated ADE20K-layout dataset (JPEG images + raw-id PNG label maps).",
    )
    p.add_argument("--out", required=True, help="dataset folder; files go under OUT/ADEChallengeData2016")
    p.add_argument("--n", type=int, required=True, help="number of scenes (the training scenes with --split both)")
    p.add_argument("--size", type=int, required=True, help=f"square image size in px (>= {MIN_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--split", choices=["training", "validation", "both"], default="training")
    p.add_argument("--val-n", type=int, default=None, help="validation scenes with --split both (default: max(1, n // 10))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split written with other parameters")
    p.add_argument("--workers", type=int, default=1, help="processes drawing scenes (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return int(e.code or 0)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.size < MIN_SIZE:
            raise ValueError(f"--size must be >= {MIN_SIZE}, got {args.size}")
        if args.val_n is not None and args.split != "both":
            raise ValueError("--val-n only applies with --split both")
        if args.val_n is not None and args.val_n < 1:
            raise ValueError(f"--val-n must be >= 1, got {args.val_n}")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        written = write_dataset(
            args.out, args.n, args.size, args.seed, args.split, val_n=args.val_n, overwrite=args.overwrite, workers=args.workers
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, count in written.items():
        img_dir, ann_dir = split_dirs(args.out, name)
        print(f"wrote {count} {name} scenes ({args.size}x{args.size}, seed {args.seed}): {img_dir} (.jpg), {ann_dir} (.png)")
    names = class_names()
    print(f"classes ({len(CLASS_IDS)}): " + ", ".join(f"{i} {names[i]}" for i in CLASS_IDS))
    return 0

