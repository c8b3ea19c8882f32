"""Validation of one image/label pair: every file read and decoded in full before it is written.

:func:`inspect_pair` reads a pair's files and returns them as :class:`PairData` (the encoded
bytes as on disk, the size and the label-id histogram), or raises :class:`BadPairError`
naming the file and the reason the pair is counted under with ``--skip-bad``: a corrupt or
truncated file, a lossy or multi-channel id map, differing sizes, label ids outside the
dataset's classes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spade_core.config import LabelConfig
from spade_core.preprocess import LABEL_MODES

from ..datasets import DatasetError, Pair, max_label_id

_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")  # a label saved lossily has blended ids at every edge


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


def histogram_length(labels: LabelConfig) -> int:
    """Length of the class-pixel histograms: ids 0..255, or up to the largest class id if above."""
    return max(256, max_label_id(labels) + 1)


def _require_same_size(image: Image.Image, image_path: os.PathLike[str], other: Image.Image,
                       other_path: os.PathLike[str], what: str) -> None:
    if other.size != image.size:
        raise BadPairError(
            "size_mismatch", f"image {image_path} is {_wh(image.size)} but {what} {other_path} is {_wh(other.size)}"
        )


def inspect_pair(pair: Pair, labels: LabelConfig) -> PairData:
    """Read and fully decode a pair's files; raise :class:`BadPairError` naming the file on any problem."""
    image_bytes = _read(pair.image, "image")
    label_bytes = _read(pair.label, "label")
    image = _decode(image_bytes, pair.image, "image")
    label = _decode(label_bytes, pair.label, "label")
    _check_map(label, pair.label, "label")
    _require_same_size(image, pair.image, label, pair.label, "label")
    counts = _class_pixels(np.asarray(label), pair.label, labels)
    instance_bytes = None
    if pair.instance is not None:
        instance_bytes = _read(pair.instance, "instance")
        instance = _decode(instance_bytes, pair.instance, "instance")
        _check_map(instance, pair.instance, "instance")
        _require_same_size(image, pair.image, instance, pair.instance, "instance map")
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
