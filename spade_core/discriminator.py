"""Multiscale PatchGAN discriminator."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_norm
from .config import DiscriminatorConfig
from .labelmap import Semantics, as_semantics, downsample


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

    def forward(self, x: torch.Tensor, semantics: Semantics | None = None, *, pool_levels: int = 0) -> list[torch.Tensor]:
        """``x``: the dense input; or, with ``semantics``, only the image channels (k * B images, the
        B label maps repeated k times), the label channels' part of the first conv then being
        a gather of ``semantics`` average-pooled ``pool_levels`` times (see :class:`MultiscaleDiscriminator`)."""
        features = []
        layers = list(self.children())
        if semantics is not None:
            x = self._first_layer(layers[0], x, semantics, pool_levels)
            features.append(x)
            layers = layers[1:]
        for layer in layers:
            x = layer(x)
            features.append(x)
        return features

    @staticmethod
    def _first_layer(layer: nn.Sequential, images: torch.Tensor, semantics: Semantics, pool_levels: int) -> torch.Tensor:
        conv, act = layer[0], layer[1]
        c_lab = semantics.semantic_nc
        if conv.weight.shape[1] != c_lab + images.shape[1]:
            raise ValueError(
                f"the discriminator takes {conv.weight.shape[1]} input channels; got {c_lab} label + {images.shape[1]} image channels"
            )
        reps, rem = divmod(images.shape[0], semantics.batch_size)
        if rem or reps == 0:
            raise ValueError(f"{images.shape[0]} images do not repeat {semantics.batch_size} label maps a whole number of times")
        return act(semantics.conv_with_images(conv, images, pool_levels=pool_levels))


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

    def forward(self, x: torch.Tensor, semantics: torch.Tensor | Semantics | None = None) -> list[list[torch.Tensor]]:
        """``x``: the dense one-hot label map concatenated with the images (the reference's input).

        Or ``x`` only the images, (k * B, image_nc, H, W), and ``semantics`` B label maps
        (dense, or a :class:`~spade_core.labelmap.LabelMap`) that stand for the label channels
        of every B images in turn (e.g. fakes then reals, k = 2). Dense maps are concatenated
        (the reference's computation); a LabelMap's part of each scale's first conv is a
        gather, once per label map. Same function and gradients.
        """
        semantics = None if semantics is None else as_semantics(semantics)
        results = []
        for i, disc in enumerate(self.children()):
            if i > 0:
                x = downsample(x)
            results.append(disc(x) if semantics is None else disc(x, semantics, pool_levels=i))
        return results
