"""SPADE, the spatially-adaptive normalisation, and the switch to its fused training path
(synced batch norm: ``spade_core.syncbn``; spectral norm: ``spade_core.spectral``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .config import SpadeConfig
from .labelmap import LabelMap
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
    function and gradients, far less work). ``fuse_modulation`` computes gamma and beta
    with one conv of the concatenated weights (the ``1 +`` folded into gamma's bias);
    None (default) fuses exactly when given a LabelMap. Parameters and keys are the same
    either way.
    """

    def __init__(self, *, norm_nc: int, label_nc: int, config: SpadeConfig) -> None:
        super().__init__()
        ks, pw = config.kernel_size, config.kernel_size // 2
        self.param_free_norm = param_free_norm(config.norm, norm_nc)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, config.hidden, ks, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(config.hidden, norm_nc, ks, padding=pw)
        self.mlp_beta = nn.Conv2d(config.hidden, norm_nc, ks, padding=pw)
        self.fuse_modulation: bool | None = None

    def forward(self, x: torch.Tensor, semantics: torch.Tensor | LabelMap) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        if isinstance(semantics, LabelMap):
            shared = self.mlp_shared[0]
            actv = semantics.conv(shared.weight, shared.bias, size=tuple(x.shape[-2:]), relu=True)
            fuse = self.fuse_modulation is not False
        else:
            if semantics.shape[-2:] != x.shape[-2:]:
                semantics = F.interpolate(semantics, size=x.shape[-2:], mode="nearest")
            actv = self.mlp_shared(semantics)
            fuse = bool(self.fuse_modulation)
        if not fuse:
            return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)
        g, b = self.mlp_gamma, self.mlp_beta
        weight = torch.cat([g.weight, b.weight])
        bias = torch.cat([g.bias + 1, b.bias])
        return _Modulate.apply(normalized, F.conv2d(actv, weight, bias, padding=g.padding))


class _Modulate(torch.autograd.Function):
    """``x * gb[:, :C] + gb[:, C:]`` (gb: the fused conv's [1 + gamma, beta]), whose backward
    writes the gradient of ``gb`` straight into one tensor instead of two halves and a cat."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gamma1, beta = gb.chunk(2, dim=1)
        ctx.save_for_backward(x, gamma1)
        ctx.dtypes = (x.dtype, gb.dtype)
        return torch.addcmul(beta, x, gamma1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, gamma1 = ctx.saved_tensors
        x_dtype, gb_dtype = ctx.dtypes
        grad_x = grad_gb = None
        if ctx.needs_input_grad[1]:
            c = x.shape[1]
            shape = (x.shape[0], 2 * c, *x.shape[2:])
            fmt = torch.channels_last if grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            grad_gb = torch.empty(shape, dtype=gb_dtype, device=grad.device, memory_format=fmt)
            torch.mul(grad, x, out=grad_gb[:, :c])
            grad_gb[:, c:].copy_(grad)
        if ctx.needs_input_grad[0]:
            grad_x = (grad * gamma1).to(x_dtype)
        return grad_x, grad_gb


def set_fast_training(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every SPADE and spectral norm under ``module`` to its fused training computation (or back).

    Same function, parameters and state-dict keys; gradients agree to float rounding.
    On: SPADE fuses its gamma/beta convs also for dense label maps (LabelMap inputs always
    fuse unless ``fuse_modulation`` is False) and spectral norm takes its fused path. Off:
    the reference's computation (SPADE fuses only for LabelMap inputs). The gathers come
    from passing a :class:`~spade_core.labelmap.LabelMap` instead of the one-hot tensor.
    """
    for m in module.modules():
        if isinstance(m, SPADE):
            m.fuse_modulation = True if enabled else None
        elif isinstance(m, SpectralNorm):
            m.fused = enabled
    return module
