"""Training from scratch starts from the reference's initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

import spade_core
from spade_core.config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig


def test_xavier_normal_gain_002_and_zero_biases() -> None:
    config = ModelConfig(
        labels=LabelConfig(label_nc=20),
        generator=GeneratorConfig(ngf=16, crop_size=64, z_dim=32),
        encoder=EncoderConfig(ndf=16, z_dim=32, input_size=64),
        discriminator=DiscriminatorConfig(ndf=16, norm="batch"),
    )
    model = spade_core.build_model(config, seed=0)
    convs = 0
    for net in (model.generator, model.encoder, model.discriminator):
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # spectral-normed layers too: the reference's init reaches weight_orig
                w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
                fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
                expected = 0.02 * math.sqrt(2.0 / (fan_in + fan_out))
                if w.numel() > 2000:
                    assert abs(float(w.detach().std()) / expected - 1) < 0.1, name
                if m.bias is not None:
                    assert torch.count_nonzero(m.bias) == 0, name
                convs += 1
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                assert abs(float(m.weight.detach().mean()) - 1) < 0.02 and float(m.weight.detach().std()) < 0.05, name
                assert torch.count_nonzero(m.bias) == 0
    assert convs > 50


def test_same_seed_same_weights() -> None:
    config = ModelConfig(labels=LabelConfig(label_nc=5), generator=GeneratorConfig(ngf=8, crop_size=64))
    a = spade_core.build_model(config, seed=3).state_dict()
    b = spade_core.build_model(config, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
