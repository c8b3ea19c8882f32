"""The inference fast path: the same generator graph, each layer swapped for a cheaper computation.

:class:`FastGenerator` holds a copy of a :class:`~spade_core.generator.SPADEGenerator`
(the one module graph, run by its own ``forward``) in which
- spectral norm is folded into plain weights (eval mode uses the stored u, v anyway);
- every SPADE computes with a :class:`~spade_core.processors.FoldedProcessor`: its first
  conv sees a one-hot map, so a kxk conv of it is a sum of k*k gathered weight columns (one
  ``embedding_bag`` over label ids replaces a dense conv with ``semantic_nc``, 151 for
  ADE20K, input channels: a quarter of the FLOPs); gamma and beta are one conv; with batch
  norm the running statistics and the ``1 +`` are folded in, so a SPADE is ``x * A + B``;
- the label input is a :class:`~spade_core.labelmap.LabelMap`, which resizes the map and
  builds gather indices once per resolution, not per layer;
- activations and weights are channels_last, optionally bfloat16 (AMX / tensor cores).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import GeneratorConfig, LabelConfig
from .generator import SPADEGenerator
from .labelmap import LabelMap
from .norms import SPADE
from .processors import FoldedProcessor, GatherConv

__all__ = ["FastGenerator", "GatherConv", "inference_copy", "plain_copy"]


class FastGenerator(nn.Module):
    """Eval-only generator taking label channel ids instead of a one-hot map.

    ``forward(channels, z=None, edges=None)``: channels (B, H, W) int64 channel indices (see
    ``semantics.label_channels``), edges (B, H, W) bool for instance-edge models. Returns
    float32 images. fp32 matches the plain generator to ~1e-5; bf16 trades a little accuracy
    for speed. With ``compile=True`` the forward goes through ``torch.compile``. The source
    generator is left untouched; later changes to its weights are not seen.
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
        self.dtype = dtype
        self.num_labels = label_config.num_label_channels
        self.edges = label_config.instance_edges
        self.generator = inference_copy(generator, dtype=dtype)
        self._forward = torch.compile(self._run, dynamic=False, options={"freezing": True}) if compile else self._run

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    @property
    def device(self) -> torch.device:
        return self.generator.conv_img.weight.device

    def forward(self, channels: torch.Tensor, z: torch.Tensor | None = None, edges: torch.Tensor | None = None) -> torch.Tensor:
        if (edges is None) == self.edges:
            raise ValueError("edges are required exactly when the model has an instance-edge channel")
        with torch.inference_mode():
            return self._forward(channels, z, edges)

    def _run(self, channels: torch.Tensor, z: torch.Tensor | None, edges: torch.Tensor | None) -> torch.Tensor:
        labels = LabelMap(channels, self.num_labels, edges)
        return self.generator(labels, None if z is None else z.to(self.dtype)).float()


def inference_copy(generator: SPADEGenerator, *, dtype: torch.dtype = torch.float32) -> SPADEGenerator:
    """A frozen eval copy of ``generator`` computing the same function with less work (see the module).

    The copy's SPADEs keep only their norm (their convs live folded in the processor), its
    spectral-norm layers become plain ones, and everything is ``dtype`` and channels_last.
    """
    g = copy.deepcopy(generator).eval()
    for parent in list(g.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(child, "weight"):
                setattr(parent, name, plain_copy(child))
    for spade in [m for m in g.modules() if isinstance(m, SPADE)]:
        spade.set_processor(FoldedProcessor(spade, dtype=dtype))
        spade.mlp_shared = spade.mlp_gamma = spade.mlp_beta = None  # folded into the processor
    g.to(dtype=dtype, memory_format=torch.channels_last)
    return g.requires_grad_(False)


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
        copy_ = nn.Linear(layer.in_features, layer.out_features, **kw)
    else:
        copy_ = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding, **kw
        )
    with torch.no_grad():
        copy_.weight.copy_(weight)
        if bias is not None:
            copy_.bias.copy_(bias)
    return copy_
