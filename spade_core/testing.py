"""Helpers for tests and benchmarks: weights that behave like a trained model's.

A freshly initialised SPADE generator (xavier, gain 0.02) has near-zero SPADE modulation
and identity batch-norm statistics, which makes a poor stand-in when comparing numerics.
This mirrors how the reference fixture was made: N(0, 1/fan_in) weights, N(0, 0.1) biases,
then a few forward passes in training mode to fill batch-norm and spectral-norm state.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import SpadeModel
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
        seg = one_hot(labels, cfg.labels.num_label_channels)
        if cfg.labels.instance_edges:
            seg = torch.cat([seg, torch.zeros_like(seg[:, :1])], dim=1)
        z = torch.randn(batch_size, cfg.generator.z_dim, generator=gen) if cfg.generator.z_dim else None
        model.generator(seg, z=z)
        if model.encoder is not None:
            model.encoder(torch.rand(batch_size, 3, h, w, generator=gen) * 2 - 1)
    model.train(was_training)
    return model
