"""Normalisation layers: SPADE, synced batch norm, spectral-norm helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from .config import SpadeConfig
from .labelmap import LabelMap


def param_free_norm(kind: str, num_features: int) -> nn.Module:
    """A normalisation without learned affine parameters."""
    if kind == "instance":
        return nn.InstanceNorm2d(num_features, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(num_features, affine=False)
    raise ValueError(f"unknown parameter-free norm {kind!r}; expected 'instance' or 'batch'")


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x) * (1 + gamma(seg)) + beta(seg)``.

    ``gamma`` and ``beta`` come from a shared conv on the label map resized (nearest)
    to the feature size. Module names follow the reference so its weights load as-is.

    ``segmap`` is the dense one-hot tensor (the reference's computation) or a
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

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | LabelMap) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        if isinstance(segmap, LabelMap):
            shared = self.mlp_shared[0]
            actv = segmap.conv(shared.weight, shared.bias, size=tuple(x.shape[-2:]), relu=True)
            fuse = self.fuse_modulation is not False
        else:
            if segmap.shape[-2:] != x.shape[-2:]:
                segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
            actv = self.mlp_shared(segmap)
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


def spectral(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Spectral norm on ``module.weight`` (torch's parametrisation and keys), or the module itself.

    The parametrisation is :class:`SpectralNorm`: torch's, plus an opt-in fused path
    (:func:`set_fast_training`).
    """
    if not enabled:
        return module
    weight = module.weight
    dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, "weight", SpectralNorm(weight, 1, dim, 1e-12))
    return module


class SpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrisation (same buffers, keys and initial state), with an opt-in fused path.

    With ``fused`` set (see :func:`set_fast_training`) the forward is the same function with
    less memory traffic: sigma comes out of the power iteration (``|W^T u|``, which equals
    torch's ``u^T W v`` after it), the weight is scaled straight into the autocast dtype,
    and the backward is ``G / sigma - <G, W> / sigma^2 * u v^T`` in two passes over the
    weight instead of about seven. It works on channels_last weights in place.
    """

    fused: bool = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fused or weight.ndim < 2 or self.dim != 0:
            return super().forward(weight)
        mat, channels_last = _weight_matrix(weight)
        with torch.no_grad():
            v = _to_memory_order(self._v, weight) if channels_last else self._v
            if self.training:
                u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
                wtu = torch.mv(mat.t(), u)
                sigma = torch.linalg.vector_norm(wtu)
                v = wtu / sigma.clamp_min(self.eps)
                sigma = sigma * (sigma / sigma.clamp_min(self.eps))  # torch's u^T W v, also when |W^T u| < eps
                self._u.copy_(u)
                self._v.copy_(_from_memory_order(v, weight) if channels_last else v)
            else:
                u = self._u
                sigma = torch.vdot(u, torch.mv(mat, v))
        device_type = weight.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return _SpectralScale.apply(weight, u.clone(), v.clone(), sigma, out_dtype)


def _weight_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(C_out, rest) matrix view of a weight in its memory order; True when that order is channels_last's."""
    if weight.is_contiguous():
        return weight.view(weight.shape[0], -1), False
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), True
    return weight.reshape(weight.shape[0], -1), False


def _to_memory_order(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A vector over (C_in, kh, kw) reordered to channels_last's (kh, kw, C_in)."""
    _, c_in, kh, kw = weight.shape
    return v.view(c_in, kh, kw).permute(1, 2, 0).reshape(-1)


def _from_memory_order(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _, c_in, kh, kw = weight.shape
    return v.view(kh, kw, c_in).permute(2, 0, 1).reshape(-1)


class _SpectralScale(torch.autograd.Function):
    """``weight / sigma`` with sigma = u^T W v for fixed u, v (cast to ``out_dtype``), and its two-pass backward."""

    @staticmethod
    def forward(ctx, weight, u, v, sigma, out_dtype):  # type: ignore[override]
        ctx.save_for_backward(weight, u, v, sigma)
        fmt = torch.channels_last if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
            memory_format=torch.channels_last
        ) else torch.contiguous_format
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device, memory_format=fmt)
        return torch.mul(weight, 1.0 / sigma, out=out) if out_dtype != weight.dtype else torch.div(weight, sigma, out=out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        weight, u, v, sigma = ctx.saved_tensors
        mat, channels_last = _weight_matrix(weight)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        g = grad.to(weight.dtype).contiguous(memory_format=fmt)
        gmat = g.permute(0, 2, 3, 1).reshape(mat.shape) if channels_last else g.reshape(mat.shape)
        coef = torch.dot(gmat.reshape(-1), mat.reshape(-1)) / (sigma * sigma)
        if weight.device.type == "cpu":  # one pass: G / sigma - coef * u v^T
            out = torch.addr(gmat, u, v, beta=float(1.0 / sigma), alpha=float(-coef))
        else:  # no host sync on accelerators: (G - coef * sigma * u v^T) / sigma
            out = torch.addr(gmat, u, v * (-coef * sigma)).div_(sigma)
        if channels_last:
            out = out.view(weight.shape[0], weight.shape[2], weight.shape[3], weight.shape[1]).permute(0, 3, 1, 2)
        else:
            out = out.view(weight.shape)
        if out.stride() != weight.stride():  # e.g. 1x1 kernels in channels_last: same order, other strides
            out = torch.empty_like(weight).copy_(out)  # DDP's buckets want the parameter's strides
        return out, None, None, None, None


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


# ---------------------------------------------------------------------------------------
# Synced batch norm


class SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm over the global batch of a ``torch.distributed`` process group.

    On CUDA it runs ``torch.nn.SyncBatchNorm``'s own computation. On the CPU (gloo), which
    torch's refuses, the per-channel sums are all-reduced with a differentiable collective,
    so gradients flow through the global statistics (every rank must run the backward).
    Outside a process group, or in eval mode, it is plain batch norm. State-dict keys equal
    ``BatchNorm2d``'s. It subclasses ``BatchNorm2d``, not ``torch.nn.SyncBatchNorm``, because
    DistributedDataParallel refuses to wrap CPU modules holding the latter.
    """

    def __init__(self, num_features: int, *, process_group: object | None = None, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if not self._needs_sync():
            return super().forward(input)
        if input.is_cuda:
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        return _cpu_sync_batch_norm(self, input)

    def _needs_sync(self) -> bool:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        group = self.process_group or torch.distributed.group.WORLD
        return torch.distributed.get_world_size(group) > 1

    # torch.nn.SyncBatchNorm.forward calls this on CUDA
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient is the all-reduced gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _cpu_sync_batch_norm(bn: SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // max(x.size(1), 1)
    # Stats in float32 at least (bf16/fp16 inputs under autocast): local moments via a
    # stable two-pass var_mean, combined in float64 so that the global E[x^2] - E[x]^2
    # does not lose precision. An empty local batch contributes zeros.
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    if count > 0:
        var, mean = torch.var_mean(xc, dim=dims, unbiased=False)
    else:
        var = mean = xc.sum(dims)  # zeros, with x still in the graph
    mean64, var64 = mean.double(), var.double()
    n = torch.full_like(mean64, float(count))
    stats = torch.stack([n * mean64, n * (var64 + mean64 * mean64), n])
    group = bn.process_group or torch.distributed.group.WORLD
    stats = _AllReduceSum.apply(stats, group)
    total = stats[2]
    g_mean = stats[0] / total
    g_var = (stats[1] / total - g_mean * g_mean).clamp_min(0)

    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = g_var * total / (total - 1).clamp_min(1)
            bn.running_mean.mul_(1 - momentum).add_(g_mean.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)

    shape = [1, -1] + [1] * (x.dim() - 2)
    inv_std = torch.rsqrt(g_var + bn.eps).to(xc.dtype)
    out = (xc - g_mean.to(xc.dtype).view(shape)) * inv_std.view(shape)
    if bn.affine:
        out = out * bn.weight.to(xc.dtype).view(shape)
        if bn.bias is not None:
            out = out + bn.bias.to(xc.dtype).view(shape)
    return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group: object | None = None) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` by :class:`SyncBatchNorm`, keeping its state.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, the new module takes over the
    old one's parameters and buffers (same tensors: device, dtype, ``requires_grad`` and
    optimizer references carry over). Call it inside the worker once the process group
    exists (then wrap in DDP).
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        ref = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None)
        sync = SyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            **({"bias": False} if module.affine and module.bias is None else {}),
        )
        with torch.no_grad():
            if module.affine:
                sync.weight, sync.bias = module.weight, module.bias
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
