"""Procedural ADE20K-layout scenes: the classes' looks, random layouts, and their rendering.

The generator draws outdoor scenes as layered shapes (sky, jagged mountains, buildings and
skyscrapers, trees, ground bands of grass / field / sand / water / sea, a road, a fence,
rocks), every region labelled with its real ADE20K class id (``object150_info.csv``, 1-based,
0 = unlabeled; the generator labels every pixel, so 0 never occurs). Each class is rendered
with its own base colour AND its own texture (stripes of a class-specific period and
orientation, a window grid, a checker, blotchy noise of a class-specific amplitude, a
vertical gradient), all in pixel units, so a class looks the same at any image size.

:func:`generate_scene` makes one scene (image and label map) from a numpy generator;
:func:`jpeg_round_trip` is what a reader of the written JPEG sees. Importing this module
does not import torch: :func:`class_names` imports spade_core only when called.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------
# Classes: real ADE20K ids (object150_info.csv), base colour, texture


SKY, BUILDING, ROAD, TREE, GRASS = 3, 2, 7, 5, 10
MOUNTAIN, WATER, SEA, FIELD, FENCE, ROCK, SAND, SKYSCRAPER = 17, 22, 27, 30, 33, 35, 47, 49


@dataclass(frozen=True)
class ClassStyle:
    """How one class is rendered: ``base`` RGB plus a texture.

    pattern: "gradient" (vertical, over the image height), "hstripes" / "vstripes" /
    "dstripes" (square waves of ``period`` px, varying along y / x / x + y), "checker"
    (cells of ``period`` px), "grid" (window grid: cells ``period`` px, windows of
    ``window`` px), or "none". ``shift`` is the RGB offset the pattern applies (+/- for
    stripes and checker, windows only for grid, top-to-bottom for gradient). ``noise`` is
    the standard deviation of the blotchy noise added, ``cell`` its block size in px.
    """

    id: int
    name: str
    base: tuple[int, int, int]
    pattern: str
    period: int = 0
    shift: tuple[int, int, int] = (0, 0, 0)
    noise: float = 0.0
    cell: int = 1
    window: int = 0


STYLES: tuple[ClassStyle, ...] = (
    ClassStyle(SKY, "sky", (125, 180, 235), "gradient", shift=(-40, -30, -12), noise=1.5, cell=4),
    ClassStyle(MOUNTAIN, "mountain", (125, 95, 150), "dstripes", period=6, shift=(10, 8, 12), noise=5, cell=2),
    ClassStyle(BUILDING, "building", (185, 100, 70), "grid", period=5, window=2, shift=(-110, -70, -35), noise=3),
    ClassStyle(SKYSCRAPER, "skyscraper", (200, 110, 190), "vstripes", period=3, shift=(22, 22, 22), noise=3),
    ClassStyle(TREE, "tree", (40, 105, 40), "none", noise=16, cell=2),
    ClassStyle(GRASS, "grass", (110, 190, 60), "vstripes", period=2, shift=(14, 18, 8), noise=4),
    ClassStyle(FIELD, "field", (205, 180, 80), "hstripes", period=4, shift=(20, 20, 12), noise=3),
    ClassStyle(SAND, "sand", (235, 215, 170), "none", noise=8, cell=1),
    ClassStyle(ROAD, "road", (80, 80, 85), "none", noise=3, cell=1),
    ClassStyle(WATER, "water", (35, 165, 160), "hstripes", period=3, shift=(15, 18, 18), noise=3),
    ClassStyle(SEA, "sea", (25, 50, 130), "hstripes", period=6, shift=(12, 14, 22), noise=3),
    ClassStyle(ROCK, "rock", (120, 100, 80), "checker", period=2, shift=(10, 10, 10), noise=3),
    ClassStyle(FENCE, "fence", (205, 200, 205), "vstripes", period=4, shift=(40, 40, 40), noise=3),
)
CLASS_IDS: tuple[int, ...] = tuple(sorted(s.id for s in STYLES))
STYLE_BY_ID: dict[int, ClassStyle] = {s.id: s for s in STYLES}

MIN_SIZE = 32
JPEG_QUALITY = 95


def class_names() -> dict[int, str]:
    """id -> ADE20K name (first synonym, from spade_core's object150_info.csv) of the classes used."""
    from spade_core.semantics import ade20k_classes  # imports torch: only when asked

    names = ade20k_classes().names
    return {i: names[i] for i in CLASS_IDS}


# ---------------------------------------------------------------------------------------
# Geometry


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _px(size: int, frac: float, minimum: float) -> float:
    return max(frac * size, minimum)


def _ridge(rng: np.random.Generator, size: int, base: float, height: float) -> np.ndarray:
    """Mountain ridge y(x): a few peaks (piecewise linear) plus jagged jitter every 3 px."""
    n = int(rng.integers(2, 5))
    xs = np.sort(rng.uniform(-0.2, 1.2, 2 * n + 1)) * size
    ys = np.where(np.arange(2 * n + 1) % 2 == 1, base - height * rng.uniform(0.6, 1.0, 2 * n + 1), base - height * rng.uniform(0.0, 0.45, 2 * n + 1))
    x = np.arange(size, dtype=np.float32)
    ridge = np.interp(x, xs, ys)
    step = 3.0
    jx = np.arange(0, size + step, step)
    jag = rng.uniform(-1, 1, len(jx)) * max(1.0, 0.02 * size)
    return (ridge + np.interp(x, jx, jag)).astype(np.float32)


def _wavy(rng: np.random.Generator, size: int, y0: float, amp: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float32)
    lam = rng.uniform(0.5, 1.5) * size
    return (y0 + amp * np.sin(2 * np.pi * x / lam + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def _blob(label: np.ndarray, cls: int, cy: float, cx: float, ry: float, rx: float, rng: np.random.Generator, wobble: float) -> None:
    """Fill an ellipse with a wavy rim (radius modulated by angle) - within its bounding box."""
    size = label.shape[0]
    r = 1 + wobble
    y0, y1 = max(0, int(cy - ry * r) - 1), min(size, int(cy + ry * r) + 2)
    x0, x1 = max(0, int(cx - rx * r) - 1), min(size, int(cx + rx * r) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    theta = np.arctan2(dy, dx)
    k = int(rng.integers(3, 7))
    rim = 1 + wobble * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    inside = dy * dy + dx * dx <= rim * rim
    label[y0:y1, x0:x1][inside] = cls


def generate_layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """The label map (uint8 size x size, ADE20K ids) of one random scene."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    s = size
    yy, xx = _grid(s)
    label = np.full((s, s), SKY, dtype=np.uint8)
    horizon = rng.uniform(0.42, 0.68) * s

    # mountains: one or two ranges standing on the horizon
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 3))):
            ridge = _ridge(rng, s, horizon + 2, rng.uniform(0.15, 0.4) * s)
            label[(yy >= ridge[None, :]) & (yy < horizon + 4)] = MOUNTAIN

    # buildings and skyscrapers on the horizon
    if rng.random() < 0.55:
        x = rng.uniform(-0.1, 0.4) * s
        for _ in range(int(rng.integers(1, 6))):
            tall = rng.random() < 0.35
            w = _px(s, rng.uniform(0.08, 0.14) if tall else rng.uniform(0.1, 0.22), 8)
            h = _px(s, rng.uniform(0.3, 0.5) if tall else rng.uniform(0.12, 0.3), 8)
            h = min(h, horizon - 2)
            x0, x1 = int(round(x)), int(round(x + w))
            y0 = int(round(horizon - h))
            label[max(0, y0) : int(horizon) + 3, max(0, x0) : max(0, x1)] = SKYSCRAPER if tall else BUILDING
            x += w + rng.uniform(-0.3 * w, 0.15 * s)
            if x > s:
                break

    # ground: 1-3 bands with wavy boundaries from the horizon down
    water_like = (SEA, WATER)
    land = (GRASS, FIELD, SAND, GRASS)
    nb = int(rng.integers(1, 4))
    kinds: list[int] = []
    for b in range(nb):
        if b == 0 and rng.random() < 0.4:
            kinds.append(int(rng.choice(water_like)))
        else:
            choices = [c for c in land + (WATER,) if not kinds or c != kinds[-1]]
            kinds.append(int(rng.choice(choices)))
    edges = np.sort(rng.uniform(0, 1, nb - 1)) if nb > 1 else np.zeros(0)
    ground = s - horizon
    land_top = None  # where the first band that is not water starts
    for b, cls in enumerate(kinds):
        y0 = horizon + (edges[b - 1] * ground * 0.8 + 0.1 * ground if b > 0 else 0)
        if land_top is None and cls not in water_like:
            land_top = y0
        if b == 0:
            boundary = np.full(s, y0, dtype=np.float32)
        else:
            boundary = _wavy(rng, s, y0, rng.uniform(0, 0.03) * s)
        label[yy >= boundary[None, :]] = cls

    # trees: crowns near the horizon (and a few in the foreground)
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 6))):
            r = _px(s, rng.uniform(0.05, 0.12), 5)
            cy = horizon - rng.uniform(0.2, 1.0) * r if rng.random() < 0.75 else rng.uniform(horizon, s)
            cx = rng.uniform(0, s)
            _blob(label, TREE, cy, cx, r * rng.uniform(0.9, 1.4), r, rng, 0.12)

    # road: a perspective trapezoid from the bottom edge towards the horizon, on land
    if rng.random() < 0.5 and land_top is not None and land_top < s - 0.15 * s:
        y_top = max(horizon + rng.uniform(0.05, 0.5) * ground, land_top + 2)
        c_top = rng.uniform(0.2, 0.8) * s
        c_bot = c_top + rng.uniform(-0.3, 0.3) * s
        w_top = _px(s, rng.uniform(0.03, 0.08), 3)
        w_bot = _px(s, rng.uniform(0.25, 0.6), 10)
        t = np.clip((yy - y_top) / max(1.0, s - y_top), 0, 1)
        c = c_top + (c_bot - c_top) * t
        hw = (w_top + (w_bot - w_top) * t) / 2
        label[(yy >= y_top) & (np.abs(xx - c) <= hw)] = ROAD

    # fence: a band across part of the ground
    if rng.random() < 0.35:
        hf = _px(s, rng.uniform(0.07, 0.12), 7)
        yf = rng.uniform(horizon, s - hf)
        xa = rng.uniform(-0.2, 0.5) * s
        xb = xa + _px(s, rng.uniform(0.35, 0.9), 12)
        label[int(yf) : int(yf + hf), max(0, int(xa)) : max(0, int(xb))] = FENCE

    # rocks: boulders on the ground
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 4))):
            r = _px(s, rng.uniform(0.04, 0.09), 4)
            cy = rng.uniform(horizon + r, s)
            _blob(label, ROCK, cy, rng.uniform(0, s), r * rng.uniform(0.6, 0.9), r * rng.uniform(1.0, 1.5), rng, 0.1)
    return label


# ---------------------------------------------------------------------------------------
# Rendering


def _blocky_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    n = -(-size // cell)
    z = rng.standard_normal((n, n), dtype=np.float32)
    if cell > 1:
        z = np.repeat(np.repeat(z, cell, 0), cell, 1)
    return z[:size, :size]


def _pattern(style: ClassStyle, size: int) -> np.ndarray | None:
    """The class's deterministic pattern in [-1, 1] (or {0, 1} for grid), size x size, or None."""
    yy, xx = _grid(size)
    p = style.period
    if style.pattern == "gradient":
        return 1 - 2 * yy / (size - 1)  # +1 at the top, -1 at the bottom
    if style.pattern in ("hstripes", "vstripes", "dstripes"):
        u = {"hstripes": yy, "vstripes": xx, "dstripes": xx + yy}[style.pattern]
        return np.where((u % p) < p / 2, 1.0, -1.0).astype(np.float32)
    if style.pattern == "checker":
        return np.where(((xx // p) + (yy // p)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    if style.pattern == "grid":
        return (((xx % p) >= p - style.window) & ((yy % p) >= p - style.window)).astype(np.float32)
    return None


def render(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a label map: each class's base colour (jittered +/-4 per scene) plus its texture."""
    size = label.shape[0]
    img = np.empty((size, size, 3), dtype=np.float32)
    for cls in np.unique(label):
        style = STYLE_BY_ID[int(cls)]
        mask = label == cls
        colour = np.asarray(style.base, np.float32) + rng.uniform(-4, 4, 3).astype(np.float32)
        value = np.broadcast_to(colour, (size, size, 3)).copy()
        pat = _pattern(style, size)
        if pat is not None:
            value += pat[..., None] * np.asarray(style.shift, np.float32)
        if style.noise:
            value += _blocky_noise(rng, size, style.cell)[..., None] * style.noise
        img[mask] = value[mask]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One random scene: (image uint8 size x size x 3, label uint8 size x size of ADE20K ids)."""
    label = generate_layout(rng, size)
    return render(label, rng), label


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY, subsampling: int = 0) -> np.ndarray:
    """What a reader of the written JPEG sees (the dataset is written at quality 95, 4:4:4)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
