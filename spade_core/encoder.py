"""VAE style encoder: image -> (mu, logvar)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_norm, leaky
from .config import EncoderConfig


class ConvEncoder(nn.Module):
    """Stride-2 3x3 convs from ``input_size`` down to 4x4, then ``fc_mu`` and ``fc_var``.

    The image is resized (bilinear) to ``input_size`` first, as the reference does with 256.
    The reference ties its sixth conv to ``crop_size >= 256`` and so crashes for smaller
    crops; here the conv count follows ``input_size``, so every crop size works and the
    default (256, six convs ``layer1..layer6``) has the reference's keys.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ndf = config.ndf
        channels = [3] + [ndf * min(2**i, 8) for i in range(config.num_layers)]
        for i in range(config.num_layers):
            conv = nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1)
            self.add_module(f"layer{i + 1}", conv_norm(conv, norm=config.norm, spectral_norm=config.spectral_norm))
        flat = channels[-1] * 4 * 4
        self.fc_mu = nn.Linear(flat, config.z_dim)
        self.fc_var = nn.Linear(flat, config.z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        for i in range(self.config.num_layers):
            x = getattr(self, f"layer{i + 1}")(x if i == 0 else leaky(x))
        x = leaky(x).flatten(1)
        return self.fc_mu(x), self.fc_var(x)
