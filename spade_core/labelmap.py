"""Label maps as channel ids: convolutions of a one-hot map computed as gathers, with gradients.

A one-hot label map is almost all zeros, and a kxk conv of it is, at every output pixel,
the sum of the k*k weight columns its labels pick. :class:`LabelMap` keeps the channel ids
(and the optional instance-edge map) and computes such convs as one ``embedding_bag`` over
a table of weight columns. The table is built from the conv weight on every call (a
permute, a zero row per tap, the bias as a last row), so gradients reach the weight and
bias exactly as through the dense conv; the backward pass is one sparse matrix product.

It serves three layers that read the label map: every SPADE's first conv, the generator's
fc conv (non-VAE models) and the first conv of each discriminator scale (where the label
map has been average-pooled: then each pixel is a weighted sum of up to 9**level labels).
Nearest resizes and gather plans are cached per shape on the LabelMap, so build one per
batch and pass it everywhere the dense one-hot would go; :meth:`LabelMap.dense` gives the
dense tensor when something needs it.

The eval-only generator in :mod:`spade_core.fast` uses the same index and table code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .config import LabelConfig
from .semantics import instance_edges as _instance_edges
from .semantics import label_channels


class LabelMap:
    """Channel ids (B, H, W) int64 [+ edges (B, H, W) bool]: the trainable fast path's label input.

    Equivalent to the dense ``(B, num_label_channels [+1], H, W)`` one-hot (+ edge channel)
    tensor of :func:`spade_core.semantics.semantic_input`; :class:`~spade_core.SPADE`,
    :class:`~spade_core.SPADEGenerator` and :class:`~spade_core.MultiscaleDiscriminator`
    accept either. Cached plans belong to one batch: make a new LabelMap per batch.
    """

    def __init__(self, channels: torch.Tensor, num_label_channels: int, edges: torch.Tensor | None = None) -> None:
        if not isinstance(channels, torch.Tensor) or channels.dim() != 3 or channels.dtype != torch.int64:
            got = f"{channels.dtype} {tuple(channels.shape)}" if isinstance(channels, torch.Tensor) else type(channels).__name__
            raise ValueError(f"channels must be an int64 tensor of shape (B, H, W), got {got}")
        if edges is not None and (edges.dtype != torch.bool or edges.shape != channels.shape):
            raise ValueError(f"edges must be a bool tensor of shape {tuple(channels.shape)}, got {edges.dtype} {tuple(edges.shape)}")
        if num_label_channels < 1:
            raise ValueError(f"num_label_channels must be >= 1, got {num_label_channels}")
        self.channels = channels
        self.edges = edges
        self.num_label_channels = int(num_label_channels)
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._plans: dict[tuple, GatherPlan] = {}
        self._dense: dict[torch.dtype, torch.Tensor] = {}

    # --- description ------------------------------------------------------------------

    @property
    def semantic_nc(self) -> int:
        """Channels of the equivalent dense tensor: labels (+ 1 edge channel)."""
        return self.num_label_channels + int(self.edges is not None)

    @property
    def rows(self) -> int:
        """Table rows per kernel tap: one per dense channel, plus a zero row (padding, no edge)."""
        return self.semantic_nc + 1

    @property
    def batch_size(self) -> int:
        return self.channels.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return (self.channels.shape[1], self.channels.shape[2])

    @property
    def device(self) -> torch.device:
        return self.channels.device

    def __repr__(self) -> str:
        edges = ", edges" if self.edges is not None else ""
        return f"LabelMap({tuple(self.channels.shape)}, num_label_channels={self.num_label_channels}{edges})"

    def to(self, device: torch.device | str) -> LabelMap:
        edges = None if self.edges is None else self.edges.to(device)
        return LabelMap(self.channels.to(device), self.num_label_channels, edges)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The equivalent dense (B, semantic_nc, H, W) one-hot (+ edge channel) tensor (cached)."""
        if dtype not in self._dense:
            b, h, w = self.channels.shape
            seg = torch.zeros(b, self.semantic_nc, h, w, dtype=dtype, device=self.device)
            seg.scatter_(1, self.channels.unsqueeze(1), 1.0)
            if self.edges is not None:
                seg[:, -1] = self.edges.to(dtype)
            self._dense[dtype] = seg
        return self._dense[dtype]

    # --- convolutions -----------------------------------------------------------------

    def conv(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        size: tuple[int, int] | None = None,
        stride: int = 1,
        padding: int | None = None,
        pool_levels: int = 0,
        relu: bool = False,
    ) -> torch.Tensor:
        """``F.conv2d(dense, weight, bias, stride, padding)`` of this map, as a gather; differentiable in weight and bias.

        ``dense`` is :meth:`dense` resized (nearest) to ``size`` (default: the map's own),
        or, with ``pool_levels`` n > 0, average-pooled n times as the multiscale
        discriminator does (3x3, stride 2, padding 1, padding not counted). ``padding``
        defaults to kernel // 2. Returns (B, C_out, H', W') in channels_last memory format,
        in the autocast dtype under autocast, else in the weight's dtype; ``relu`` applies a
        ReLU in place. ``weight``: (C_out, semantic_nc, k, k) with square kernels.
        """
        c_out, c_in, kh, kw = weight.shape
        if c_in != self.semantic_nc or kh != kw:
            raise ValueError(
                f"a label-map conv needs a square kernel over {self.semantic_nc} input channels, got weight {tuple(weight.shape)}"
            )
        if pool_levels and size not in (None, self.size):
            raise ValueError("pooled label maps are pooled from the map's own size: pass size=None with pool_levels")
        size = self.size if size is None else (int(size[0]), int(size[1]))
        padding = kh // 2 if padding is None else padding
        plan = self.plan(size=size, kernel_size=kh, stride=stride, padding=padding, pool_levels=pool_levels, bias=bias is not None)
        table = conv_table(weight, bias)
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = weight.dtype
        out = _GatherRows.apply(table, plan, out_dtype)
        if relu:
            out = F.relu_(out)
        b, h, w = plan.out_shape
        return out.view(b, h, w, c_out).permute(0, 3, 1, 2)

    def plan(
        self, *, size: tuple[int, int], kernel_size: int, stride: int, padding: int, pool_levels: int = 0, bias: bool = False
    ) -> GatherPlan:
        """The (cached) gather plan of a conv of this map; see :meth:`conv`."""
        key = (size, kernel_size, stride, padding, pool_levels, bias)
        if key not in self._plans:
            ids, weights = self._entries_at(size, pool_levels)
            indices, sample_weights = conv_bags(
                ids, weights, rows=self.rows, kernel_size=kernel_size, stride=stride, padding=padding, bias=bias
            )
            b, h, w, _ = ids.shape
            out_shape = (b, (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1)
            table_rows = kernel_size * kernel_size * self.rows + int(bias)
            self._plans[key] = GatherPlan(indices, sample_weights, out_shape, table_rows)
        return self._plans[key]

    def _entries_at(self, size: tuple[int, int], pool_levels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per pixel of the (resized or pooled) map: (B, h, w, n) table rows within a tap and their weights (None: all 1)."""
        key = (size, pool_levels)
        if key in self._entries:
            return self._entries[key]
        if pool_levels == 0:
            channels, edges = self.channels, self.edges
            if size != self.size:
                rows = _nearest_index(self.size[0], size[0], self.device)
                cols = _nearest_index(self.size[1], size[1], self.device)
                channels = channels[:, rows][:, :, cols]
                edges = None if edges is None else edges[:, rows][:, :, cols]
            entries = [channels]
            if edges is not None:
                entries.append(torch.where(edges, self.num_label_channels, self.rows - 1))
            result: tuple[torch.Tensor, torch.Tensor | None] = (torch.stack(entries, dim=-1), None)
        else:
            ids, weights = self._entries_at(size, pool_levels - 1)
            result = _avg_pool_entries(ids, weights, zero=self.rows - 1)
        self._entries[key] = result
        return result


def label_map(labels: torch.Tensor, config: LabelConfig, *, instance: torch.Tensor | None = None) -> LabelMap:
    """Raw label ids (B, H, W) [+ instance map] -> the :class:`LabelMap` equivalent of ``semantic_input``."""
    channels = label_channels(labels, config)
    if config.instance_edges:
        if instance is None:
            raise ValueError("this model needs an instance map (B, H, W) for its instance-edge channel")
        if instance.shape != labels.shape:
            raise ValueError(f"instance map shape {tuple(instance.shape)} differs from labels {tuple(labels.shape)}")
        edges = _instance_edges(instance)
    else:
        if instance is not None:
            raise ValueError("this model takes no instance map (labels.instance_edges is false)")
        edges = None
    return LabelMap(channels, config.num_label_channels, edges)


# ---------------------------------------------------------------------------------------
# Tables and gather plans (shared with spade_core.fast)


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


def gather_indices(
    channels: torch.Tensor, *, num_labels: int, kernel_size: int, edges: torch.Tensor | None
) -> torch.Tensor:
    """(B, H, W) channel ids [+ edges] -> (B*H*W, bag) rows of a :func:`conv_table` (stride 1, padding k//2)."""
    rows = num_labels + int(edges is not None) + 1
    entries = [channels]
    if edges is not None:
        entries.append(torch.where(edges, num_labels, rows - 1))
    indices, _ = conv_bags(
        torch.stack(entries, dim=-1), None, rows=rows, kernel_size=kernel_size, stride=1, padding=kernel_size // 2
    )
    return indices


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


def _avg_pool_entries(
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


def _nearest_index(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
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


class _GatherRows(torch.autograd.Function):
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
