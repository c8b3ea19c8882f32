"""Request images in, response images out: decoding with limits, label maps, encoding.

Everything that can go wrong with uploaded bytes ends in :class:`RequestError` carrying the
HTTP status and a message that names the field and the problem; nothing here raises
anything else for bad input. Pure numpy + Pillow (no Ray, no torch): the ingress runs it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spade_core.preprocess import LABEL_MODES, PHOTO_MODES

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class RequestError(Exception):
    """A request the API refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def open_image(data: bytes, *, field: str, allowed: tuple[str, ...], max_pixels: int) -> Image.Image:
    """Decode uploaded bytes; the pixel count is checked from the header before decoding.

    400: empty, not an image, truncated or corrupt; 415: an image format not in ``allowed``
    (PIL format names); 413: more than ``max_pixels`` pixels (decompression bombs).
    """
    if not data:
        raise RequestError(400, f"{field} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, f"{field} has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise RequestError(400, f"{field} is not an image (expected {' or '.join(allowed)} bytes)") from exc
    except Exception as exc:  # Pillow's plugins raise assorted errors on malformed headers
        raise RequestError(400, f"{field} could not be read as an image: {exc}") from exc
    if im.format not in allowed:
        raise RequestError(415, f"{field} is a {im.format} image; expected {' or '.join(allowed)}")
    w, h = im.size
    if w < 1 or h < 1:
        raise RequestError(400, f"{field} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise RequestError(413, f"{field} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        im.load()
    except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, ValueError, zlib errors
        raise RequestError(400, f"{field} is truncated or corrupt ({im.format}): {exc}") from exc
    return im


@dataclass(frozen=True)
class Palette:
    """Label id <-> RGB colour of the model's classes (colours must be unique to be read back)."""

    colors: tuple[tuple[int, int, int], ...]

    def ids_of(self, rgb: np.ndarray, *, field: str) -> np.ndarray:
        """(H, W, 3) uint8 colours -> (H, W) int64 label ids; 400 naming colours not in the palette."""
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        table = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colors], dtype=np.int64)
        order = np.argsort(table, kind="stable")
        keys = table[order]
        pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
        found = keys[pos] == packed
        if not found.all():
            bad, counts = np.unique(packed[~found], return_counts=True)
            top = np.argsort(-counts)[:5]
            listed = ", ".join(f"#{int(bad[i]):06x} ({int(counts[i])} px)" for i in top)
            raise RequestError(
                400,
                f"{field}: {int((~found).sum())} pixels have colours that are not in the model's palette "
                f"({len(bad)} distinct, e.g. {listed}); send raw label ids as a single-channel PNG, or "
                "colours from GET /v1/model",
            )
        return order[pos].astype(np.int64)


def label_ids(data: bytes, *, field: str, palette: Palette, max_pixels: int) -> np.ndarray:
    """A label map PNG -> (H, W) int64 raw label ids.

    Single channel (L, P: the stored indices, I;16, I) is raw ids; RGB (or fully opaque
    RGBA) is read through the palette. Label maps must be lossless: PNG only.
    """
    im = open_image(data, field=field, allowed=("PNG",), max_pixels=max_pixels)
    if im.mode in LABEL_MODES:
        return np.asarray(im).astype(np.int64)  # P: the palette indices are the ids
    if im.mode == "RGBA":
        rgba = np.asarray(im)
        if (rgba[..., 3] != 255).any():
            raise RequestError(400, f"{field} has transparent pixels; label maps need a label at every pixel")
        return palette.ids_of(rgba[..., :3], field=field)
    if im.mode == "RGB":
        return palette.ids_of(np.asarray(im), field=field)
    raise RequestError(
        400,
        f"{field} is a {im.mode} PNG ({len(im.getbands())} channel(s)); expected single-channel label ids "
        "(8- or 16-bit grey or palette) or an RGB colour map",
    )


def rgb_image(data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
    """A style image (PNG / JPEG / WebP) -> (H, W, 3) uint8 RGB, upright as its EXIF orientation says.

    Animated files give their first frame."""
    im = open_image(data, field=field, allowed=("PNG", "JPEG", "WEBP"), max_pixels=max_pixels)
    if im.mode not in PHOTO_MODES:
        raise RequestError(400, f"{field} has an unsupported colour mode {im.mode}")
    try:
        im = ImageOps.exif_transpose(im)  # phones store photos sideways with an orientation tag
    except Exception as exc:  # a malformed EXIF block
        raise RequestError(400, f"{field} has unreadable EXIF data: {exc}") from exc
    return np.asarray(im.convert("RGB"))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of (H, W, 3) uint8 to (height, width)."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC))


def encode_image(rgb: np.ndarray, fmt: str, *, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> image file bytes in ``fmt`` (png / jpeg / webp)."""
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 1}
    Image.fromarray(rgb).save(buf, format=PIL_FORMATS[fmt], **options)
    return buf.getvalue()


def parse_size(text: str | None, *, original: tuple[int, int], model: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The output (height, width): absent -> the model's, ``original`` -> the label map's, ``WxH``."""
    if text is None or text == "":
        return model
    if text == "original":
        size = original
    else:
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise RequestError(400, f"size must be 'WIDTHxHEIGHT' (e.g. 512x384) or 'original', got {text!r}")
        size = (int(parts[1]), int(parts[0]))
    if min(size) < 1 or max(size) > max_side:
        raise RequestError(400, f"size {size[1]}x{size[0]} is out of range: each side must be in 1..{max_side}")
    return size
