"""Generator inference speed at the ADE20K config: plain eager fp32 vs spade_core's fast path.

    python bench/generator.py [--batch-sizes 1 8] [--no-compile] [--ngf 64]

Prints, measured in this one run on this machine: images/s and achieved GFLOP/s (the
reference's 362 GFLOP per 256x256 image divided by the time) for
  plain fp32   the reference's computation: dense one-hot, spectral norm, NCHW, eager
  fast fp32    spade_core.fast eager, and compiled (torch.compile, inductor freezing)
  fast bf16    the same in bfloat16
with the accuracy of each path against plain, and the machine's 3x3-conv peak (fp32,
bf16) for scale. Weights are random but statistically like a trained model's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import spade_core
from spade_core.config import GeneratorConfig, ModelConfig
from spade_core.fast import FastGenerator
from spade_core.semantics import label_channels, one_hot
from spade_core.testing import randomize_weights

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples/ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png"


def timed(fn, *, min_iters: int, min_seconds: float) -> float:
    """Seconds per call: one warm-up call, then the best of repeated calls."""
    fn()
    best, total, n = float("inf"), 0.0, 0
    while n < min_iters or total < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def generator_flops(model: spade_core.SpadeModel, semantics: torch.Tensor) -> float:
    """FLOPs (2 x MACs) of every conv and linear layer of the plain generator for one image."""
    flops = 0.0

    def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal flops
        w = mod.weight
        per_out = w[0].numel()
        flops += 2.0 * per_out * out.numel() / out.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.generator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model.generator(semantics[:1])
    for h in handles:
        h.remove()
    return flops


def conv_peak(dtype: torch.dtype) -> float:
    """Best GFLOP/s over a few 3x3 conv shapes typical of the generator (channels_last)."""
    best = 0.0
    for cin, cout, hw in [(128, 128, 128), (128, 256, 128), (256, 256, 64)]:
        x = torch.randn(1, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            dt = timed(lambda: F.conv2d(x, w, padding=1), min_iters=5, min_seconds=0.5)
        best = max(best, 2 * cin * cout * 9 * hw * hw / dt / 1e9)
    return best


def sample_labels(batch: int, size: int) -> torch.Tensor:
    base = np.array(Image.open(SAMPLE).resize((size, size), Image.NEAREST))
    maps = [np.roll(base if i % 2 == 0 else base[:, ::-1], 16 * i, axis=1) for i in range(batch)]
    return torch.from_numpy(np.stack(maps)).long()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean().clamp_min(1e-20)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (each compiles ~1 min)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time each variant at least this long")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = ModelConfig(generator=GeneratorConfig(ngf=args.ngf))
    model = randomize_weights(spade_core.build_model(config, discriminator=False)).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ADE20K config ngf={args.ngf}, 256x256, no VAE")
    peak32, peak16 = conv_peak(torch.float32), conv_peak(torch.bfloat16)
    print(f"machine 3x3-conv peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s ({peak16 / peak32:.1f}x)")

    variants = [("fast fp32", torch.float32, False), ("fast bf16", torch.bfloat16, False)]
    if not args.no_compile:
        variants += [("fast fp32 compiled", torch.float32, True), ("fast bf16 compiled", torch.bfloat16, True)]
    results: dict[tuple[str, int], float] = {}
    for batch in args.batch_sizes:
        labels = sample_labels(batch, 256)
        channels = label_channels(labels, config.labels)
        semantics = one_hot(channels, config.labels.num_label_channels)
        flops = generator_flops(model, semantics)
        with torch.inference_mode():
            reference = model.generator(semantics)
            plain_s = timed(lambda: model.generator(semantics), min_iters=2, min_seconds=args.min_seconds)
        results[("plain fp32", batch)] = batch / plain_s
        print(f"\nbatch {batch}: {flops / 1e9:.1f} GFLOP per image (reference computation)")
        print(f"  {'plain fp32':20s} {batch / plain_s:7.2f} img/s  {flops * batch / plain_s / 1e9:6.0f} GFLOP/s   1.00x")
        for name, dtype, compiled in variants:
            t0 = time.perf_counter()
            fast = FastGenerator(model.generator, label_config=config.labels, dtype=dtype, compile=compiled)
            out = fast(channels)  # compiles here when asked
            setup = time.perf_counter() - t0
            secs = timed(lambda: fast(channels), min_iters=3, min_seconds=args.min_seconds)
            results[(name, batch)] = batch / secs
            err = (
                f"max|diff| {float((out - reference).abs().max()):.1e}"
                if dtype == torch.float32
                else f"PSNR {psnr(out, reference):.1f} dB"
            )
            print(
                f"  {name:20s} {batch / secs:7.2f} img/s  {flops * batch / secs / 1e9:6.0f} GFLOP/s  "
                f"{plain_s / secs:5.2f}x   {err} vs plain; first call {setup:.0f} s"
            )

    print("\ntargets at batch 1: fast bf16 >= 8x plain fp32, fast fp32 >= 1.3x")
    for name, _, _ in variants:
        if (name, 1) in results:
            ratio = results[(name, 1)] / results[("plain fp32", 1)]
            target = 8.0 if "bf16" in name else 1.3
            print(f"  {name:20s} {ratio:5.2f}x  {'meets' if ratio >= target else 'BELOW'} {target}x")


if __name__ == "__main__":
    main()
