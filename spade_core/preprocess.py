"""Training-data preprocessing: resize / crop / flip, equal to the reference pixel for pixel.

Pure functions of (PIL image, config, AugmentParams). The randomness lives only in
``sample_params``, so an image, its label map and its instance map get the same crop and
flip, and a result can be reproduced from the params alone.

Every geometric step is PIL's own call (``resize``, ``crop``, ``transpose``), as in the
reference, so interpolation and the zero padding of crops past the border are PIL's. The
reference's sizing quirks are reproduced on purpose (results must match models trained
with it):

* ``scale_shortside``: the short side keeps its *original* length and the long side becomes
  ``int(load_size * long / short)``: the image is stretched, not scaled.
* ``scale_width``: height ``int(load_size * h / w)`` (truncated, not rounded).
* ``none``: each side becomes ``round(side / 32) * 32`` with Python's round (half to even:
  48 -> 64, 80 -> 64).
* ``fixed``: ``crop_size`` wide, ``round(crop_size / aspect_ratio)`` high (half to even).
* every crop is ``crop_size`` square; ``aspect_ratio`` only matters in ``fixed``.

Two departures, both where the reference would break rather than differ in a trained model:
32-bit 'I' label maps give their ids (the reference's ToTensor leaves int images undivided, so
its ``* 255`` multiplies the ids), and 16-bit ids are resized as 32-bit 'I' (see _transform_ids).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

Mode = Literal[
    "resize_and_crop",
    "crop",
    "scale_width",
    "scale_width_and_crop",
    "scale_shortside",
    "scale_shortside_and_crop",
    "fixed",
    "none",
]
MODES: tuple[str, ...] = get_args(Mode)
# Modes that resize to load_size and then crop crop_size: a smaller load would only pad.
_LOAD_THEN_CROP = ("resize_and_crop", "scale_width_and_crop", "scale_shortside_and_crop")
_POWER_BASE = 32  # 'none' mode rounds each side to a multiple of this
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")  # 'P': the palette indices are the ids
INSTANCE_MODES = ("L", "I", "I;16", "I;16L", "I;16B")
# Colour modes a photo may come in (served style images): the ones convert("RGB") reads as colours
PHOTO_MODES = ("RGB", "RGBA", "L", "LA", "P", "I;16", "I", "CMYK", "YCbCr", "1")

Size = tuple[int, int]  # (width, height), as PIL's Image.size


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PreprocessConfig:
    """The reference's ``preprocess_mode``, ``load_size``, ``crop_size``, ``aspect_ratio`` and ``not no_flip``."""

    mode: Mode = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    aspect_ratio: float = 1.0  # width / height; used by 'fixed' only
    flip: bool = True  # random horizontal flips when training

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require(self.mode in MODES, f"preprocess.mode must be one of {list(MODES)}, got {self.mode!r}")
        _require(
            _is_int(self.load_size) and self.load_size >= 1, f"preprocess.load_size must be an int >= 1, got {self.load_size!r}"
        )
        _require(
            _is_int(self.crop_size) and self.crop_size >= 1, f"preprocess.crop_size must be an int >= 1, got {self.crop_size!r}"
        )
        _require(
            self.mode not in _LOAD_THEN_CROP or self.load_size >= self.crop_size,
            f"preprocess.load_size ({self.load_size}) must be >= preprocess.crop_size ({self.crop_size}) "
            f"in mode {self.mode!r}",
        )
        ratio = self.aspect_ratio
        _require(
            isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < float("inf"),
            f"preprocess.aspect_ratio must be a finite number > 0, got {ratio!r}",
        )
        _require(
            self.mode != "fixed" or round(self.crop_size / ratio) >= 1,
            f"preprocess.aspect_ratio {ratio} makes the 'fixed' height round({self.crop_size} / {ratio}) zero",
        )
        _require(isinstance(self.flip, bool), f"preprocess.flip must be a bool, got {self.flip!r}")


@dataclass(frozen=True)
class AugmentParams:
    """One sample's random choices: the crop's top-left corner (x, y) and the horizontal flip."""

    crop_pos: tuple[int, int]
    flip: bool

    def __post_init__(self) -> None:
        pos = self.crop_pos
        _require(
            isinstance(pos, tuple) and len(pos) == 2 and all(_is_int(v) and v >= 0 for v in pos),
            f"params.crop_pos must be a tuple (x, y) of two ints >= 0, got {pos!r}",
        )
        _require(isinstance(self.flip, bool), f"params.flip must be a bool, got {self.flip!r}")


def sample_params(
    config: PreprocessConfig, size: Size, rng: np.random.Generator, *, train: bool = True
) -> AugmentParams:
    """Draw a crop corner and a flip for an image of ``size`` (width, height), like the reference's get_params.

    x and y are uniform in ``0..max(0, span - crop_size)`` inclusive, where span is the size the
    reference assumes before its crop. The flip is a fair coin only when ``train`` and ``config.flip``.
    """
    span_w, span_h = _crop_span(config, _checked_size(size))
    x = int(rng.integers(0, max(0, span_w - config.crop_size) + 1))
    y = int(rng.integers(0, max(0, span_h - config.crop_size) + 1))
    # Drawn whatever the flags, so that train and eval see the same crop stream for one seed.
    coin = bool(rng.random() > 0.5)
    return AugmentParams(crop_pos=(x, y), flip=coin and train and config.flip)


def _crop_span(config: PreprocessConfig, size: Size) -> Size:
    """The reference's get_params view of the image size its crop works on.

    For the crop modes this equals the size the resize step produces (tests check it); other
    modes never crop, and the reference then uses the original size.
    """
    w, h = size
    load = config.load_size
    if config.mode == "resize_and_crop":
        return load, load
    if config.mode == "scale_width_and_crop":
        return load, load * h // w
    if config.mode == "scale_shortside_and_crop":
        return _scale_shortside(size, load)
    return w, h


def _scale_shortside(size: Size, load: int) -> Size:
    # Reference quirk: the short side keeps its original length; only the long side is scaled
    # (to load * long / short, truncated), so the image is stretched along its long side.
    w, h = size
    short, long = min(w, h), max(w, h)
    long = int(load * long / short)
    return (short, long) if w == short else (long, short)


def _resized(config: PreprocessConfig, size: Size) -> Size:
    """The size after the mode's resize step (before any crop); equal to ``size`` when it has none."""
    w, h = size
    mode, load, crop = config.mode, config.load_size, config.crop_size
    if mode == "resize_and_crop":
        return load, load
    if mode.startswith("scale_width"):
        return load, int(load * h / w)
    if mode.startswith("scale_shortside"):
        return _scale_shortside(size, load)
    if mode == "none":
        return int(round(w / _POWER_BASE) * _POWER_BASE), int(round(h / _POWER_BASE) * _POWER_BASE)
    if mode == "fixed":
        return crop, round(crop / config.aspect_ratio)
    return w, h  # 'crop'


@dataclass(frozen=True)
class _Geometry:
    """The ops the reference applies, always in this order: resize, crop, flip."""

    resize: Size | None  # (width, height); None: the size is unchanged
    crop: tuple[int, int, int, int] | None  # PIL box; may reach past the border (PIL pads with 0)
    flip: bool
    out_size: Size

    def apply(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        if self.resize is not None:
            image = image.resize(self.resize, resample)
        if self.crop is not None:
            image = image.crop(self.crop)
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def _geometry(config: PreprocessConfig, size: Size, params: AugmentParams) -> _Geometry:
    size = _checked_size(size)
    new = _resized(config, size)
    _require(
        min(new) >= 1,
        f"an image of size {size} (width, height) becomes {new} in preprocess mode {config.mode!r}; "
        "the reference would fail on it (PIL cannot resize to zero pixels)",
    )
    crop = None
    out = new
    if "crop" in config.mode:
        x, y = params.crop_pos
        crop = (x, y, x + config.crop_size, y + config.crop_size)
        out = (config.crop_size, config.crop_size)
    # Resizing to the same size is a copy in PIL, so skipping it changes nothing.
    return _Geometry(resize=new if new != size else None, crop=crop, flip=params.flip, out_size=out)


def _checked_size(size: Size) -> Size:
    _require(
        len(size) == 2 and all(_is_int(v) and v >= 1 for v in size),
        f"size must be (width, height) with ints >= 1, got {size!r}",
    )
    return int(size[0]), int(size[1])


def output_size(config: PreprocessConfig, size: Size) -> tuple[int, int]:
    """(height, width) of the preprocessed result for an input of ``size`` (width, height)."""
    w, h = _geometry(config, size, AugmentParams(crop_pos=(0, 0), flip=False)).out_size
    return h, w


def transform_image_uint8(image: Image.Image, config: PreprocessConfig, params: AugmentParams) -> np.ndarray:
    """The photo after ``convert('RGB')``, BICUBIC resize, crop and flip: (H, W, 3) uint8.

    What the data pipeline ships; ``to_unit_range`` turns it into the network input.
    """
    rgb = image.convert("RGB")
    return np.asarray(_geometry(config, rgb.size, params).apply(rgb, Image.Resampling.BICUBIC)).copy()


def to_unit_range(pixels: Any) -> Any:
    """uint8 pixels (numpy array or torch tensor, any layout, any device) -> float32 ``x / 255 * 2 - 1``, same layout.

    Bit-equal to the reference's ToTensor + Normalize(0.5, 0.5), ``(x / 255 - 0.5) / 0.5``: the two
    round identically, since scaling by 2 is exact in floating point.
    """
    if isinstance(pixels, np.ndarray):
        _require(pixels.dtype == np.uint8, f"pixels must be uint8, got {pixels.dtype}")
        return _UNIT_TABLE[pixels]
    # torch stays optional: a tensor can only exist if its module is already imported.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(pixels, torch.Tensor):
        _require(pixels.dtype == torch.uint8, f"pixels must be uint8, got {pixels.dtype}")
        # A table lookup rather than arithmetic: CUDA divides by a CPU scalar as a multiply by its
        # reciprocal, which can be one ulp off the reference. long(): uint8 indices would be a mask.
        return torch.tensor(_UNIT_TABLE, device=pixels.device)[pixels.long()]
    raise ValueError(f"pixels must be a uint8 numpy array or torch tensor, got {type(pixels).__name__}")


# value -> value / 255 * 2 - 1, each step correctly rounded in float32 (numpy divides exactly)
_UNIT_TABLE = np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
_UNIT_TABLE.flags.writeable = False


def to_uint8(images: Any) -> Any:
    """Images in [-1, 1] (numpy array or torch tensor, any layout) -> uint8, same layout; tensors
    come back on the CPU. The inverse of ``to_unit_range`` and the one rounding the project
    uses for every picture it writes or serves: clamp, ``(x + 1) * 127.5``, round half to even
    (what numpy's ``rint`` and torch's ``round`` both do), so a saved PNG, a served image and an
    evaluated one hold the same bytes for the same output.
    """
    if isinstance(images, np.ndarray):
        return np.rint((np.clip(images.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(images, torch.Tensor):
        _require(images.is_floating_point(), f"images must be floating point, got {images.dtype}")
        return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    raise ValueError(f"images must be a float numpy array or torch tensor, got {type(images).__name__}")


def transform_image(image: Image.Image, config: PreprocessConfig, params: AugmentParams) -> np.ndarray:
    """The photo as the reference feeds it to the networks: (3, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(to_unit_range(transform_image_uint8(image, config, params)).transpose(2, 0, 1))


def transform_label(label: Image.Image, config: PreprocessConfig, params: AugmentParams) -> np.ndarray:
    """Raw label ids after NEAREST resize, crop and flip: (H, W) int64.

    Modes 'L' and 'P' (palette indices are the ids) and 'I' / 'I;16' (16/32-bit ids). The don't-care
    value 255 is kept as is: ``spade_core.semantics.label_channels`` maps it to channel label_nc later.
    """
    return _transform_ids(label, config, params, LABEL_MODES, "label")


def transform_instance(instance: Image.Image, config: PreprocessConfig, params: AugmentParams) -> np.ndarray:
    """Instance ids after NEAREST resize, crop and flip: (H, W) int64; modes 'L' and 'I' / 'I;16'."""
    return _transform_ids(instance, config, params, INSTANCE_MODES, "instance map")


def _transform_ids(
    image: Image.Image, config: PreprocessConfig, params: AugmentParams, modes: tuple[str, ...], what: str
) -> np.ndarray:
    _require(image.mode in modes, f"{what} image mode must be one of {list(modes)}, got {image.mode!r}")
    # Otherwise no convert(), which would recolour 'P' indices. But 16-bit ids go to 32-bit 'I':
    # PIL's NEAREST resize of 'I;16' picks some different source pixels than for 'L' / 'I' / the
    # photo, and Pillow of the reference's time opened 16-bit PNGs as 'I' anyway.
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    out = _geometry(config, image.size, params).apply(image, Image.Resampling.NEAREST)
    return np.asarray(out).astype(np.int64)


def preprocess_pair(
    image: Image.Image,
    label: Image.Image,
    instance: Image.Image | None = None,
    *,
    config: PreprocessConfig,
    params: AugmentParams,
) -> dict[str, np.ndarray]:
    """One training sample with shared params: {'image': (3, H, W) float32, 'label': (H, W) int64[, 'instance']}."""
    for name, other in (("image", image), ("instance map", instance)):
        # The reference draws params from the label's size; a differently sized partner would misalign.
        _require(
            other is None or other.size == label.size,
            f"{name} size {other.size if other is not None else None} differs from label size {label.size}",
        )
    out = {"image": transform_image(image, config, params), "label": transform_label(label, config, params)}
    if instance is not None:
        out["instance"] = transform_instance(instance, config, params)
    return out
