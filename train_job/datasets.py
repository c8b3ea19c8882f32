"""Dataset readers: list (key, image, label, instance) file pairs for each supported layout.

Nothing here decodes an image; that is ``train_job.prepare``'s job. A reader finds the
files of one split, pairs them by key (the file stem, or the Cityscapes prefix) and
returns them sorted by key together with the dataset's :class:`LabelConfig`.

A file without its partner is a :class:`DatasetError` naming the files; with
``skip_bad=True`` the pair is left out and counted by reason instead
(``missing_image``, ``missing_label``, ``missing_instance``). A missing or empty
directory is always an error: it means a wrong ``root``, not a bad pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from spade_core.config import LabelConfig

DATASETS = ("ade20k", "coco_stuff", "cityscapes", "custom")

# ADE20K SceneParsing: 0 = unlabeled + 150 classes (ids 0..150); the reference declares a
# don't-care channel that real annotations never use (see LabelConfig).
ADE20K_LABELS = LabelConfig(label_nc=150, contain_dontcare_label=True, instance_edges=False, dataset="ade20k")
# COCO-Stuff 2017 pixel maps: things 0..90, stuff 91..181, 255 = unlabeled.
COCO_STUFF_LABELS = LabelConfig(label_nc=182, contain_dontcare_label=True, instance_edges=True, dataset="coco_stuff")
# Cityscapes gtFine labelIds 0..33 (the reference sets label_nc 35); no don't-care value.
CITYSCAPES_LABELS = LabelConfig(label_nc=35, contain_dontcare_label=False, instance_edges=True, dataset="cityscapes")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
_MAX_LISTED = 5  # files named in one error message


class DatasetError(ValueError):
    """Input data that cannot be used as given; the message names the files."""


@dataclass(frozen=True)
class Pair:
    """One training example on disk; ``instance`` is None for datasets without instance maps."""

    key: str
    image: Path
    label: Path
    instance: Path | None = None


@dataclass(frozen=True)
class Listing:
    """The pairs of one split, sorted by key, and what was left out (reason -> count)."""

    dataset: str
    split: str  # "train" or "val"
    labels: LabelConfig
    pairs: tuple[Pair, ...]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def max_label_id(self) -> int:
        return max_label_id(self.labels)

    def fingerprint(self) -> str:
        """sha256 over keys, file names and sizes: changes when the file set changes.

        Sizes, not contents: hashing 20k images would cost as much as preparing them.
        Directories are left out so a moved dataset root still matches.
        """
        h = hashlib.sha256()
        for pair in self.pairs:
            fields = [pair.key]
            for path in (pair.image, pair.label, pair.instance):
                fields += ["", ""] if path is None else [path.name, str(path.stat().st_size)]
            h.update(("\0".join(fields) + "\n").encode())
        return h.hexdigest()


def normalize_split(split: str) -> str:
    """"train"/"training" -> "train", "val"/"validation" -> "val"."""
    try:
        return _SPLITS[split]
    except KeyError:
        raise DatasetError(f"unknown split {split!r}; expected train, training, val or validation") from None


def max_label_id(labels: LabelConfig) -> int:
    """The largest class id a label map may hold (the don't-care value aside).

    Classes are 0..label_nc-1, except ADE20K: 0 = unlabeled plus label_nc classes 1..label_nc.
    """
    return labels.label_nc if labels.dataset == "ade20k" else labels.label_nc - 1


def label_config(dataset: str, *, label_nc: int | None = None, dontcare: int | None = None, instances: bool = False) -> LabelConfig:
    """The LabelConfig of a dataset kind; ``label_nc``, ``dontcare`` and ``instances`` are for "custom" only."""
    fixed = {"ade20k": ADE20K_LABELS, "coco_stuff": COCO_STUFF_LABELS, "cityscapes": CITYSCAPES_LABELS}
    if dataset in fixed:
        if label_nc is not None or dontcare is not None or instances:
            raise DatasetError(f"label_nc, dontcare and instances are fixed for {dataset}; they are for 'custom' only")
        return fixed[dataset]
    if dataset != "custom":
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if label_nc is None or label_nc < 1:
        raise DatasetError(f"a custom dataset needs label_nc >= 1 (the number of classes), got {label_nc}")
    if dontcare is not None and not 0 <= dontcare <= 255:
        raise DatasetError(f"dontcare must be in 0..255 or None, got {dontcare}")
    if dontcare is not None and dontcare < label_nc:
        raise DatasetError(f"dontcare value {dontcare} collides with class ids 0..{label_nc - 1}")
    return LabelConfig(
        label_nc=label_nc,
        contain_dontcare_label=dontcare is not None,
        instance_edges=instances,
        dontcare_value=255 if dontcare is None else dontcare,
        dataset="custom",
    )


# ---------------------------------------------------------------------------------------
# Readers


def list_ade20k(root: str | Path, split: str, *, skip_bad: bool = False) -> Listing:
    """ADE20K SceneParsing, official or flat layout.

    Official: ``ROOT[/ADEChallengeData2016]/images/{training,validation}/*.jpg`` with
    ``annotations/{training,validation}/*.png``. Flat (also accepted by the reference):
    one folder holding ``ADE_train_*.jpg`` beside ``ADE_train_*.png`` (``ADE_val_*``).
    """
    split = normalize_split(split)
    base = Path(root)
    if (base / "ADEChallengeData2016").is_dir():
        base = base / "ADEChallengeData2016"
    folder = {"train": "training", "val": "validation"}[split]
    if (base / "images").is_dir() or (base / "annotations").is_dir():
        images = _index(base / "images" / folder, (".jpg",), what="images")
        labels = _index(base / "annotations" / folder, (".png",), what="labels")
    else:
        _require_dir(base, "ADE20K root")
        prefix = f"ADE_{split}_"
        images = _index(base, (".jpg",), what="images", prefix=prefix)
        labels = _index(base, (".png",), what="labels", prefix=prefix)
    return _pair(ADE20K_LABELS, split, images, labels, None, skip_bad=skip_bad)


def list_coco_stuff(root: str | Path, split: str, *, skip_bad: bool = False) -> Listing:
    """COCO-Stuff as the reference lays it out: ``ROOT/{train,val}_{img,label,inst}/``."""
    split = normalize_split(split)
    base = Path(root)
    _require_dir(base, "COCO-Stuff root")
    images = _index(base / f"{split}_img", (".jpg",), what="images")
    labels = _index(base / f"{split}_label", (".png",), what="labels")
    instances = _index(base / f"{split}_inst", (".png",), what="instance maps")
    return _pair(COCO_STUFF_LABELS, split, images, labels, instances, skip_bad=skip_bad)


def list_cityscapes(root: str | Path, split: str, *, skip_bad: bool = False) -> Listing:
    """Cityscapes: ``ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` and ``ROOT/gtFine/SPLIT/CITY/``
    ``*_gtFine_labelIds.png`` + ``*_gtFine_instanceIds.png``; key = the common prefix."""
    split = normalize_split(split)
    base = Path(root)
    _require_dir(base, "Cityscapes root")
    images = _index(base / "leftImg8bit" / split, ("_leftImg8bit.png",), what="images", nested=True)
    gt = base / "gtFine" / split
    labels = _index(gt, ("_gtFine_labelIds.png",), what="labels", nested=True)
    instances = _index(gt, ("_gtFine_instanceIds.png",), what="instance maps", nested=True)
    return _pair(CITYSCAPES_LABELS, split, images, labels, instances, skip_bad=skip_bad)


def list_custom(
    image_dir: str | Path,
    label_dir: str | Path,
    *,
    label_nc: int,
    dontcare: int | None = None,
    instance_dir: str | Path | None = None,
    split: str = "train",
    skip_bad: bool = False,
) -> Listing:
    """Any folder of images with a folder of PNG label maps (and of instance maps) of the same stems."""
    labels_cfg = label_config("custom", label_nc=label_nc, dontcare=dontcare, instances=instance_dir is not None)
    images = _index(Path(image_dir), IMAGE_SUFFIXES, what="images")
    labels = _index(Path(label_dir), (".png",), what="labels")
    instances = None if instance_dir is None else _index(Path(instance_dir), (".png",), what="instance maps")
    return _pair(labels_cfg, normalize_split(split), images, labels, instances, skip_bad=skip_bad)


def list_pairs(
    dataset: str,
    *,
    split: str,
    root: str | Path | None = None,
    image_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    instance_dir: str | Path | None = None,
    label_nc: int | None = None,
    dontcare: int | None = None,
    skip_bad: bool = False,
) -> Listing:
    """One entry point for every dataset kind (what the prepare CLI calls)."""
    if dataset == "custom":
        if root is not None:
            raise DatasetError("a custom dataset takes image_dir, label_dir (and instance_dir), not root")
        if image_dir is None or label_dir is None or label_nc is None:
            raise DatasetError("a custom dataset needs image_dir, label_dir and label_nc")
        return list_custom(
            image_dir, label_dir, label_nc=label_nc, dontcare=dontcare, instance_dir=instance_dir, split=split, skip_bad=skip_bad
        )
    readers = {"ade20k": list_ade20k, "coco_stuff": list_coco_stuff, "cityscapes": list_cityscapes}
    if dataset not in readers:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if any(v is not None for v in (image_dir, label_dir, instance_dir, label_nc, dontcare)):
        raise DatasetError(f"image_dir, label_dir, instance_dir, label_nc and dontcare are for 'custom' only, not {dataset}")
    if root is None:
        raise DatasetError(f"{dataset} needs a root directory")
    return readers[dataset](root, split, skip_bad=skip_bad)


# ---------------------------------------------------------------------------------------
# Helpers


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} {'is not a directory' if path.exists() else 'does not exist'}")


def _index(
    folder: Path, suffixes: tuple[str, ...], *, what: str, prefix: str = "", nested: bool = False
) -> dict[str, Path]:
    """key -> file for the files in ``folder`` (one level of subfolders with ``nested``) whose
    name starts with ``prefix`` and ends with one of ``suffixes`` (case-insensitive); the key
    is the name without that suffix."""
    _require_dir(folder, f"{what} directory")
    if nested:  # Cityscapes: one folder per city
        files = [p for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir()]
    else:
        files = list(folder.iterdir())
    found: dict[str, Path] = {}
    for path in sorted(files):
        name = path.name
        if name.startswith(".") or not name.startswith(prefix) or not path.is_file():
            continue
        suffix = next((s for s in suffixes if name.lower().endswith(s.lower())), None)
        if suffix is None:
            continue
        key = name[: len(name) - len(suffix)]
        if key in found:
            # two files claim one key: which one is meant is not ours to guess
            raise DatasetError(f"two {what} for key {key!r}: {found[key]} and {path}")
        found[key] = path
    if not found:
        pattern = " or ".join(f"{prefix}*{s}" for s in suffixes)
        where = f"{folder}/*/" if nested else f"{folder}/"
        raise DatasetError(f"no {what} in {where} (expected {pattern})")
    return found


def _pair(
    labels_cfg: LabelConfig,
    split: str,
    images: dict[str, Path],
    labels: dict[str, Path],
    instances: dict[str, Path] | None,
    *,
    skip_bad: bool,
) -> Listing:
    kinds: list[tuple[str, dict[str, Path]]] = [("image", images), ("label", labels)]
    if instances is not None:
        kinds.append(("instance", instances))
    pairs: list[Pair] = []
    problems: list[str] = []
    skipped: Counter[str] = Counter()
    for key in sorted(set().union(*(files for _, files in kinds))):
        missing = [kind for kind, files in kinds if key not in files]
        if not missing:
            pairs.append(Pair(key, images[key], labels[key], None if instances is None else instances[key]))
            continue
        skipped[f"missing_{missing[0]}"] += 1
        present = [str(files[key]) for _, files in kinds if key in files]
        verb = "has" if len(present) == 1 else "have"
        problems.append(f"{' and '.join(present)} {verb} no {' or '.join(missing)} file")
    if problems and not skip_bad:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise DatasetError(f"{len(problems)} unpaired file(s): " + "; ".join(problems[:_MAX_LISTED]) + more)
    if not pairs:
        raise DatasetError(f"no complete pairs in the {labels_cfg.dataset} {split} split ({sum(skipped.values())} unpaired)")
    return Listing(dataset=labels_cfg.dataset, split=split, labels=labels_cfg, pairs=tuple(pairs), skipped=dict(skipped))
