"""Synced batch norm over a ``torch.distributed`` process group, on CUDA and on the CPU (gloo)."""

from __future__ import annotations

import torch
from torch import nn


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
