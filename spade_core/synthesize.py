"""``spade-synthesize``: label map PNG in, image PNG out.

    spade-synthesize --checkpoint DIR --labels label.png [--style style.jpg] [--seed N] --out out.png
    spade-synthesize --tiny --labels label.png --out out.png     # no checkpoint: a fresh tiny ADE20K model

The label PNG holds raw dataset label ids in one channel (ADE20K: 0..150, as in the
official annotations). The checkpoint is a spade-ray directory or an NVlabs one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_checkpoint
from .model import SpadeModel, build_model
from .config import GeneratorConfig, ModelConfig
from .preprocess import LABEL_MODES, to_uint8, to_unit_range
from .semantics import colorize
from .testing import randomize_weights


def read_label_png(path: str | Path) -> torch.Tensor:
    """A single-channel label PNG -> (1, H, W) int64 raw label ids."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise ValueError(
                    f"{path}: label maps must be single-channel raw label ids (mode L, P or I), got mode {img.mode}"
                )
            ids = np.array(img, dtype=np.int64)  # mode P: the palette indices are the ids
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc
    return torch.from_numpy(ids)[None]


def read_style_image(path: str | Path) -> torch.Tensor:
    """An RGB image -> (1, 3, H, W) float in [-1, 1]."""
    try:
        with Image.open(path) as img:
            rgb = np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc
    return to_unit_range(torch.from_numpy(rgb).permute(2, 0, 1)[None])


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())


def tiny_model(seed: int = 0) -> SpadeModel:
    """A small ADE20K model (ngf 16, 256x256, label-map input) with random, trained-like
    weights: untrained, it shows the label layout in flat colours, for trying the pipeline."""
    config = ModelConfig(generator=GeneratorConfig(ngf=16))
    # one label map per warm-up pass: half the start-up of two, the same flat-colour look
    return randomize_weights(build_model(config, discriminator=False, seed=seed), seed=seed, batch_size=1).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spade-synthesize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (spade-ray or NVlabs format)")
    source.add_argument("--tiny", action="store_true", help="use a freshly initialised tiny model (untrained)")
    parser.add_argument("--labels", required=True, help="single-channel PNG of raw label ids")
    parser.add_argument("--style", help="style image (VAE models): the output takes its look")
    parser.add_argument("--seed", type=int, help="seed for the style code (random without one)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--grid", action="store_true", help="write colourised labels | synthesized side by side")
    parser.add_argument("--bf16", action="store_true", help="fast path in bfloat16 (faster on CPUs with AMX, GPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        # the user's files first: a wrong one is reported before seconds of model loading
        labels = read_label_png(args.labels)
        style = read_style_image(args.style) if args.style else None
        model = tiny_model().to(args.device) if args.tiny else load_checkpoint(args.checkpoint, device=args.device)
        model.enable_fast_path(dtype=torch.bfloat16 if args.bf16 else torch.float32)
        image = model.synthesize(labels, style=style, seed=args.seed)[0]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = to_pil(image)
    if args.grid:
        h, w = image.shape[-2:]
        color = Image.fromarray(colorize(labels, model.classes)[0].permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
        grid = Image.new("RGB", (2 * w, h))
        grid.paste(color, (0, 0))
        grid.paste(out, (w, 0))
        out = grid
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    kind = "tiny untrained model" if args.tiny else args.checkpoint
    print(f"wrote {args.out} ({out.width}x{out.height}) from {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
