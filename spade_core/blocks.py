"""Building blocks shared by the networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SpadeConfig
from .labelmap import Semantics
from .norms import SPADE
from .spectral import spectral


class SPADEResnetBlock(nn.Module):
    """Two SPADE -> leaky ReLU -> 3x3 conv stages plus a shortcut (learned 1x1 when channels change)."""

    def __init__(self, *, fin: int, fout: int, label_nc: int, spade: SpadeConfig, spectral_norm: bool) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral(nn.Conv2d(fin, fmiddle, 3, padding=1), spectral_norm)
        self.conv_1 = spectral(nn.Conv2d(fmiddle, fout, 3, padding=1), spectral_norm)
        self.norm_0 = SPADE(norm_nc=fin, label_nc=label_nc, config=spade)
        self.norm_1 = SPADE(norm_nc=fmiddle, label_nc=label_nc, config=spade)
        if self.learned_shortcut:
            self.conv_s = spectral(nn.Conv2d(fin, fout, 1, bias=False), spectral_norm)
            self.norm_s = SPADE(norm_nc=fin, label_nc=label_nc, config=spade)

    def forward(self, x: torch.Tensor, semantics: torch.Tensor | Semantics) -> torch.Tensor:
        """``semantics``: the dense one-hot label map, or either kind of :mod:`spade_core.labelmap` input."""
        x_s = self.conv_s(self.norm_s(x, semantics)) if self.learned_shortcut else x
        dx = self.conv_0(leaky(self.norm_0(x, semantics)))
        dx = self.conv_1(leaky(self.norm_1(dx, semantics)))
        return x_s + dx


def leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def conv_norm(conv: nn.Conv2d, *, norm: str, spectral_norm: bool) -> nn.Module:
    """A conv followed by a non-SPADE norm, laid out like the reference's ``get_nonspade_norm_layer``.

    With a norm the conv loses its bias (a norm cancels it) and both sit in a Sequential
    (keys ``0.weight...``); without one the conv is returned alone.
    """
    conv = spectral(conv, spectral_norm)
    if norm == "none":
        return conv
    conv.bias = None  # a following norm cancels any bias; the reference drops it too
    if norm == "instance":
        layer = nn.InstanceNorm2d(conv.out_channels, affine=False)
    elif norm == "batch":
        layer = nn.BatchNorm2d(conv.out_channels, affine=True)
    else:
        raise ValueError(f"unknown norm {norm!r}; expected 'instance', 'batch' or 'none'")
    return nn.Sequential(conv, layer)
