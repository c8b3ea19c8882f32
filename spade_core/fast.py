"""Eval-only fast generator: the same function as SPADEGenerator, computed with less work.

- Spectral norm is folded into plain weights (eval mode uses the stored u, v anyway).
- The first conv of every SPADE sees a one-hot map, so a kxk conv of it is a sum of k*k
  gathered weight columns: one ``embedding_bag`` over label ids replaces a dense conv with
  ``semantic_nc`` (151 for ADE20K) input channels. These convs are a quarter of the FLOPs.
- gamma and beta convs are fused into one conv; with batch norm the running statistics and
  the ``1 +`` are folded into it too, so a SPADE is ``x * A + B`` with [A, B] one conv's output.
- Label maps are resized and turned into gather indices once per resolution, not per layer.
- channels_last activations and weights; optionally bfloat16 (AMX / tensor cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .blocks import SPADEResnetBlock
from .config import LabelConfig
from .generator import SPADEGenerator
from .gather import conv_table
from .labelmap import LabelMap
from .norms import SPADE


class GatherConv(nn.Module):
    """A kxk conv (zero padding k//2) of a one-hot label map (+ optional binary edge channel), via gathers.

    Input: gather indices from :func:`~spade_core.gather.gather_indices` (or a :class:`~spade_core.labelmap.LabelMap`
    plan); output (B, C_out, H, W) channels_last. The table is :func:`~spade_core.gather.conv_table`'s,
    frozen.
    """

    def __init__(self, conv: nn.Conv2d, *, num_labels: int, edges: bool, dtype: torch.dtype) -> None:
        super().__init__()
        w = conv.weight.detach().float()  # (C_out, C_in, k, k)
        c_out, c_in, k, _ = w.shape
        if c_in != num_labels + int(edges):
            raise ValueError(f"conv has {c_in} input channels, expected {num_labels + int(edges)}")
        self.register_buffer("table", conv_table(w).to(dtype))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(c_out, device=w.device)
        self.register_buffer("bias", bias.float().to(dtype))
        self.kernel_size = k

    def forward(self, indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        b, h, w = shape
        out = F.embedding_bag(indices, self.table, mode="sum") + self.bias
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)


class FastSPADE(nn.Module):
    """SPADE as ``norm(x) * A + B``; [A, B] from one fused conv over the gathered hidden map."""

    def __init__(self, spade: SPADE, *, num_labels: int, edges: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.shared = GatherConv(spade.mlp_shared[0], num_labels=num_labels, edges=edges, dtype=dtype)
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
        k = spade.mlp_gamma.kernel_size[0]
        self.modulation = nn.Conv2d(wg.shape[1], 2 * wg.shape[0], k, padding=k // 2)
        with torch.no_grad():
            self.modulation.weight.copy_(torch.cat([wg, wb]))
            self.modulation.bias.copy_(torch.cat([bg, bb]))
        self.modulation.to(dtype=dtype, memory_format=torch.channels_last)

    def modulation_for(self, indices: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.shared(indices, shape)).contiguous(memory_format=torch.channels_last)
        return self.modulation(hidden).chunk(2, dim=1)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = mod
        if self.instance_norm:
            x = F.instance_norm(x, eps=self.eps)
        return torch.addcmul(b, x, a)


class FastBlock(nn.Module):
    def __init__(self, block: SPADEResnetBlock, *, num_labels: int, edges: bool, dtype: torch.dtype) -> None:
        super().__init__()
        kw = dict(num_labels=num_labels, edges=edges, dtype=dtype)
        self.norm_0 = FastSPADE(block.norm_0, **kw)
        self.norm_1 = FastSPADE(block.norm_1, **kw)
        self.norm_s = FastSPADE(block.norm_s, **kw) if block.learned_shortcut else None
        self.conv_0, self.conv_1 = plain_copy(block.conv_0), plain_copy(block.conv_1)
        self.conv_s = plain_copy(block.conv_s) if block.learned_shortcut else None
        self.kernel_size = block.norm_0.mlp_gamma.kernel_size[0]

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[2], x.shape[3])
        x_s = x if self.norm_s is None else self.conv_s(self.norm_s(x, self.norm_s.modulation_for(indices, shape)))
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, self.norm_0.modulation_for(indices, shape)), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, self.norm_1.modulation_for(indices, shape)), 0.2))
        return x_s + dx


class FastGenerator(nn.Module):
    """Eval-only twin of a :class:`SPADEGenerator` taking label channel ids instead of a one-hot map.

    ``forward(channels, z=None, edges=None)``: channels (B, H, W) int64 channel indices (see
    ``semantics.label_channels``), edges (B, H, W) bool for instance-edge models. Returns
    float32 images. fp32 matches the plain generator to ~1e-5; bf16 trades a little accuracy
    for speed. With ``compile=True`` the forward goes through ``torch.compile``.
    """

    def __init__(
        self,
        generator: SPADEGenerator,
        *,
        label_config: LabelConfig,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        g = generator
        cfg = g.config
        self.config = cfg
        self.dtype = dtype
        self.num_labels = label_config.num_label_channels
        self.edges = label_config.instance_edges
        self.sh, self.sw = g.sh, g.sw
        self.ngf = cfg.ngf
        kw = dict(num_labels=self.num_labels, edges=self.edges, dtype=dtype)
        self.fc_gather = GatherConv(g.fc, **kw) if cfg.z_dim is None else None
        self.fc = plain_copy(g.fc) if cfg.z_dim is not None else None
        schedule = g.schedule()
        self.upsample_before = [up for _, up in schedule]
        self.blocks = nn.ModuleList(FastBlock(getattr(g, name), **kw) for name, _ in schedule)
        self.conv_img = plain_copy(g.conv_img)
        self.spade_kernel = cfg.spade.kernel_size
        for module in (self.fc, self.conv_img, *self.blocks):
            if module is not None:
                module.to(dtype=dtype)
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self._forward = torch.compile(self._run, dynamic=False, options={"freezing": True}) if compile else self._run

    @property
    def device(self) -> torch.device:
        return self.conv_img.weight.device

    def forward(self, channels: torch.Tensor, z: torch.Tensor | None = None, edges: torch.Tensor | None = None) -> torch.Tensor:
        if (edges is None) == self.edges:
            raise ValueError("edges are required exactly when the model has an instance-edge channel")
        with torch.inference_mode():
            return self._forward(channels, z, edges)

    def _run(self, channels: torch.Tensor, z: torch.Tensor | None, edges: torch.Tensor | None) -> torch.Tensor:
        b = channels.shape[0]
        labels = LabelMap(channels, self.num_labels, edges)

        def indices_at(h: int, w: int, kernel: int) -> torch.Tensor:
            return labels.plan(size=(h, w), kernel_size=kernel, stride=1, padding=kernel // 2).indices

        if self.fc is not None:
            x = self.fc(z.to(self.dtype)).view(b, 16 * self.ngf, self.sh, self.sw)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = self.fc_gather(indices_at(self.sh, self.sw, 3), (b, self.sh, self.sw)).contiguous(memory_format=torch.channels_last)
        for up, block in zip(self.upsample_before, self.blocks):
            if up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(x, indices_at(x.shape[2], x.shape[3], self.spade_kernel))
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)).float())


def plain_copy(layer: nn.Conv2d | nn.Linear) -> nn.Conv2d | nn.Linear:
    """A float32 copy of a conv or linear layer with its spectral norm (if any) folded into the weight.

    The weight is read as eval mode computes it (stored u, v; no power iteration). Copying
    instead of removing the parametrisation leaves the source model untouched (removing it
    from a deepcopy would also break the original, which shares the parametrised class).
    """
    sn = parametrize.is_parametrized(layer, "weight")
    mods = list(layer.parametrizations.weight) if sn else []
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        with torch.no_grad():
            weight = layer.weight.detach().float().clone()
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)
    bias = layer.bias.detach().float().clone() if layer.bias is not None else None
    kw = dict(bias=bias is not None, device=weight.device)
    if isinstance(layer, nn.Linear):
        copy = nn.Linear(layer.in_features, layer.out_features, **kw)
    else:
        copy = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding, **kw
        )
    with torch.no_grad():
        copy.weight.copy_(weight)
        if bias is not None:
            copy.bias.copy_(bias)
    return copy
