"""A corpus of hostile and unusual image files, for the image fields of the HTTP API.

Each entry is what a careless or malicious client could upload: decompression bombs, odd
bit depths and colour modes, interlacing, EXIF rotation, animation, degenerate sizes,
truncation, and files whose name and content disagree. The API must answer each with a 4xx
that names the field, or a correct image; never a 5xx, never a dead replica.
(``tests/test_serve_hostile.py`` sends every entry to every image field; bench/drills.py too.)

Files that Pillow cannot write (interlaced PNG, zero-sized PNG, bombs) are assembled chunk
by chunk here, so the corpus needs nothing but Pillow and zlib.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    filename: str
    content_type: str
    # what a correct server may answer: "ok" (a 200 with an image), or the 4xx statuses
    # that are right for it; a label map and a style image may differ (a JPEG label map is refused)
    label: frozenset[int | str]
    style: frozenset[int | str]


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_from_rows(width: int, height: int, raw: bytes, *, bit_depth: int = 8, color_type: int = 0, interlace: int = 0,
                  extra: bytes = b"", level: int = 9) -> bytes:
    """A PNG whose IDAT is ``raw`` (already filtered scanlines) compressed; any declared size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw, level)) + chunk(b"IEND", b"")


def adam7_png(ids: np.ndarray) -> bytes:
    """An interlaced (Adam7) 8-bit greyscale PNG of ``ids`` (Pillow writes none)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = ids[y0::dy, x0::dx]
        if sub.size:
            for row in sub.astype(np.uint8):
                raw += b"\x00" + row.tobytes()
    h, w = ids.shape
    return png_from_rows(w, h, bytes(raw), interlace=1)


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def scene(size: int = 64, seed: int = 0) -> np.ndarray:
    """Blocky label ids 1..6 (valid for any model with >= 7 labels)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(1, 7, (size // 8 + 1, size // 8 + 1))
    return np.kron(blocks, np.ones((8, 8), dtype=np.int64))[:size, :size]


def photo(size: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR))


def corpus(*, max_pixels: int = 4096 * 4096) -> list[Hostile]:
    """The entries, for a server whose ``limits.max_pixels`` is ``max_pixels``."""
    side = math.isqrt(max_pixels)  # the largest square the server must still decode
    ids = scene()
    rgb = photo()
    ok, bad = frozenset({"ok"}), frozenset({400})
    too_big, wrong_type = frozenset({413}), frozenset({415})
    grey = Image.fromarray(ids.astype(np.uint8), mode="L")
    png = saved(grey, "PNG")
    jpeg = saved(Image.fromarray(rgb), "JPEG", quality=90)
    webp = saved(Image.fromarray(rgb), "WEBP", quality=80)
    style_png = saved(Image.fromarray(rgb), "PNG")
    rotated = Image.fromarray(rgb[:, :48])  # not square: a rotation shows
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    palette = grey.convert("P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    frames = [Image.fromarray(np.roll(rgb, k, axis=1)) for k in (0, 16, 32)]
    label_frames = [Image.fromarray(np.roll(ids, k, axis=1).astype(np.uint8), mode="L") for k in (0, 8)]
    zeros = b"\x00" * ((side + 1) * side)  # side x side pixels of id 0 (filter byte + row), compressing ~1000:1
    entries = [
        # decompression bombs
        Hostile("declared 100000x100000 PNG", png_from_rows(100_000, 100_000, b"\x00" * 101), "bomb.png", "image/png", too_big, too_big),
        Hostile(f"declared {side + 1}x{side + 1} PNG (one row and column over the pixel limit)",
                png_from_rows(side + 1, side + 1, b"\x00" * (side + 2)), "big.png", "image/png", too_big, too_big),
        Hostile(f"zlib bomb: {side}x{side} zeros (the pixel limit) in {len(zlib.compress(zeros, 9))} bytes",
                png_from_rows(side, side, zeros), "zeros.png", "image/png", ok, ok),
        Hostile("text chunk bomb (zTXt inflating to 64 MiB)", png_from_rows(
            64, 64, b"".join(b"\x00" + ids[r].astype(np.uint8).tobytes() for r in range(64)),
            extra=chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(64 * 2**20), 9))), "text.png", "image/png", bad, bad),
        # bit depths, modes, layout
        Hostile("16-bit greyscale PNG", saved(Image.fromarray(ids.astype(np.uint16)), "PNG"), "ids16.png", "image/png", ok, ok),
        Hostile("palette PNG", saved(palette, "PNG"), "palette.png", "image/png", ok, ok),
        Hostile("1-bit PNG", saved(grey.point(lambda v: 255 * (v > 3)).convert("1"), "PNG"), "bits.png", "image/png", bad, ok),
        Hostile("grey + alpha PNG", saved(Image.fromarray(np.stack([ids.astype(np.uint8)] * 2, -1), mode="LA"), "PNG"),
                "la.png", "image/png", bad, ok),
        Hostile("interlaced (Adam7) PNG", adam7_png(ids), "interlaced.png", "image/png", ok, ok),
        Hostile("CMYK JPEG", saved(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "cmyk.jpg", "image/jpeg", wrong_type, ok),
        Hostile("progressive JPEG", saved(Image.fromarray(rgb), "JPEG", progressive=True), "progressive.jpg", "image/jpeg",
                wrong_type, ok),
        Hostile("EXIF-rotated JPEG", saved(rotated, "JPEG", exif=exif), "rotated.jpg", "image/jpeg", wrong_type, ok),
        Hostile("animated WebP", saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
                "anim.webp", "image/webp", wrong_type, ok),
        Hostile("APNG", saved(label_frames[0], "PNG", save_all=True, append_images=label_frames[1:], duration=100),
                "anim.png", "image/png", ok, ok),
        Hostile("GIF", saved(Image.fromarray(rgb).convert("P"), "GIF"), "x.gif", "image/gif", wrong_type, wrong_type),
        Hostile("BMP", saved(Image.fromarray(rgb), "BMP"), "x.bmp", "image/bmp", wrong_type, wrong_type),
        Hostile("TIFF", saved(Image.fromarray(rgb), "TIFF"), "x.tiff", "image/tiff", wrong_type, wrong_type),
        # degenerate sizes
        Hostile("0x0 PNG", png_from_rows(0, 0, b""), "empty.png", "image/png", bad, bad),
        Hostile("0x16 PNG", png_from_rows(0, 16, b"\x00" * 16), "zero_width.png", "image/png", bad, bad),
        Hostile("1x1 PNG", saved(Image.fromarray(np.array([[3]], dtype=np.uint8), mode="L"), "PNG"), "dot.png", "image/png", ok, ok),
        Hostile("1x16384 strip", saved(Image.fromarray(np.full((1, 16384), 2, dtype=np.uint8), mode="L"), "PNG"),
                "strip.png", "image/png", ok, ok),
        Hostile("16384x1 strip", saved(Image.fromarray(np.full((16384, 1), 2, dtype=np.uint8), mode="L"), "PNG"),
                "column.png", "image/png", ok, ok),
        Hostile("empty file", b"", "nothing.png", "image/png", bad, bad),
        Hostile("not an image", b"hello, this is text\n" * 10, "note.png", "image/png", bad, bad),
        # truncation
        # (a file cut inside its trailer still holds every pixel: a correct image is then right too)
        *[Hostile(f"truncated {name} ({keep} of {len(data)} bytes)", data[:keep], f"cut.{ext}", f"image/{kind}",
                  frozenset({400} if ext == "png" else {400, 415}) | trailer, frozenset({400}) | trailer)
          for name, data, ext, kind in (("PNG", png, "png", "png"), ("JPEG", jpeg, "jpg", "jpeg"), ("WebP", webp, "webp", "webp"))
          for keep, trailer in ((8, frozenset()), (len(data) // 2, frozenset()), (len(data) - 2, frozenset({"ok"})))],
        # name and content disagree
        Hostile("JPEG named .png", jpeg, "photo.png", "image/png", wrong_type, ok),
        Hostile("label PNG named .jpg", png, "labels.jpg", "image/jpeg", ok, ok),
        Hostile("RGB photo as a label map", style_png, "photo.png", "image/png", bad, ok),
    ]
    return entries
