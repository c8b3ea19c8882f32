"""SPADE, the spatially-adaptive normalisation, and the switch to its fused training path
(synced batch norm: ``spade_core.syncbn``; spectral norm: ``spade_core.spectral``)."""

from __future__ import annotations

import torch
from torch import nn

from .config import SpadeConfig
from .labelmap import Semantics, as_semantics
from .processors import FusedProcessor, ReferenceProcessor
from .spectral import SpectralNorm


def param_free_norm(kind: str, num_features: int) -> nn.Module:
    """A normalisation without learned affine parameters."""
    if kind == "instance":
        return nn.InstanceNorm2d(num_features, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(num_features, affine=False)
    raise ValueError(f"unknown parameter-free norm {kind!r}; expected 'instance' or 'batch'")


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x) * (1 + gamma(semantics)) + beta(semantics)``.

    ``gamma`` and ``beta`` come from a shared conv on the label map resized (nearest)
    to the feature size. Module names follow the reference so its weights load as-is.

    ``semantics`` is the dense one-hot tensor (the reference's computation) or a
    :class:`~spade_core.labelmap.LabelMap`, whose shared conv runs as a gather (same
    function and gradients, far less work). How the layer computes is its ``processor``'s
    (:mod:`spade_core.processors`; swap with :meth:`set_processor`); parameters and keys
    are the same whichever computes.
    """

    def __init__(self, *, norm_nc: int, label_nc: int, config: SpadeConfig) -> None:
        super().__init__()
        ks, pw = config.kernel_size, config.kernel_size // 2
        self.param_free_norm = param_free_norm(config.norm, norm_nc)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, config.hidden, ks, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(config.hidden, norm_nc, ks, padding=pw)
        self.mlp_beta = nn.Conv2d(config.hidden, norm_nc, ks, padding=pw)
        self.processor: nn.Module = ReferenceProcessor()

    def set_processor(self, processor: nn.Module) -> None:
        """Compute this layer with ``processor`` from now on (see :mod:`spade_core.processors`)."""
        self.processor = processor

    def forward(self, x: torch.Tensor, semantics: torch.Tensor | Semantics) -> torch.Tensor:
        return self.processor(self, x, as_semantics(semantics))


def set_fast_training(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every SPADE and spectral norm under ``module`` to its fused training computation (or back).

    Same function, parameters and state-dict keys; gradients agree to float rounding.
    On: every SPADE computes with :class:`~spade_core.processors.FusedProcessor` and spectral
    norm takes its fused path. Off: the reference's computation. The gathers come from
    passing a :class:`~spade_core.labelmap.LabelMap` instead of the one-hot tensor.
    """
    for m in list(module.modules()):
        if isinstance(m, SPADE):
            m.set_processor(FusedProcessor() if enabled else ReferenceProcessor())
        elif isinstance(m, SpectralNorm):
            m.fused = enabled
    return module
