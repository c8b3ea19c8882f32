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

The kernels (tables, gather plans, the sparse backward) are :mod:`spade_core.gather`'s; the
inference processors (:mod:`spade_core.processors`) use them with frozen tables.

:class:`DenseSemantics` puts the dense one-hot tensor behind the same interface
(``apply_conv``, ``conv_with_images``, ``semantic_nc``, ``memory_format``), so the networks
read either kind without branching on its type (:func:`as_semantics` wraps a tensor).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .config import LabelConfig
from .gather import GatherPlan, GatherRows, avg_pool_entries, conv_bags, conv_table, nearest_index
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

    # Activations computed from a LabelMap come out channels_last (the gathers write NHWC).
    memory_format = torch.channels_last

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
            semantics = torch.zeros(b, self.semantic_nc, h, w, dtype=dtype, device=self.device)
            semantics.scatter_(1, self.channels.unsqueeze(1), 1.0)
            if self.edges is not None:
                semantics[:, -1] = self.edges.to(dtype)
            self._dense[dtype] = semantics
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
        out = GatherRows.apply(table, plan, out_dtype)
        if relu:
            out = F.relu_(out)
        b, h, w = plan.out_shape
        return out.view(b, h, w, c_out).permute(0, 3, 1, 2)

    def apply_conv(self, conv: nn.Conv2d, *, size: tuple[int, int], relu: bool = False) -> torch.Tensor:
        """``conv`` (stride 1, padding k // 2) of this map resized to ``size``, as a gather: the
        :class:`DenseSemantics` method of the same name, computed from the label ids."""
        return self.conv(conv.weight, conv.bias, size=size, relu=relu)

    def conv_with_images(self, conv: nn.Conv2d, images: torch.Tensor, *, pool_levels: int = 0) -> torch.Tensor:
        """``conv`` of [label channels, image channels] for k * B images (the B maps repeated k
        times; labels average-pooled ``pool_levels`` times): the image part as a dense conv,
        the label part as a gather computed once per map."""
        c_lab = self.semantic_nc
        image_part = F.conv2d(images, conv.weight[:, c_lab:], conv.bias, conv.stride, conv.padding)
        label_part = self.conv(
            conv.weight[:, :c_lab], None, stride=conv.stride[0], padding=conv.padding[0], pool_levels=pool_levels
        )
        if image_part.shape[1:] != label_part.shape[1:]:
            raise ValueError(f"label map {self.size} and images {tuple(images.shape[-2:])} differ in size")
        both = image_part.unflatten(0, (-1, self.batch_size)) + label_part.to(image_part.dtype)
        return both.flatten(0, 1)

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
                rows = nearest_index(self.size[0], size[0], self.device)
                cols = nearest_index(self.size[1], size[1], self.device)
                channels = channels[:, rows][:, :, cols]
                edges = None if edges is None else edges[:, rows][:, :, cols]
            entries = [channels]
            if edges is not None:
                entries.append(torch.where(edges, self.num_label_channels, self.rows - 1))
            result: tuple[torch.Tensor, torch.Tensor | None] = (torch.stack(entries, dim=-1), None)
        else:
            ids, weights = self._entries_at(size, pool_levels - 1)
            result = avg_pool_entries(ids, weights, zero=self.rows - 1)
        self._entries[key] = result
        return result


class DenseSemantics:
    """The dense (B, semantic_nc, H, W) one-hot (+ edge channel) tensor behind the interface
    the networks read their semantic input through (:class:`LabelMap` is the other one).

    The networks call :meth:`apply_conv` on whichever they are given, so no layer branches
    on the input's type; convs run as the modules themselves (the reference's computation,
    hooks included). Nearest resizes are cached per size: make one per batch.
    """

    memory_format = torch.contiguous_format

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"semantics must be a float tensor (B, semantic_nc, H, W) or a LabelMap, got {got}")
        self.tensor = tensor
        self._resized: dict[tuple[int, int], torch.Tensor] = {tuple(tensor.shape[-2:]): tensor}
        self._pooled: dict[int, torch.Tensor] = {0: tensor}

    @property
    def semantic_nc(self) -> int:
        return self.tensor.shape[1]

    @property
    def batch_size(self) -> int:
        return self.tensor.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return (self.tensor.shape[2], self.tensor.shape[3])

    def resized(self, size: tuple[int, int]) -> torch.Tensor:
        """The map resized (nearest) to ``size``."""
        size = (int(size[0]), int(size[1]))
        if size not in self._resized:
            self._resized[size] = F.interpolate(self.tensor, size=size, mode="nearest")
        return self._resized[size]

    def apply_conv(self, conv: nn.Conv2d, *, size: tuple[int, int], relu: bool = False) -> torch.Tensor:
        """``conv`` of the map resized to ``size`` (then a ReLU if asked)."""
        out = conv(self.resized(size))
        return F.relu(out) if relu else out

    def pooled(self, levels: int) -> torch.Tensor:
        """The map average-pooled ``levels`` times as the multiscale discriminator pools its input."""
        if levels not in self._pooled:
            below = self.pooled(levels - 1)
            self._pooled[levels] = downsample(below)
        return self._pooled[levels]

    def conv_with_images(self, conv: nn.Conv2d, images: torch.Tensor, *, pool_levels: int = 0) -> torch.Tensor:
        """``conv`` of [label channels, image channels] for k * B images (the B maps repeated k
        times; labels pooled ``pool_levels`` times): the concatenation, as the reference."""
        labels = self.pooled(pool_levels)
        if labels.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"label map {tuple(labels.shape[-2:])} and images {tuple(images.shape[-2:])} differ in size")
        reps = images.shape[0] // self.batch_size
        return conv(torch.cat([labels.repeat(reps, 1, 1, 1), images], dim=1))


Semantics = LabelMap | DenseSemantics


def downsample(x: torch.Tensor) -> torch.Tensor:
    """One scale down, as the multiscale discriminator goes: 3x3 average pooling, stride 2,
    padding not counted (:func:`~spade_core.gather.avg_pool_entries` is its gather form)."""
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)


def as_semantics(semantics: torch.Tensor | LabelMap | DenseSemantics) -> Semantics:
    """The networks' semantic input behind one interface: a dense tensor is wrapped, the rest pass through."""
    if isinstance(semantics, (LabelMap, DenseSemantics)):
        return semantics
    return DenseSemantics(semantics)


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
