"""The oracle segmenter of the synthetic scenes: fitted on generated scenes, labelling images by appearance.

The oracle segmenter that labels such images by appearance alone is
:class:`spade_core.metrics.oracle.OracleSegmenter` (the algorithm, beside the metrics it
serves; it knows nothing of these scenes). This module fits it on them: :func:`fit_oracle`
learns the class prototypes deterministically from generated scenes after a JPEG round trip
(also 4:2:0 and slightly blurred copies), :func:`default_oracle` is that fit made once per
process, and :func:`segment` labels images with it. Measured on fresh JPEG scenes: mIoU
~0.99 at 64 px, ~0.999 at 256 px; ~0.02 on noise. Colour carries most of the weight: right
colours without the textures still score high, wrong colours in the right layout score ~0.08.

It is the metric of the project's learning benchmark: images a trained SPADE model generates
from a label map are segmented and compared with that label map by
:func:`spade_core.metrics.mean_iou` (one confusion matrix over all pixels, classes present
in target or prediction). :func:`segment` takes what
:func:`spade_core.metrics.oracle.as_uint8_image` takes: a uint8 ``H x W x 3`` RGB array (or a
batch ``B x H x W x 3``), a float array in ``[-1, 1]`` of the same layouts, or a torch
tensor ``3 x H x W`` / ``B x 3 x H x W`` - float in ``[-1, 1]`` (the generator's tanh
output) or uint8.

Importing this module does not import torch: spade_core is imported only when the oracle is fitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from .scenes import CLASS_IDS, generate_scene, jpeg_round_trip

if TYPE_CHECKING:
    from spade_core.metrics.oracle import OracleSegmenter

ORACLE_FIT_SCENES = 30
ORACLE_FIT_SIZE = 128
ORACLE_FIT_SEED = 1234


def _fit_variant(image: np.ndarray, variant: int) -> np.ndarray:
    """The oracle fits on JPEG 4:4:4 (as written), JPEG 4:2:0 and slightly blurred copies, so
    that chroma subsampling and the softer output of a generator do not throw it off."""
    out = jpeg_round_trip(image, subsampling=2 if variant == 1 else 0)
    if variant == 2:
        out = np.array(Image.fromarray(out).filter(ImageFilter.GaussianBlur(0.7)))
    return out


def fitting_scenes(
    n: int = ORACLE_FIT_SCENES, size: int = ORACLE_FIT_SIZE, seed: int = ORACLE_FIT_SEED
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The oracle's fitting examples: (image as a reader sees it, label) of ``n`` generated scenes."""
    for i in range(n):
        image, label = generate_scene(np.random.default_rng([seed, i]), size)
        yield _fit_variant(image, i % 3), label


def fit_oracle(
    *, fit_scenes: int = ORACLE_FIT_SCENES, fit_size: int = ORACLE_FIT_SIZE, seed: int = ORACLE_FIT_SEED, **settings: Any
) -> OracleSegmenter:
    """An oracle fitted on generated scenes, deterministically (~1 s).

    ``settings``: :class:`~spade_core.metrics.oracle.OracleSegmenter`'s ``window``,
    ``pixel_weight``, ``min_support``, ``smooth``.
    """
    from spade_core.metrics.oracle import OracleSegmenter  # imports torch: only when asked

    return OracleSegmenter.fit(fitting_scenes(fit_scenes, fit_size, seed), CLASS_IDS, **settings)


@lru_cache(maxsize=1)
def default_oracle() -> OracleSegmenter:
    """The oracle with default settings, fitted once per process (deterministic)."""
    return fit_oracle()


def segment(image: Any) -> np.ndarray:
    """ADE20K ids (int64, ``H x W`` or ``B x H x W``) of a generated image; inputs as the module docstring says."""
    return default_oracle()(image)
