"""The on-disk synthetic dataset: generated scenes written as an ADE20K folder, with a manifest.

:func:`write_dataset` writes ``OUT/ADEChallengeData2016/{images,annotations}/{training,validation}/``
with ``ADE_train_%08d.jpg`` (JPEG quality 95, 4:4:4) and ``ADE_train_%08d.png`` (8-bit
single-channel raw ids); ``ADE_val_%08d`` under ``validation/``. Image i of a split depends
only on (seed, split, i) (:func:`scene_rng`), not on N. ``ADEChallengeData2016/synthetic.json``
records each split's parameters (and the classes' names), so that a split is rewritten only
when asked for with other parameters.

Importing this module does not import torch (scene writers run in spawned processes, which
import only this module and :mod:`.scenes`): spade_core is imported only when class names
are asked for.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .scenes import JPEG_QUALITY, MIN_SIZE, class_names, generate_scene

ROOT = "ADEChallengeData2016"
PREFIX = {"training": "ADE_train", "validation": "ADE_val"}
SPLIT_CODE = {"training": 0, "validation": 1}
MANIFEST = "synthetic.json"
GENERATOR_VERSION = "spade-ray synthetic v1"


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` (1-based) of ``split``: independent of how many are written."""
    return np.random.default_rng([seed, SPLIT_CODE[split], index])


def split_dirs(out: str | Path, split: str) -> tuple[Path, Path]:
    """(images dir, annotations dir) of a split."""
    root = Path(out) / ROOT
    return root / "images" / split, root / "annotations" / split


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / ROOT / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it or pass --overwrite") from e
    return data if isinstance(data, dict) else {}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / ROOT / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _plan(split: str, n: int, val_n: int | None) -> dict[str, int]:
    if split == "both":
        return {"training": n, "validation": val_n if val_n is not None else max(1, n // 10)}
    if split not in PREFIX:
        raise ValueError(f"split must be 'training', 'validation' or 'both', got {split!r}")
    if val_n is not None:
        raise ValueError("val_n only applies to split='both'")
    return {split: n}


def write_dataset(
    out: str | Path,
    n: int,
    size: int,
    seed: int = 0,
    split: str = "training",
    *,
    val_n: int | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> dict[str, int]:
    """Write generated scenes under ``out/ADEChallengeData2016``; returns {split: count}.

    ``split``: "training", "validation" or "both" (then ``n`` training and ``val_n``
    validation scenes, default ``max(1, n // 10)``). A split whose folders already hold
    files is only rewritten when its manifest (``synthetic.json``) records the same
    parameters, or with ``overwrite`` (which first deletes that split's ``ADE_*`` files);
    otherwise FileExistsError, before anything is written. ``workers`` > 1 draws and encodes
    scenes in that many processes (the files are the same).
    """
    plan = _plan(split, n, val_n)
    for name, count in plan.items():
        if count < 1:
            raise ValueError(f"number of {name} scenes must be >= 1, got {count}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    try:
        manifest = _read_manifest(out)
    except ValueError:
        if not overwrite:
            raise
        manifest = {}
    params = {name: {"generator": GENERATOR_VERSION, "n": count, "size": size, "seed": seed} for name, count in plan.items()}
    for name in plan:  # refuse before writing anything
        existing = [q for d in split_dirs(out, name) if d.is_dir() for q in d.iterdir()]
        if existing and manifest.get(name) != params[name] and not overwrite:
            raise FileExistsError(
                f"{out / ROOT} already holds a {name} split that is not this one ({len(existing)} files in "
                f"images/{name} and annotations/{name}); pass --overwrite to replace it, or choose another --out"
            )
    for name, count in plan.items():
        img_dir, ann_dir = split_dirs(out, name)
        for d in (img_dir, ann_dir):
            if d.is_dir() and manifest.get(name) != params[name]:
                for q in d.glob(f"{PREFIX[name]}_*"):
                    if q.is_file():
                        q.unlink()
            d.mkdir(parents=True, exist_ok=True)
        if manifest.pop(name, None) is not None:  # an interrupted write must leave no claim behind
            _write_manifest(out, manifest)
        jobs = [(seed, name, i, size, img_dir, ann_dir) for i in range(1, count + 1)]
        if workers > 1 and count > 1:
            # spawn, not fork: callers may hold threads (Ray, torch) that a forked child would inherit mid-lock
            with multiprocessing.get_context("spawn").Pool(min(workers, count)) as pool:
                for _ in pool.imap_unordered(_write_scene, jobs, chunksize=max(1, count // (4 * workers))):
                    pass
        else:
            for job in jobs:
                _write_scene(job)
        manifest[name] = params[name]
        manifest["classes"] = {str(k): v for k, v in class_names().items()}
        _write_manifest(out, manifest)
    return plan


def _write_scene(job: tuple[int, str, int, int, Path, Path]) -> None:
    seed, split, i, size, img_dir, ann_dir = job
    image, label = generate_scene(scene_rng(seed, split, i), size)
    stem = f"{PREFIX[split]}_{i:08d}"
    Image.fromarray(image).save(img_dir / f"{stem}.jpg", quality=JPEG_QUALITY, subsampling=0)
    Image.fromarray(label).save(ann_dir / f"{stem}.png")
