"""How far fp32 rounding alone moves a training step's generator gradients, against the fast path's error.

    python bench/grad_conditioning.py [--preset tiny.yaml] [--seeds 0 1 2]

For each seed, one generator step of the preset's networks (the training init, VGG off)
in float64 is the reference. Printed, each as the relative error of all generator
gradients against it:
  plain fp32      the reference's computation in fp32
  fast fp32       the trainable fast path (LabelMap gathers, fused SPADE and spectral norm,
                  channels_last) in fp32
  float64, nudged the reference's computation in float64 with every weight multiplied by
                  (1 + 6e-8 * noise): fp32-sized rounding of the inputs, exact arithmetic after
The three are fp32-sized perturbations of one step. Most seeds they agree with float64 to
~1e-6; on some seeds one of them (any of the three, the nudged exact computation too) lands
1e-4 to 1e-3 away: an activation within rounding of a ReLU / leaky-ReLU kink crosses it
(batch norm over a few values widens that margin). No fp32 implementation can avoid such
points, which is why bench/gpu_check.py's gradient check has a floor (GRAD_FLOOR).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import spade_core  # noqa: E402
from gpu_check import random_images, random_labels, relative_error  # noqa: E402
from spade_core.losses import LossConfig  # noqa: E402
from spade_core.norms import set_fast_training  # noqa: E402
from train_job.config import load_train_config  # noqa: E402
from train_job.steps import Networks, generator_losses, semantics_of  # noqa: E402

NUDGE = 6e-8  # about half of fp32's unit roundoff


def generator_gradients(base: spade_core.SpadeModel, batch: dict, variant: str, *, seed: int) -> torch.Tensor:
    """All generator gradients of one generator step, concatenated in parameter order."""
    model = copy.deepcopy(base)
    image = batch["image"]
    if variant in ("float64", "nudged"):
        model, image = model.double(), image.double()
    if variant == "nudged":
        noise = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + NUDGE * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    if variant == "fast":
        set_fast_training(model)
        model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    semantics = semantics_of(batch, model.config.labels, as_label_map=variant == "fast")
    if variant != "fast":
        semantics = semantics.to(image.dtype)
    torch.manual_seed(seed)
    terms, _ = generator_losses(Networks(model.generator, model.discriminator), semantics, image,
                                loss=LossConfig(use_vgg_loss=False), vgg=None)
    sum(terms.values()).backward()
    return torch.cat([p.grad.double().reshape(-1) for p in model.generator.parameters() if p.grad is not None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny.yaml", help="a training preset under cluster/configs/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    config = load_train_config(REPO / "cluster" / "configs" / args.preset).model
    print(f"{args.preset}: ngf {config.generator.ngf}, {config.generator.output_size}, batch {args.batch}; "
          "relative error of all generator gradients vs float64")
    print(f"{'seed':>4}  {'plain fp32':>10}  {'fast fp32':>10}  {'float64, nudged':>15}")
    for seed in args.seeds:
        base = spade_core.build_model(config, seed=seed).train()
        batch = {"label": random_labels(config, args.batch, seed), "image": random_images(config, args.batch, seed + 1)}
        exact = generator_gradients(base, batch, "float64", seed=seed)
        errors = [relative_error(generator_gradients(base, batch, v, seed=seed), exact) for v in ("plain", "fast", "nudged")]
        print(f"{seed:>4}  {errors[0]:10.1e}  {errors[1]:10.1e}  {errors[2]:15.1e}", flush=True)


if __name__ == "__main__":
    main()
