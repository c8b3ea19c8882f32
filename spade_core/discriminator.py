"""Multiscale PatchGAN discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_norm
from .config import DiscriminatorConfig


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs (stride 2 except the last two), leaky ReLU; every layer's output is returned."""

    def __init__(self, config: DiscriminatorConfig, *, input_nc: int) -> None:
        super().__init__()
        nf = config.ndf
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(input_nc, nf, 4, stride=2, padding=2), nn.LeakyReLU(0.2))]
        for n in range(1, config.n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == config.n_layers - 1 else 2
            conv = nn.Conv2d(nf_prev, nf, 4, stride=stride, padding=2)
            layers.append(
                nn.Sequential(conv_norm(conv, norm=config.norm, spectral_norm=config.spectral_norm), nn.LeakyReLU(0.2))
            )
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, 4, stride=1, padding=2)))
        for i, layer in enumerate(layers):
            self.add_module(f"model{i}", layer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.children():
            x = layer(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """``num_D`` PatchGANs on the input at full, half, quarter... resolution (3x3 average pooling between).

    Input: one-hot label map concatenated with an image. Output: for each scale, the list of
    every layer's output; the last one is the patch prediction, the others feed feature matching.
    """

    def __init__(self, config: DiscriminatorConfig, *, semantic_nc: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        for i in range(config.num_D):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(config, input_nc=semantic_nc + config.image_nc))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        results = []
        for i, disc in enumerate(self.children()):
            if i > 0:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            results.append(disc(x))
        return results
