"""A training run directory, as its readers (serving, evaluation) see it.

    RUN_DIR/checkpoint_<time>/   Ray Train's checkpoints; their names sort by time; a folder
                                 counts only when its manifest.json says it is whole (a kill
                                 during an upload leaves a partial one behind)
    RUN_DIR/best/                the best checkpoint by an evaluation metric (checkpoint.best_by)
    RUN_DIR/best.json            what made it best: {"metric", "value", "step", "checkpoint": "best", ...}

Training writes these (``train_job.checkpointing``); this module only finds them, so the
run layout is the one contract between training and its readers. ``select`` names the
checkpoint a reader wants from a run: ``latest`` (the newest ``checkpoint_*``) or ``best``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from .checkpoint import CONFIG_FILE, MANIFEST_FILE, incomplete
from .nvlabs import NET_FILES

Select = Literal["latest", "best"]
SELECTS: tuple[Select, ...] = ("latest", "best")
CHECKPOINT_PREFIX = "checkpoint_"
BEST_DIR = "best"
BEST_FILE = "best.json"


# Any of these files makes a folder a checkpoint: ours (config.json) or the reference's
# (opt.txt, latest_net_G.pth; spade_core.nvlabs.is_nvlabs_dir). Remote listings are read by these names too.
CHECKPOINT_MARKERS = frozenset({CONFIG_FILE, "opt.txt", NET_FILES["generator"]})


def is_checkpoint_dir(path: Path) -> bool:
    """Ours (config.json) or the reference's (latest_net_G.pth + opt.txt)."""
    return any((path / name).is_file() for name in CHECKPOINT_MARKERS)


def run_checkpoints(run: Path) -> list[tuple[Path, str | None]]:
    """A run's ``checkpoint_*`` folders, oldest first, each with why it is incomplete (None: whole)."""
    return [(p, incomplete(p)) for p in sorted(run.glob(f"{CHECKPOINT_PREFIX}*")) if p.is_dir()]


def latest_in_run(run: Path) -> Path | None:
    """The newest whole ``checkpoint_*`` folder of a run, or None."""
    whole = [p for p, gap in run_checkpoints(run) if gap is None]
    return whole[-1] if whole else None


def read_best(run: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``RUN_DIR/best.json`` as a dict (``checkpoint`` resolved to a full path), or None when absent."""
    path = Path(run) / BEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["checkpoint"] = str(Path(run) / record["checkpoint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a best-checkpoint record: {exc}") from exc
    return record


def checkpoint_in(location: str | os.PathLike[str], select: Select = "latest") -> Path:
    """The checkpoint directory ``location`` names: itself, or ``select`` of a training run.

    ValueError saying what is wrong: a missing path, a run without such a checkpoint, or
    ``select="best"`` given a single checkpoint (there is nothing to choose from)."""
    if select not in SELECTS:
        raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
    path = Path(location).expanduser()
    if not path.is_dir():
        raise ValueError(f"checkpoint {location} {'is not a directory' if path.exists() else 'does not exist'}")
    if is_checkpoint_dir(path):
        if select == "best":
            raise ValueError(f"{location} is a checkpoint, not a training run: 'best' chooses among a run's checkpoints")
        gap = incomplete(path) if (path / MANIFEST_FILE).is_file() else None  # no manifest: NVlabs' or hand-made
        if gap is not None:
            raise ValueError(f"checkpoint {location} is incomplete: {gap}")
        return path
    if select == "best":
        record = read_best(path)
        if record is None:
            raise ValueError(
                f"{location} has no {BEST_FILE}: a run keeps a best checkpoint only when trained with "
                "checkpoint.best_by (and an eval: section); select 'latest' for its newest checkpoint"
            )
        best = Path(record["checkpoint"])
        if not is_checkpoint_dir(best):
            raise ValueError(f"{path / BEST_FILE} names {best}, which is not a checkpoint directory")
        return best
    latest = latest_in_run(path)
    if latest is None:
        partial = [f"{p.name} ({gap})" for p, gap in run_checkpoints(path)]
        if partial:
            raise ValueError(f"{location} has no complete {CHECKPOINT_PREFIX}* folder: {'; '.join(partial[-3:])}")
        raise ValueError(
            f"{location} is neither a checkpoint directory (config.json + generator.safetensors, or NVlabs' "
            f"latest_net_G.pth + opt.txt) nor a training run with {CHECKPOINT_PREFIX}* folders"
        )
    return latest
