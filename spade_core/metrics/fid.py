"""Fréchet Inception Distance, computed as pytorch-fid computes it.

The pieces, each usable alone (a later ``spade-eval`` CLI and the Ray Data evaluation use them):

* :func:`list_images` / :func:`iter_image_files`: a directory read the way pytorch-fid reads
  one: files ending in one of its extensions (lower case, not recursive), sorted; each image
  opened with PIL and converted to RGB.
* :func:`activations`: Inception features of an iterable of images or batches - uint8
  ``(3, H, W)`` / ``(B, 3, H, W)`` tensors or arrays (or float in [0, 1]), on any device -
  with the network in float32 or under bfloat16 autocast. uint8 becomes ``x / 255`` (what
  torchvision's ``ToTensor`` gives), then :class:`~spade_core.metrics.inception.FIDInceptionV3`
  resizes to 299 and maps to [-1, 1]. Images of different sizes may be mixed: each is
  resized on its own, which is what pytorch-fid computes when its batches allow them at all.
* :func:`statistics`: mean and ``np.cov(rowvar=False)`` covariance in float64;
  :func:`save_statistics` / :func:`load_statistics`: ``.npz`` files with pytorch-fid's keys
  ``mu`` and ``sigma`` (files written by pytorch-fid load here and ours load there).
* :func:`frechet_distance`: pytorch-fid's formula in float64, including its handling of a
  non-finite matrix square root (1e-6 added to both covariances' diagonals) and of a complex
  one (imaginary diagonal within 1e-3 of zero, else ValueError; then the real part).
* :func:`fid_of_paths`: FID between two directories and/or ``.npz`` files.

SciPy (``sqrtm``) is imported only by :func:`frechet_distance`: install ``spade-ray[eval]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image

from .inception import FIDInceptionV3, _check_dims

IMAGE_EXTENSIONS: tuple[str, ...] = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's
Precision = Literal["fp32", "bf16"]
ImageBatch = Union[torch.Tensor, np.ndarray]

# uint8 -> value / 255 in float32, correctly rounded (numpy divides exactly): ToTensor's values
# on every device (CUDA divides by a scalar as a multiply by its reciprocal, 1 ulp off at times).
_UNIT01 = np.arange(256, dtype=np.float32) / np.float32(255)
_UNIT01.flags.writeable = False


# ---------------------------------------------------------------------------------------
# Images


def list_images(directory: str | os.PathLike[str]) -> list[Path]:
    """The image files pytorch-fid takes from ``directory``: ``*.{ext}`` for its extensions, sorted.

    Like pytorch-fid: not recursive, and the extension must be written in lower case
    (``a.PNG`` is skipped on case-sensitive file systems).
    """
    root = Path(directory)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise FileNotFoundError(f"image directory {root} {what}")
    return sorted(p for ext in IMAGE_EXTENSIONS for p in root.glob(f"*.{ext}"))


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """One image file as pytorch-fid reads it: PIL, ``convert('RGB')``; (3, H, W) uint8."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def iter_image_files(files: Iterable[str | os.PathLike[str]]) -> Iterator[torch.Tensor]:
    """:func:`read_image` of each file, in order: an input for :func:`activations`."""
    for f in files:
        yield read_image(f)


def to_unit_interval(images: ImageBatch, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 or float-in-[0, 1] images, (3, H, W) or (B, 3, H, W), tensor or array -> float32 (B, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be torch tensors or numpy arrays, got {type(images).__name__}")
    if device is not None:
        x = x.to(device)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be RGB (3, H, W) or (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return torch.tensor(_UNIT01, device=x.device)[x.long()]
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    x = x.float()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"float images must be in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}] "
            "(a generator's [-1, 1] output: pass (x + 1) / 2)"
        )
    return x


# ---------------------------------------------------------------------------------------
# Activations and statistics


def _batches(images: Iterable[ImageBatch], batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Network-sized batches of preprocessed (299 x 299, [-1, 1]) images from items of any sizes and batch sizes."""
    pending: list[torch.Tensor] = []
    count = 0
    for item in images:
        # preprocessed here, one item at a time, so items of different sizes can share a batch
        x = FIDInceptionV3.preprocess(to_unit_interval(item, device))
        pending.append(x)
        count += x.shape[0]
        while count >= batch_size:
            flat = torch.cat(pending)
            yield flat[:batch_size]
            rest = flat[batch_size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield torch.cat(pending)


def activations(
    images: Iterable[ImageBatch],
    model: FIDInceptionV3,
    *,
    dims: int = 2048,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
) -> np.ndarray:
    """Inception features ``(N, dims)`` (float64, as pytorch-fid stores them) of every image.

    ``images``: an iterable of images / batches (see the module docstring), e.g. a list of
    tensors, :func:`iter_image_files` or a data loader. ``device``: where the network runs
    (default: the model's; the model is not moved). ``precision``: "fp32" (pytorch-fid's
    numbers) or "bf16" (autocast, for GPUs' bf16 tensor cores; on CPUs without AMX it is
    slower. Features move by bf16 rounding, ~0.5% in our tests: fine for watching training,
    not for numbers to publish).
    """
    _check_dims(dims)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    model_device = next(model.parameters()).device
    run_on = model_device
    if device is not None:
        asked = torch.device(device)
        # "cuda" means the current CUDA device: the same as the model's "cuda:0" there
        if asked.type != model_device.type or (asked.index is not None and asked.index != model_device.index):
            raise ValueError(f"the Inception model is on {model_device}, not {asked}: move it first (model.to(device))")
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in _batches(images, batch_size, run_on):
            with torch.autocast(run_on.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                features = model.features(batch, dims)
            out.append(features.float().cpu().numpy().astype(np.float64))
    if not out:
        return np.empty((0, dims), dtype=np.float64)
    return np.concatenate(out)


@dataclass(frozen=True)
class FIDStatistics:
    """Mean (d,) and covariance (d, d) of a set's Inception features, float64.

    ``count``: how many images; ``inception_sha256``: the weights that made them (None when
    unknown, e.g. a pytorch-fid ``.npz``).
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    inception_sha256: str | None = None

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])


def statistics(features: np.ndarray, *, inception_sha256: str | None = None) -> FIDStatistics:
    """``mu = mean(features, 0)`` and ``sigma = np.cov(features, rowvar=False)``, in float64."""
    acts = np.asarray(features, dtype=np.float64)
    if acts.ndim != 2:
        raise ValueError(f"features must be (N, dims), got shape {acts.shape}")
    if acts.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {acts.shape[0]}")
    return FIDStatistics(np.mean(acts, axis=0), np.cov(acts, rowvar=False), int(acts.shape[0]), inception_sha256)


def compute_statistics(
    images: Iterable[ImageBatch],
    model: FIDInceptionV3,
    *,
    dims: int = 2048,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
) -> FIDStatistics:
    """:func:`statistics` of :func:`activations`, recording the model's ``weights_sha256``."""
    feats = activations(images, model, dims=dims, batch_size=batch_size, device=device, precision=precision)
    return statistics(feats, inception_sha256=model.weights_sha256)


def save_statistics(path: str | os.PathLike[str], stats: FIDStatistics) -> Path:
    """Write ``mu`` and ``sigma`` (pytorch-fid's keys, ``np.savez_compressed`` as it does), plus
    ``count`` and ``inception_sha256`` when known (pytorch-fid ignores extra keys). Returns the path."""
    extra: dict[str, Any] = {}
    if stats.count is not None:
        extra["count"] = np.int64(stats.count)
    if stats.inception_sha256 is not None:
        extra["inception_sha256"] = np.str_(stats.inception_sha256)
    out = Path(path)
    with open(out, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other names
        np.savez_compressed(f, mu=stats.mu, sigma=stats.sigma, **extra)
    return out


def load_statistics(path: str | os.PathLike[str]) -> FIDStatistics:
    """Read a ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d): pytorch-fid's or :func:`save_statistics`'."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"FID statistics file {file} does not exist")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:  # numpy says "pickled data" for files that are not .npz
        raise ValueError(f"FID statistics file {file} is not a readable .npz: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"FID statistics file {file} is a single .npy array, not an .npz with mu and sigma")
    with archive as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"FID statistics file {file} lacks {' and '.join(missing)} (it has: {', '.join(f.files) or 'nothing'})")
        mu = np.asarray(f["mu"], dtype=np.float64)
        sigma = np.asarray(f["sigma"], dtype=np.float64)
        count = int(f["count"]) if "count" in f.files else None
        sha = str(f["inception_sha256"]) if "inception_sha256" in f.files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID statistics file {file}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return FIDStatistics(mu, sigma, count, sha)


# ---------------------------------------------------------------------------------------
# Distance


def _scipy_linalg() -> Any:
    try:
        from scipy import linalg
    except ImportError as exc:  # the air-gapped bundle has no scipy; only FID needs it
        raise ImportError("the Fréchet distance needs scipy (matrix square root): pip install 'spade-ray[eval]'") from exc
    return linalg


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64, as pytorch-fid.

    When the square root is not finite (a nearly singular product) it is recomputed with
    ``eps`` added to both diagonals (with a RuntimeWarning, where pytorch-fid prints). A
    complex root whose diagonal's imaginary parts are all within 1e-3 of zero is replaced
    by its real part; otherwise ValueError.
    """
    linalg = _scipy_linalg()
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two means differ in length: {mu1.shape} vs {mu2.shape} (features of different dims?)")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances must both be ({mu1.shape[0]}, {mu1.shape[0]}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # SciPy's own "matrix is singular" note: pytorch-fid silences it (disp=False) and
        # checks the result instead, as below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals", RuntimeWarning, stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the covariances' product has a square root with imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_statistics(a: FIDStatistics, b: FIDStatistics) -> float:
    """:func:`frechet_distance` of two sets' statistics; refuses statistics made by different weights."""
    if a.inception_sha256 and b.inception_sha256 and a.inception_sha256 != b.inception_sha256:
        raise ValueError(
            f"the two statistics come from different Inception weights (sha256 {a.inception_sha256} vs "
            f"{b.inception_sha256}): their FID means nothing"
        )
    if a.dims != b.dims:
        raise ValueError(f"the two statistics have different dims: {a.dims} vs {b.dims}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


@dataclass(frozen=True)
class FIDResult:
    """An FID value with what it was computed from."""

    fid: float
    dims: int
    counts: tuple[int | None, int | None]
    inception_sha256: str | None


def statistics_of_path(
    path: str | os.PathLike[str],
    model: FIDInceptionV3,
    *,
    dims: int = 2048,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
) -> FIDStatistics:
    """A ``.npz`` file's statistics, or those of a directory's images (:func:`list_images`)."""
    p = Path(path)
    if p.suffix == ".npz":
        stats = load_statistics(p)
        if stats.dims != dims:
            raise ValueError(f"{p} holds statistics of {stats.dims}-dim features, not {dims}")
        return stats
    files = list_images(p)
    if len(files) < 2:
        raise ValueError(f"{p} holds {len(files)} image(s) with extensions {', '.join(IMAGE_EXTENSIONS)}; FID needs at least 2")
    return compute_statistics(iter_image_files(files), model, dims=dims, batch_size=batch_size, device=device, precision=precision)


def fid_of_paths(
    paths: Sequence[str | os.PathLike[str]],
    model: FIDInceptionV3,
    *,
    dims: int = 2048,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
) -> FIDResult:
    """FID between two directories of images and/or ``.npz`` statistics files (pytorch-fid's CLI)."""
    if len(paths) != 2:
        raise ValueError(f"FID compares exactly 2 paths, got {len(paths)}")
    a, b = (statistics_of_path(p, model, dims=dims, batch_size=batch_size, device=device, precision=precision) for p in paths)
    value = fid_from_statistics(a, b)
    return FIDResult(value, dims, (a.count, b.count), a.inception_sha256 or b.inception_sha256)
