"""Gather kernels: a kxk convolution of a one-hot label map as an ``embedding_bag`` over a table
of weight columns, and its sparse backward pass. :class:`spade_core.labelmap.LabelMap` plans
and runs them with gradients; :class:`spade_core.processors.GatherConv` runs them with tables
frozen for inference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

def conv_table(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(C_out, C_in, k, k) conv weight -> (k*k*(C_in+1) [+1], C_out) gather table; differentiable.

    Row ``(dy*k + dx) * (C_in+1) + c`` is the weight of input channel c at tap (dy, dx);
    each tap ends with a zero row (padding, absent edge); the bias, if given, is the last row.
    """
    c_out, c_in, kh, kw = weight.shape
    table = F.pad(weight.permute(2, 3, 1, 0), (0, 0, 0, 1)).reshape(kh * kw * (c_in + 1), c_out)
    if bias is not None:
        table = torch.cat([table, bias.view(1, c_out)])
    return table


def conv_bags(
    ids: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    rows: int,
    kernel_size: int,
    stride: int,
    padding: int,
    bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-pixel entries (B, H, W, n) (row within a tap; ``rows - 1`` is the zero row) -> one bag per output pixel.

    Returns (B*H'*W', k*k*n [+1]) table rows and matching per-sample weights (None when
    ``weights`` is None); with ``bias`` each bag ends with the table's bias row (weight 1).
    """
    b, h, w, n = ids.shape
    k, s, p = kernel_size, stride, padding
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    padded = F.pad(ids, (0, 0, p, p, p, p), value=rows - 1)
    padded_w = None if weights is None else F.pad(weights, (0, 0, p, p, p, p), value=0.0)
    taps, tap_weights = [], []
    for dy in range(k):
        for dx in range(k):
            window = (slice(None), slice(dy, dy + s * (ho - 1) + 1, s), slice(dx, dx + s * (wo - 1) + 1, s))
            taps.append(padded[window] + (dy * k + dx) * rows)
            if padded_w is not None:
                tap_weights.append(padded_w[window])
    indices = torch.cat(taps, dim=-1).reshape(b * ho * wo, k * k * n)
    sample_weights = None if padded_w is None else torch.cat(tap_weights, dim=-1).reshape(b * ho * wo, k * k * n)
    if bias:
        indices = torch.cat([indices, indices.new_full((indices.shape[0], 1), k * k * rows)], dim=1)
        if sample_weights is not None:
            sample_weights = torch.cat([sample_weights, sample_weights.new_ones(sample_weights.shape[0], 1)], dim=1)
    return indices.contiguous(), None if sample_weights is None else sample_weights.contiguous()


def avg_pool_entries(
    ids: torch.Tensor, weights: torch.Tensor | None, *, zero: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of ``F.avg_pool2d(map, 3, stride=2, padding=1, count_include_pad=False)``: 9x the entries, weights / count."""
    b, h, w, n = ids.shape
    if weights is None:
        weights = torch.ones(ids.shape, dtype=torch.float64, device=ids.device)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = F.pad(ids, (0, 0, 1, 1, 1, 1), value=zero)
    padded_w = F.pad(weights, (0, 0, 1, 1, 1, 1), value=0.0)
    valid = F.pad(torch.ones(h, w, dtype=weights.dtype, device=ids.device), (1, 1, 1, 1))
    new_ids, new_w, count = [], [], 0
    for dy in range(3):
        for dx in range(3):
            rs, cs = slice(dy, dy + 2 * (ho - 1) + 1, 2), slice(dx, dx + 2 * (wo - 1) + 1, 2)
            new_ids.append(padded[:, rs, cs])
            new_w.append(padded_w[:, rs, cs])
            count = count + valid[rs, cs]
    pooled_w = torch.cat(new_w, dim=-1) / count[None, :, :, None]
    return torch.cat(new_ids, dim=-1), pooled_w


def nearest_index(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Source indices of ``F.interpolate(mode='nearest')``: floor(i * in / out)."""
    return (torch.arange(size_out, device=device, dtype=torch.float64) * (size_in / size_out)).floor().long().clamp_max(size_in - 1)


@dataclass(eq=False)
class GatherPlan:
    """One conv of one label map: output pixel i is ``sum_j weights[i, j] * table[indices[i, j]]``."""

    indices: torch.Tensor  # (N, bag) int64
    weights: torch.Tensor | None  # (N, bag) float64, or None for all ones
    out_shape: tuple[int, int, int]  # (B, H', W'), N = B * H' * W'
    table_rows: int
    _transposes: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    _weights: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def weights_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.weights is None:
            return None
        if dtype not in self._weights:
            self._weights[dtype] = self.weights.to(dtype)
        return self._weights[dtype]

    def transpose(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (table_rows, N) sparse CSR matrix that maps output gradients to table gradients (built once per dtype)."""
        if dtype not in self._transposes:
            flat = self.indices.reshape(-1)
            bag = self.indices.shape[1]
            order = torch.argsort(flat)
            counts = torch.bincount(flat, minlength=self.table_rows)
            crow = torch.zeros(self.table_rows + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(counts, 0, out=crow[1:])
            cols = torch.div(order, bag, rounding_mode="floor")
            if self.weights is None:
                values = torch.ones(flat.shape, dtype=dtype, device=flat.device)
            else:
                values = self.weights.reshape(-1)[order].to(dtype)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._transposes[dtype] = torch.sparse_csr_tensor(
                    crow, cols, values, size=(self.table_rows, self.indices.shape[0]), check_invariants=False
                )
        return self._transposes[dtype]


class GatherRows(torch.autograd.Function):
    """``embedding_bag(sum)`` of a plan's rows of ``table`` (cast to ``out_dtype``).

    The backward is one sparse (CSR) matrix product in float32 or wider, whatever the
    forward dtype: a table row sums the gradients of thousands of pixels, which bfloat16
    accumulation would ruin (torch's own embedding_bag backward also is ~10x slower here).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, plan: GatherPlan, out_dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.table_dtype = table.dtype
        t = table.to(out_dtype)
        return F.embedding_bag(plan.indices, t, mode="sum", per_sample_weights=plan.weights_as(out_dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dtype = torch.promote_types(ctx.table_dtype, torch.float32)  # sums of many rows: at least float32
        grad_table = ctx.plan.transpose(dtype) @ grad.to(dtype).contiguous()
        return grad_table.to(ctx.table_dtype), None, None
