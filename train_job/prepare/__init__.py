"""Prepare one dataset split as Parquet shards holding each pair's original encoded bytes.

    python -m train_job.prepare --dataset ade20k --root DIR --split train --out OUT_DIR_OR_URI

The output's layout, shard schema and manifest are ``train_job.shards``'s.

Every pair is decoded in full before it is written: a corrupt or truncated file, a label
map that is not single-channel, differing image and label sizes or label ids outside the
dataset's classes stop the run with an error naming the file (``--skip-bad``: the pair is
left out and counted by reason). Shards appear under their final name only when complete
(written to a temporary name, then moved), so rerunning an interrupted command resumes:
complete shards are kept, the rest are written. One run at a time per output split.

* :mod:`.checks`: one pair's validation (:func:`inspect_pair`, :class:`BadPairError`,
  :class:`PairData`, :func:`histogram_length`).
* :mod:`.reading`: the prefetcher handing inspected pairs to the writer in listing order,
  decoded ahead in a process pool with ``--workers``.
* :mod:`.writing`: :func:`prepare_split`, the resumable shard writer (a path, a URI or a
  pyarrow filesystem), and its :class:`PrepareResult`.
* ``python -m train_job.prepare`` (:mod:`.cli`): its command line.
"""

from __future__ import annotations

from .checks import BadPairError, PairData, histogram_length, inspect_pair
from .writing import PrepareResult, prepare_split

from .cli import main

__all__ = [
    "main",
    "BadPairError",
    "PairData",
    "PrepareResult",
    "histogram_length",
    "inspect_pair",
    "prepare_split",
]

