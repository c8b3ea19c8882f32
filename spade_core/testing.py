"""Helpers for tests and benchmarks: weights that behave like a trained model's.

A freshly initialised SPADE generator (xavier, gain 0.02) has near-zero SPADE modulation
and identity batch-norm statistics, which makes a poor stand-in when comparing numerics.
This mirrors how the reference fixture was made: N(0, 1/fan_in) weights, N(0, 0.1) biases,
then a few forward passes in training mode to fill batch-norm and spectral-norm state.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .model import SpadeModel
from .semantics import one_hot


@torch.no_grad()
def randomize_weights(model: SpadeModel, *, seed: int = 0, warmup_batches: int = 3, batch_size: int = 2) -> SpadeModel:
    gen = torch.Generator().manual_seed(seed)
    for net in (model.generator, model.encoder, model.discriminator):
        if net is None:
            continue
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    was_training = model.training
    model.train()
    cfg = model.config
    h, w = cfg.generator.output_size
    for _ in range(warmup_batches):
        labels = torch.randint(0, cfg.labels.num_label_channels, (batch_size, h // 8, w // 8), generator=gen)
        labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky, like real label maps
        semantics = one_hot(labels, cfg.labels.num_label_channels)
        if cfg.labels.instance_edges:
            semantics = torch.cat([semantics, torch.zeros_like(semantics[:, :1])], dim=1)
        z = torch.randn(batch_size, cfg.generator.z_dim, generator=gen) if cfg.generator.z_dim else None
        model.generator(semantics, z=z)
        if model.encoder is not None:
            model.encoder(torch.rand(batch_size, 3, h, w, generator=gen) * 2 - 1)
    model.train(was_training)
    return model


def random_inception_state(
    seed: int = 0, *, layout: dict[str, tuple[int, ...]] | None = None, calibrate: bool = True
) -> dict[str, torch.Tensor]:
    """Random weights in pytorch-fid's Inception layout (load with ``allow_any_inception``).

    He-scaled convs and batch-norm statistics near 1. ``layout`` (key -> shape) defaults to
    :class:`~spade_core.metrics.inception.FIDInceptionV3`'s own; tests pass the layout written
    from pytorch-fid's published structure instead. ``calibrate`` (own layout only): the
    batch-norm statistics are then measured on one batch of random images, as trained
    weights' are on their data, so that every layer's output stays near unit scale and the
    pool features are O(1): FID and KID then respond to the images instead of to a few
    exploding channels (uncalibrated, 94 random layers give FIDs in the thousands).
    """
    own = layout is None
    if layout is None:
        from .metrics.inception import FIDInceptionV3

        layout = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    if own and calibrate:
        state = _calibrated(state, g)
    return state


@torch.no_grad()
def _calibrated(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    from .metrics.inception import FIDInceptionV3

    model = FIDInceptionV3()
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the batch's own statistics
    # smooth, blocky (sharp edges) and noisy images: statistics that cover what is scored, so
    # that no kind of image is amplified layer after layer (calibrated on smooth images alone,
    # a noisy image's features come out ~100x larger)
    up = functools.partial(torch.nn.functional.interpolate, size=(299, 299), mode="bilinear", align_corners=False)
    coarse = torch.rand(16, 3, 12, 12, generator=g)
    smooth = up(coarse[:4])
    blocky = torch.nn.functional.interpolate(coarse[4:8], size=(299, 299), mode="nearest")
    noisy = (up(coarse[8:12]) + 0.25 * torch.randn(4, 3, 299, 299, generator=g)).clamp(0, 1)
    # flat regions of saturated colours, as an untrained generator draws them
    saturated = torch.nn.functional.interpolate((coarse[12:] > 0.5).float(), size=(299, 299), mode="nearest")
    model.train()(torch.cat([smooth, blocky, noisy, saturated]))
    return {k: v.clone() for k, v in model.state_dict().items()}
