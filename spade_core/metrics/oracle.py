"""The oracle segmenter: labels images of known class appearances by colour and texture alone.

It is the segmenter of the project's synthetic scenes (:mod:`train_job.synthetic`, whose
classes each have their own colour and texture): images a SPADE model generates from a label
map are segmented and scored against that label map with
:mod:`spade_core.metrics.segmentation`. It implements the same
:class:`~spade_core.metrics.segmentation.Segmenter` interface as a real segmentation
network (:meth:`OracleSegmenter.predict`), and calling it directly takes the generator's
layouts (:func:`as_uint8_image`).

The algorithm knows nothing about the scenes: :meth:`OracleSegmenter.fit` learns per-class
prototypes from labelled example images (``train_job.synthetic.fit_oracle`` fits it on
generated scenes; spade_core never imports train_job). Per 3 x 3 window it computes the
mean RGB colour and the mean absolute horizontal and vertical luminance differences
(texture energy by direction) and measures the window's standardised distance to each
class prototype; per pixel it also scores the pixel's own colour under each class's colour
distribution. A class's score at a pixel is its best window among the windows containing
the pixel (edge-preserving, like a Kuwahara filter) plus ``pixel_weight`` x the pixel
term; the lowest wins, and a class held by fewer than ``min_support`` pixels of a 3 x 3
neighbourhood gives way to the best supported one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..preprocess import to_uint8

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R 601 luminance weights


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bfloat16 / float16 generator outputs
        return x.numpy()
    return np.asarray(x)


def as_uint8_image(image: Any) -> np.ndarray:
    """Normalise the oracle's direct input to uint8 RGB ``H x W x 3`` (or ``B x H x W x 3``).

    numpy: uint8, or float in [-1, 1], channels last. torch: ``3 x H x W`` or
    ``B x 3 x H x W`` (channels first, as the networks use), float in [-1, 1] or uint8.
    Float inputs are mapped with ``round((x + 1) * 127.5)`` and clipped.
    """
    is_torch = isinstance(image, torch.Tensor)
    a = _as_numpy(image)
    if is_torch:
        if a.ndim not in (3, 4) or a.shape[-3] != 3:
            raise ValueError(f"torch images must be (3, H, W) or (B, 3, H, W), got {tuple(a.shape)}")
        a = np.moveaxis(a, -3, -1)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) or (B, H, W, 3) RGB, got {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return to_uint8(a)
    raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {a.dtype}")


def _box_valid(a: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sums over every kh x kw window fully inside a (H, W, C): (H-kh+1, W-kw+1, C)."""
    c = np.zeros((a.shape[0] + 1, a.shape[1] + 1) + a.shape[2:], dtype=np.float64)
    c[1:, 1:] = a.cumsum(0).cumsum(1)
    return c[kh:, kw:] - c[:-kh, kw:] - c[kh:, :-kw] + c[:-kh, :-kw]


def window_features(image: np.ndarray, k: int) -> np.ndarray:
    """Per k x k window (indexed by its top-left pixel): mean R, G, B, mean |dx| and |dy| of luminance.

    Shape (H-k+1, W-k+1, 5).
    """
    img = image.astype(np.float64)
    lum = img @ LUMA
    dx = np.abs(np.diff(lum, axis=1))[..., None]
    dy = np.abs(np.diff(lum, axis=0))[..., None]
    area = k * k
    mean = _box_valid(img, k, k) / area
    gx = _box_valid(dx, k, k - 1) / (k * (k - 1))
    gy = _box_valid(dy, k - 1, k) / (k * (k - 1))
    return np.concatenate([mean, gx, gy], axis=-1)


class OracleSegmenter:
    """Labels images by class appearance (see the module docstring); build with :meth:`fit`.

    ``oracle(image)`` -> int64 ``H x W`` class ids (``B x H x W`` for a batch), inputs as
    :func:`as_uint8_image`; ``oracle.predict(images)`` is the Segmenter interface.

    Score of class c at pixel p: ``min`` over the ``window x window`` windows containing p
    of the window's squared standardised distance to c's window prototype (mean colour and
    directional texture energy, pooled scale), plus ``pixel_weight`` times the Gaussian
    negative log-likelihood (x2) of p's own colour under c's pixel colour distribution.
    The lowest score wins; ``smooth > 1`` adds a majority filter of that size.
    """

    def __init__(
        self,
        ids: Sequence[int],
        means: np.ndarray,
        scale: np.ndarray,
        pixel_mean: np.ndarray,
        pixel_std: np.ndarray,
        *,
        window: int = 3,
        pixel_weight: float = 3.0,
        min_support: int = 3,
        smooth: int = 1,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        n = len(ids)
        for name, value, shape in (("means", means, (n, 5)), ("scale", scale, (5,)), ("pixel_mean", pixel_mean, (n, 3)), ("pixel_std", pixel_std, (n, 3))):
            if np.shape(value) != shape:
                raise ValueError(f"{name} must have shape {shape} for {n} classes, got {np.shape(value)}")
        self.ids = np.asarray(ids, dtype=np.int64)
        self.means = np.asarray(means, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.pixel_mean = np.asarray(pixel_mean, dtype=np.float64)
        self.pixel_std = np.asarray(pixel_std, dtype=np.float64)
        self.window = window
        self.pixel_weight = pixel_weight
        self.min_support = min_support
        self.smooth = smooth

    @classmethod
    def fit(
        cls,
        examples: Iterable[tuple[np.ndarray, np.ndarray]],
        class_ids: Sequence[int],
        *,
        window: int = 3,
        pixel_weight: float = 3.0,
        min_support: int = 3,
        smooth: int = 1,
    ) -> OracleSegmenter:
        """Prototypes of ``class_ids`` from (uint8 ``H x W x 3`` image, ``H x W`` label ids) pairs.

        Window prototypes use only windows lying wholly inside one class; every class must
        have some (RuntimeError otherwise). Deterministic for the same examples.
        """
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        k = window
        ids = np.asarray(class_ids, dtype=np.int64)
        feats: list[list[np.ndarray]] = [[] for _ in ids]
        pixels: list[list[np.ndarray]] = [[] for _ in ids]
        for image, label in examples:
            f = window_features(image, k)
            for j, c in enumerate(ids):
                mask = label == c
                pure = _box_valid(mask.astype(np.float64)[..., None], k, k)[..., 0] == k * k
                if pure.any():
                    feats[j].append(f[pure])
                    pixels[j].append(image[mask].astype(np.float64))
        missing = [int(c) for j, c in enumerate(ids) if not feats[j]]
        if missing:
            raise RuntimeError(f"classes {missing} never appeared in the oracle's fitting examples")
        xs = [np.concatenate(f) for f in feats]
        means = np.stack([x.mean(0) for x in xs])
        # within-class variance pooled with equal class weights
        scale = np.sqrt(np.mean([((x - m) ** 2).mean(0) for x, m in zip(xs, means)], axis=0))
        ps = [np.concatenate(p) for p in pixels]
        pixel_mean = np.stack([p.mean(0) for p in ps])
        pixel_std = np.stack([p.std(0) for p in ps]) + 1.0
        return cls(ids, means, scale, pixel_mean, pixel_std, window=window, pixel_weight=pixel_weight, min_support=min_support, smooth=smooth)

    def window_scores(self, feats: np.ndarray) -> np.ndarray:
        """Squared standardised distance of windows to every class prototype: (..., n_classes)."""
        z = feats / self.scale
        mu = self.means / self.scale
        return np.maximum((z * z).sum(-1, keepdims=True) - 2 * z @ mu.T + (mu * mu).sum(-1), 0.0)

    def pixel_scores(self, image: np.ndarray) -> np.ndarray:
        """2 x Gaussian NLL (up to a constant) of each pixel's colour per class: (H, W, n_classes)."""
        x = image.astype(np.float64)
        inv = 1.0 / self.pixel_std**2  # (n_classes, 3)
        const = (self.pixel_mean**2 * inv).sum(-1) + 2 * np.log(self.pixel_std).sum(-1)
        return (x * x) @ inv.T - 2 * x @ (self.pixel_mean * inv).T + const

    def class_scores(self, image: np.ndarray) -> np.ndarray:
        """Per-pixel score of every class (lower is better): (H, W, n_classes), classes as ``self.ids``."""
        h, w, _ = image.shape
        k = min(self.window, h, w)
        d = self.window_scores(window_features(image, k))
        c = d.shape[-1]
        padded = np.full((h + k - 1, w + k - 1, c), np.inf)
        padded[k - 1 : k - 1 + d.shape[0], k - 1 : k - 1 + d.shape[1]] = d
        best = np.full((h, w, c), np.inf)
        for oy in range(k):  # the best of the windows containing each pixel, per class
            for ox in range(k):
                np.minimum(best, padded[oy : oy + h, ox : ox + w], out=best)
        if self.pixel_weight:
            best += self.pixel_weight * self.pixel_scores(image)
        return best

    def segment_one(self, image: np.ndarray) -> np.ndarray:
        """Class ids (int64 ``H x W``) of one uint8 ``H x W x 3`` image."""
        if image.shape[0] < 2 or image.shape[1] < 2:
            raise ValueError(f"image too small to segment: {image.shape}")
        scores = self.class_scores(image)
        idx = scores.argmin(-1)
        if self.min_support > 1:
            # a class taken by fewer than min_support pixels of a 3 x 3 neighbourhood is dropped
            # there in favour of the best supported one (removes 1-px slivers along edges)
            support = self._neighbour_counts(idx, 1)
            supported = np.where(support >= self.min_support, scores, np.inf)
            alt = supported.argmin(-1)
            idx = np.where(np.isfinite(supported.min(-1)), alt, idx)
        if self.smooth > 1:
            idx = self._majority(idx, self.smooth)
        return self.ids[idx]

    def _neighbour_counts(self, idx: np.ndarray, r: int) -> np.ndarray:
        """For every pixel and class: how many pixels of its (2r+1)^2 neighbourhood have that class."""
        onehot = np.zeros(idx.shape + (len(self.ids),), dtype=np.float64)
        np.put_along_axis(onehot, idx[..., None], 1.0, -1)
        return _box_valid(np.pad(onehot, ((r, r), (r, r), (0, 0))), 2 * r + 1, 2 * r + 1)

    def _majority(self, idx: np.ndarray, s: int) -> np.ndarray:
        counts = self._neighbour_counts(idx, s // 2)
        own = np.take_along_axis(counts, idx[..., None], -1)[..., 0]
        best = counts.argmax(-1)
        return np.where(np.take_along_axis(counts, best[..., None], -1)[..., 0] > own, best, idx)  # ties keep own

    def __call__(self, image: Any) -> np.ndarray:
        img = as_uint8_image(image)
        if img.ndim == 4:
            return np.stack([self.segment_one(x) for x in img])
        return self.segment_one(img)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Segmenter interface: (B, 3, H, W) float RGB in [0, 1] -> (B, H, W) int64 class ids (same device)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {got}")
        # [0, 1] -> uint8 with one rounding; exact for images that came from uint8
        rgb = np.clip(np.rint(_as_numpy(images).astype(np.float32) * 255), 0, 255).astype(np.uint8)
        ids = np.stack([self.segment_one(x) for x in np.moveaxis(rgb, 1, -1)])
        return torch.from_numpy(ids).to(images.device)
