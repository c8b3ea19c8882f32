"""SPADE generator: label map (one-hot, or a LabelMap of channel ids) -> image in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SPADEResnetBlock, leaky
from .config import GeneratorConfig
from .labelmap import Semantics, as_semantics


class SPADEGenerator(nn.Module):
    """fc -> 7 SPADE residual blocks with 2x nearest upsampling between them -> conv -> tanh.

    ``num_upsampling_layers`` adds an upsampling after ``G_middle_0`` ("more") and a last
    block ``up_4`` ("most"). With ``z_dim`` set, ``fc`` is a Linear from the style code;
    otherwise a 3x3 conv on the label map downsampled to the initial grid.
    """

    def __init__(self, config: GeneratorConfig, *, semantic_nc: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.semantic_nc = semantic_nc
        nf = config.ngf
        self.sh, self.sw = config.initial_size
        if config.z_dim is not None:
            self.fc = nn.Linear(config.z_dim, 16 * nf * self.sh * self.sw)
        else:
            self.fc = nn.Conv2d(semantic_nc, 16 * nf, 3, padding=1)

        def block(fin: int, fout: int) -> SPADEResnetBlock:
            return SPADEResnetBlock(
                fin=fin, fout=fout, label_nc=semantic_nc, spade=config.spade, spectral_norm=config.spectral_norm
            )

        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, 1 * nf)
        final_nc = nf
        if config.num_upsampling_layers == "most":
            self.up_4 = block(nf, nf // 2)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)

    def forward(self, semantics: torch.Tensor | Semantics, z: torch.Tensor | None = None) -> torch.Tensor:
        """``semantics``: (B, semantic_nc, H, W) float one-hot (+ edges), or the equivalent
        :class:`~spade_core.labelmap.LabelMap` (label convs as gathers; same function and
        gradients); ``z``: (B, z_dim) for VAE models. How each SPADE computes is its
        processor's (:mod:`spade_core.processors`), not this graph's."""
        semantics = as_semantics(semantics)
        if semantics.semantic_nc != self.semantic_nc:
            raise ValueError(f"the label map has {semantics.semantic_nc} channels, the generator takes {self.semantic_nc}")
        if self.config.z_dim is not None:
            if z is None:
                raise ValueError("this generator takes a style code: pass z of shape (B, z_dim)")
            x = self.fc(z).view(-1, 16 * self.config.ngf, self.sh, self.sw)
            x = x.contiguous(memory_format=semantics.memory_format)
        else:
            x = semantics.apply_conv(self.fc, size=(self.sh, self.sw))
        for name, upsample_first in self.schedule():
            if upsample_first:
                x = upsample(x)
            x = getattr(self, name)(x, semantics)
        return torch.tanh(self.conv_img(leaky(x)))

    def schedule(self) -> list[tuple[str, bool]]:
        """The residual blocks in forward order, each with whether a 2x upsampling precedes
        it: the one statement of the network's shape, which the fast path follows too."""
        more = self.config.num_upsampling_layers in ("more", "most")
        ups = ["up_0", "up_1", "up_2", "up_3"] + (["up_4"] if self.config.num_upsampling_layers == "most" else [])
        return [("head_0", False), ("G_middle_0", True), ("G_middle_1", more)] + [(name, True) for name in ups]


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
