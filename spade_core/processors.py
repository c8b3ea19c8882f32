"""How a SPADE layer computes: swappable processors on one module graph.

A :class:`~spade_core.norms.SPADE` holds its parameters (the reference's keys) and hands the
computation to its ``processor``, the way diffusers' attention layers do
(``set_attn_processor``). Every processor computes ``norm(x) * (1 + gamma) + beta`` with
gamma and beta convs of the shared hidden map ``relu(conv(semantics))``; they differ in how:

- :class:`ReferenceProcessor` (the default): separate gamma and beta convs, as the reference.
- :class:`FusedProcessor` (training's fast path, :func:`spade_core.norms.set_fast_training`):
  one conv of the concatenated weights with the ``1 +`` in its bias, and a backward that
  writes the gradient of both halves into one tensor. Same function and gradients.
- :class:`FoldedProcessor` (inference only, :mod:`spade_core.fast`): frozen weights built
  once: the shared conv as a table of weight columns gathered by label id, gamma / beta
  fused, and batch norm's running statistics folded in, so the layer is ``x * A + B``.

Processors are modules without parameters of their own (the folded one keeps its frozen
tensors as non-persistent buffers), so swapping them never changes a state dict.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .gather import conv_table
from .labelmap import LabelMap, Semantics


class SPADE(Protocol):
    """What a processor reads of its layer (:class:`spade_core.norms.SPADE`'s modules, the reference's names)."""

    param_free_norm: nn.Module
    mlp_shared: nn.Sequential
    mlp_gamma: nn.Conv2d
    mlp_beta: nn.Conv2d


class ReferenceProcessor(nn.Module):
    """The reference's computation: ``norm(x) * (1 + gamma(h)) + beta(h)``, ``h = relu(shared(semantics))``."""

    def forward(self, spade: SPADE, x: torch.Tensor, semantics: Semantics) -> torch.Tensor:  # type: ignore[override]
        normalized = spade.param_free_norm(x)
        hidden = semantics.apply_conv(spade.mlp_shared[0], size=x.shape[-2:], relu=True)
        return normalized * (1 + spade.mlp_gamma(hidden)) + spade.mlp_beta(hidden)


class FusedProcessor(nn.Module):
    """gamma and beta as one conv of the concatenated weights (``1 +`` folded into gamma's bias)."""

    def forward(self, spade: SPADE, x: torch.Tensor, semantics: Semantics) -> torch.Tensor:  # type: ignore[override]
        normalized = spade.param_free_norm(x)
        hidden = semantics.apply_conv(spade.mlp_shared[0], size=x.shape[-2:], relu=True)
        g, b = spade.mlp_gamma, spade.mlp_beta
        weight = torch.cat([g.weight, b.weight])
        bias = torch.cat([g.bias + 1, b.bias])
        return _Modulate.apply(normalized, F.conv2d(hidden, weight, bias, padding=g.padding))


class FoldedProcessor(nn.Module):
    """Inference only: ``norm(x) * A + B`` with [A, B] one frozen conv of the gathered hidden map.

    Built from a SPADE's weights as they are now (later changes to them are not seen). With
    batch norm (eval mode) ``norm(x) = x * s + t`` is folded into the conv, so no norm runs.
    Takes a :class:`~spade_core.labelmap.LabelMap`.
    """

    def __init__(self, spade: SPADE, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.shared = GatherConv(spade.mlp_shared[0], dtype=dtype)
        wg, bg = spade.mlp_gamma.weight.detach().float(), spade.mlp_gamma.bias.detach().float() + 1
        wb, bb = spade.mlp_beta.weight.detach().float(), spade.mlp_beta.bias.detach().float()
        norm = spade.param_free_norm
        self.instance_norm = isinstance(norm, nn.InstanceNorm2d)
        if not self.instance_norm:
            # batch norm in eval: norm(x) = x * s + t, so x*s*(1+g) + t*(1+g) + b = x*A + B
            s = torch.rsqrt(norm.running_var.float() + norm.eps)
            t = -norm.running_mean.float() * s
            wg, bg, wb, bb = wg * s.view(-1, 1, 1, 1), bg * s, wg * t.view(-1, 1, 1, 1) + wb, bg * t + bb
        self.eps = norm.eps
        self.modulation_padding = spade.mlp_gamma.padding
        weight = torch.cat([wg, wb]).to(dtype).contiguous(memory_format=torch.channels_last)
        self.register_buffer("modulation_weight", weight, persistent=False)
        self.register_buffer("modulation_bias", torch.cat([bg, bb]).to(dtype), persistent=False)

    def forward(self, spade: SPADE, x: torch.Tensor, semantics: Semantics) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(semantics, LabelMap):
            raise TypeError("a folded (inference) SPADE reads a LabelMap; dense one-hot input takes the reference processor")
        hidden = F.relu(self.shared(semantics, size=x.shape[-2:])).contiguous(memory_format=torch.channels_last)
        a, beta = F.conv2d(hidden, self.modulation_weight, self.modulation_bias, padding=self.modulation_padding).chunk(2, dim=1)
        if self.instance_norm:
            x = F.instance_norm(x, eps=self.eps)
        return torch.addcmul(beta, x, a)


class GatherConv(nn.Module):
    """A frozen kxk conv (stride 1, zero padding k // 2) of a label map, as one ``embedding_bag``
    over a table of its weight columns (:func:`~spade_core.gather.conv_table`) built once."""

    def __init__(self, conv: nn.Conv2d, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        weight = conv.weight.detach().float()  # (C_out, C_in, k, k)
        self.in_channels, self.kernel_size = weight.shape[1], weight.shape[2]
        self.register_buffer("table", conv_table(weight).to(dtype), persistent=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        self.register_buffer("bias", bias.float().to(dtype), persistent=False)

    def forward(self, semantics: LabelMap, *, size: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        """(B, C_out, *size) channels_last: the conv of ``semantics`` resized (nearest) to ``size``."""
        if semantics.semantic_nc != self.in_channels:
            raise ValueError(f"the label map has {semantics.semantic_nc} channels, the conv takes {self.in_channels}")
        k = self.kernel_size
        plan = semantics.plan(size=(int(size[0]), int(size[1])), kernel_size=k, stride=1, padding=k // 2)
        out = F.embedding_bag(plan.indices, self.table, mode="sum") + self.bias
        return out.view(*plan.out_shape, -1).permute(0, 3, 1, 2)


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
