"""Segmentation scores of generated images (mIoU, pixel accuracy) and the segmenter interface.

SPADE papers score a generator by segmenting its images with a pretrained segmentation
network and comparing the result with the label map the images were generated from. The
protocol here is ADE20K's (the SceneParsing benchmark's, as mmsegmentation evaluates it):

* one confusion matrix accumulated over the whole set (:class:`ConfusionMatrix`): mIoU and
  pixel accuracy come from the summed counts, not from per-image scores averaged;
* predictions at the label map's resolution: the segmenter's output is resized (nearest)
  to the label map's size (:func:`resize_predictions`); resizing logits nearest and taking
  the argmax gives the same ids as resizing the argmax, which is what is done;
* pixels whose label is an ignored id are left out (ADE20K: 0 "unlabeled"; COCO-Stuff:
  255); a prediction of an ignored id on a labelled pixel is a miss;
* a class absent from both prediction and truth is left out of the mean (its IoU is 0/0);
  a class only predicted scores 0.

Label ids are the dataset's raw ids (``0..num_classes-1``), as the label maps hold them. A
:class:`Segmenter` maps ``(B, 3, H, W)`` RGB in [0, 1] to ``(B, H', W')`` dataset ids.
:class:`TorchSegmenter` is one from a file (TorchScript, or ``torch.export``'s ``.pt2``)
returning ``(B, C, H', W')`` logits, with an :class:`IdMapping` from output channels to
dataset ids (ADE20K networks output 0..149 for ids 1..150: ``IdMapping(offset=1)``).
:class:`~spade_core.metrics.oracle.OracleSegmenter` (synthetic scenes) is another.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .fid import ImageBatch, to_unit_interval


@dataclass(frozen=True)
class LabelSpace:
    """Which raw label ids a dataset's maps hold (``0..num_classes-1``) and which are not scored."""

    num_classes: int
    ignore_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        object.__setattr__(self, "ignore_ids", tuple(int(i) for i in self.ignore_ids))


ADE20K = LabelSpace(151, (0,))  # 0 unlabeled, 1..150 the classes
COCO_STUFF = LabelSpace(182, (255,))  # 0..181 (things and stuff), 255 unlabeled


def _ignore_tuple(ignore_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if ignore_ids is None:
        return ()
    if isinstance(ignore_ids, (int, np.integer)):
        return (int(ignore_ids),)
    return tuple(int(i) for i in ignore_ids)


def _as_ids(x: Any, name: str) -> torch.Tensor:
    """Integer label ids as an int64 tensor (numpy arrays and tensors; any shape)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(x))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got {t.dtype}")
    return t.long()


# ---------------------------------------------------------------------------------------
# Confusion matrix


@dataclass(frozen=True)
class SegmentationScores:
    """Scores from one confusion matrix: mIoU over the scored classes, pixel accuracy, per-class IoU.

    ``iou``: class id -> IoU for every class present in the truth or the prediction (not
    ignored); ``pixels``: the labelled pixels counted.
    """

    miou: float
    pixel_accuracy: float
    iou: dict[int, float] = field(default_factory=dict)
    pixels: int = 0


class ConfusionMatrix:
    """Counts ``matrix[truth, prediction]`` over labelled pixels, accumulated batch by batch.

    ``update(pred, target)`` takes id maps of equal shape (``H x W`` or ``B x H x W``, numpy
    or torch, any device); counting happens on the tensors' device. Target ids must be in
    ``0..num_classes-1`` or ignored; prediction ids in ``0..num_classes-1`` (an ignored id
    there counts as a miss). :meth:`merge` adds another matrix (e.g. from another worker).
    """

    def __init__(self, num_classes: int = ADE20K.num_classes, ignore_ids: int | Iterable[int] | None = ADE20K.ignore_ids) -> None:
        self.space = LabelSpace(num_classes, _ignore_tuple(ignore_ids))
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    @classmethod
    def for_space(cls, space: LabelSpace) -> ConfusionMatrix:
        return cls(space.num_classes, space.ignore_ids)

    @property
    def num_classes(self) -> int:
        return self.space.num_classes

    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        p = _as_ids(pred, "predictions")
        t = _as_ids(target, "labels").to(p.device)
        if p.shape != t.shape:
            raise ValueError(
                f"predictions {tuple(p.shape)} and labels {tuple(t.shape)} differ in shape "
                "(resize predictions to the label map's size first: resize_predictions)"
            )
        k = self.num_classes
        keep = torch.ones_like(t, dtype=torch.bool)
        for i in self.space.ignore_ids:
            keep &= t != i
        t, p = t[keep], p[keep]
        bad_t = (t < 0) | (t >= k)
        if bool(bad_t.any()):
            raise ValueError(
                f"labels hold ids outside 0..{k - 1} that are not ignored ({self.space.ignore_ids}): "
                f"{sorted(set(t[bad_t].unique().tolist()))[:8]}"
            )
        bad_p = (p < 0) | (p >= k)
        if bool(bad_p.any()):
            raise ValueError(
                f"predictions hold ids outside 0..{k - 1}: {sorted(set(p[bad_p].unique().tolist()))[:8]} "
                "(check the segmenter's id mapping)"
            )
        counts = torch.bincount(t * k + p, minlength=k * k)
        self.matrix += counts.cpu().numpy().reshape(k, k)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.space != self.space:
            raise ValueError(f"cannot merge confusion matrices of different label spaces: {self.space} vs {other.space}")
        self.matrix += other.matrix
        return self

    def scores(self) -> SegmentationScores:
        """mIoU and pixel accuracy of everything counted so far (ValueError if nothing was)."""
        m = self.matrix
        total = int(m.sum())
        if total == 0:
            raise ValueError("no labelled pixels to score")
        tp = np.diag(m).astype(np.float64)
        union = m.sum(0) + m.sum(1) - tp  # truth + predicted - both
        ignored = set(self.space.ignore_ids)
        iou = {c: float(tp[c] / union[c]) for c in range(self.num_classes) if union[c] > 0 and c not in ignored}
        miou = float(np.mean(list(iou.values()))) if iou else 0.0
        return SegmentationScores(miou=miou, pixel_accuracy=float(tp.sum() / total), iou=iou, pixels=total)


def confusion_matrix(pred: Any, target: Any, num_classes: int = ADE20K.num_classes, ignore_ids: int | Iterable[int] | None = ADE20K.ignore_ids) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = truth, columns = prediction (see :class:`ConfusionMatrix`)."""
    return ConfusionMatrix(num_classes, ignore_ids).update(pred, target).matrix


def mean_iou(pred: Any, target: Any, num_classes: int = ADE20K.num_classes, ignore_ids: int | Iterable[int] | None = ADE20K.ignore_ids) -> float:
    """mIoU from one confusion matrix over all given pixels (id maps of equal shape; ADE20K defaults)."""
    return ConfusionMatrix(num_classes, ignore_ids).update(pred, target).scores().miou


def resize_predictions(pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H', W') ids -> (B, H, W) ids by nearest neighbour (``F.interpolate(mode='nearest')``, as label maps elsewhere)."""
    if pred.dim() != 3:
        raise ValueError(f"predictions must be (B, H, W), got shape {tuple(pred.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(pred.shape[-2:]) == size:
        return pred
    # ids go through float32 exactly (they are far below 2**24)
    return F.interpolate(pred[:, None].float(), size=size, mode="nearest")[:, 0].long()


# ---------------------------------------------------------------------------------------
# Segmenters


@runtime_checkable
class Segmenter(Protocol):
    """Anything that labels images: ``predict((B, 3, H, W) float RGB in [0, 1]) -> (B, H', W') int64 dataset ids``.

    ``H' x W'`` may differ from ``H x W`` (networks often predict at 1/4 scale); the scorer
    resizes the ids to the label map's size.
    """

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class IdMapping:
    """Output channel -> dataset id: ``channel + offset``, or ``table[channel]`` when a table is given.

    ADE20K networks (150 outputs for ids 1..150): ``IdMapping(offset=1)``; a network whose
    outputs are a subset of the ids (e.g. COCO-Stuff's 171 used of 182): ``IdMapping(table=...)``.
    """

    offset: int = 0
    table: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.table is not None:
            if self.offset != 0:
                raise ValueError("an id mapping has an offset or a table, not both")
            table = tuple(int(i) for i in self.table)
            if not table or min(table) < 0:
                raise ValueError(f"an id table must be a non-empty list of ids >= 0, got {self.table!r}")
            object.__setattr__(self, "table", table)

    @property
    def num_outputs(self) -> int | None:
        """How many output channels the segmenter must have (None: any, for an offset)."""
        return None if self.table is None else len(self.table)

    def __call__(self, channels: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return channels + self.offset
        return torch.tensor(self.table, dtype=torch.int64, device=channels.device)[channels]


ADE20K_IDS = IdMapping(offset=1)


class TorchSegmenter:
    """A segmentation network from a file: TorchScript (``torch.jit.save``) or ``torch.export`` (``.pt2``).

    The network takes ``(B, 3, H, W)`` float32 RGB in [0, 1] (any normalisation it needs is
    inside it) and returns ``(B, C, H', W')`` logits; ``ids`` maps the argmax channel to
    dataset ids. Files are loaded without unpickling arbitrary objects (both formats are
    archives of code and tensors), but they do run their own code: load only files you trust.
    """

    def __init__(self, path: str | os.PathLike[str], ids: IdMapping, *, device: str | torch.device = "cpu") -> None:
        file = Path(path)
        if not file.is_file():
            what = "is a directory, not a file" if file.is_dir() else "does not exist"
            raise FileNotFoundError(f"segmenter file {file} {what}")
        if not isinstance(ids, IdMapping):
            raise ValueError(f"ids must be an IdMapping (offset or table), got {type(ids).__name__}")
        self.path = file
        self.ids = ids
        self.device = torch.device(device)
        try:
            if file.suffix == ".pt2":
                self.module: Any = torch.export.load(file).module().to(self.device)
            else:
                with warnings.catch_warnings():
                    # torch >= 2.10 deprecates TorchScript; it remains how many segmenters ship
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.module = torch.jit.load(str(file), map_location=self.device).eval()
        except Exception as exc:  # torch raises many types for files that are not models
            kind = "torch.export (.pt2)" if file.suffix == ".pt2" else "TorchScript"
            raise ValueError(f"segmenter file {file} is not a loadable {kind} model: {type(exc).__name__}: {exc}"[:400]) from exc

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The network's (B, C, H', W') output for (B, 3, H, W) images in [0, 1], checked."""
        with torch.inference_mode():
            out = self.module(images.to(self.device, torch.float32))
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"segmenter {self.path.name} must return a logits tensor (B, C, H, W), got {type(out).__name__}")
        if out.dim() != 4 or out.shape[0] != images.shape[0]:
            raise ValueError(
                f"segmenter {self.path.name} must return logits (B, C, H, W) with B = {images.shape[0]}, got shape {tuple(out.shape)}"
            )
        want = self.ids.num_outputs
        if want is not None and out.shape[1] != want:
            raise ValueError(f"segmenter {self.path.name} returns {out.shape[1]} channels, but its id table maps {want}")
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset ids (B, H', W') at the network's output resolution."""
        return self.ids(self.logits(images).argmax(1))


def load_segmenter(path: str | os.PathLike[str], ids: IdMapping = ADE20K_IDS, *, device: str | torch.device = "cpu") -> TorchSegmenter:
    """:class:`TorchSegmenter` from a file; ADE20K's id mapping by default."""
    return TorchSegmenter(path, ids, device=device)


def segmentation_scores(
    segmenter: Segmenter,
    pairs: Iterable[tuple[ImageBatch, Any]],
    *,
    space: LabelSpace = ADE20K,
    device: str | torch.device | None = None,
) -> SegmentationScores:
    """Segment every image and score it against its label map; one confusion matrix for the set.

    ``pairs``: (images, labels) per batch: images uint8 or float in [0, 1], ``(3, H, W)`` or
    ``(B, 3, H, W)``; labels the raw id maps ``(H, W)`` or ``(B, H, W)`` they are scored
    against (any resolution: predictions are resized to it).
    """
    if not isinstance(segmenter, Segmenter):
        raise ValueError(f"segmenter must have predict(images) -> ids, got {type(segmenter).__name__}")
    matrix = ConfusionMatrix.for_space(space)
    for images, labels in pairs:
        x = to_unit_interval(images, device)
        t = _as_ids(labels, "labels")
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be (B, H, W) for {x.shape[0]} images, got shape {tuple(t.shape)}")
        pred = segmenter.predict(x)
        if not isinstance(pred, torch.Tensor) or pred.dim() != 3 or pred.shape[0] != x.shape[0]:
            got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise ValueError(f"segmenter predictions must be (B, H, W) ids for {x.shape[0]} images, got {got}")
        matrix.update(resize_predictions(pred, t.shape[-2:]), t)
    return matrix.scores()
