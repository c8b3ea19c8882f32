"""Label semantics: raw dataset label ids -> network input channels; class names and palettes."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

from .config import LabelConfig

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def label_channels(labels: torch.Tensor, config: LabelConfig) -> torch.Tensor:
    """Map raw label ids (B, H, W) to channel indices (int64), refusing ids the model has no channel for.

    Raw id k -> channel k; with a don't-care channel, ``dontcare_value`` -> channel ``label_nc``.
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of integer label ids, got {type(labels).__name__}")
    if labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"labels must have an integer dtype (raw label ids), got {labels.dtype}")
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
    ids = labels.long()
    valid = (ids >= 0) & (ids < config.num_label_channels)
    if config.contain_dontcare_label:
        dontcare = ids == config.dontcare_value
        valid |= dontcare
        ids = torch.where(dontcare, config.label_nc, ids)
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid].long())[:10].tolist()
        allowed = f"0..{config.num_label_channels - 1}"
        if config.contain_dontcare_label:
            allowed += f" or {config.dontcare_value} (don't care)"
        raise ValueError(f"label ids {bad} are outside the model's classes; expected {allowed}")
    return ids


def one_hot(channels: torch.Tensor, num_channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, H, W) channel indices -> (B, num_channels, H, W) one-hot."""
    b, h, w = channels.shape
    out = torch.zeros(b, num_channels, h, w, dtype=dtype, device=channels.device)
    return out.scatter_(1, channels.unsqueeze(1), 1.0)


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """(B, H, W) instance ids -> (B, H, W) bool, True where a pixel differs from a 4-neighbour."""
    if instance.dim() != 3:
        raise ValueError(f"instance map must have shape (B, H, W), got {tuple(instance.shape)}")
    edge = torch.zeros_like(instance, dtype=torch.bool)
    dx = instance[:, :, 1:] != instance[:, :, :-1]
    dy = instance[:, 1:, :] != instance[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge


def semantic_input(
    labels: torch.Tensor,
    config: LabelConfig,
    *,
    instance: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Raw label ids (+ instance map) -> the (B, semantic_nc, H, W) tensor the networks take."""
    channels = label_channels(labels, config)
    semantics = one_hot(channels, config.num_label_channels, dtype)
    edges = _checked_edges(instance, labels, config)
    if edges is not None:
        semantics = torch.cat([semantics, edges.unsqueeze(1).to(dtype)], dim=1)
    return semantics


def _checked_edges(instance: torch.Tensor | None, labels: torch.Tensor, config: LabelConfig) -> torch.Tensor | None:
    if not config.instance_edges:
        if instance is not None:
            raise ValueError("this model takes no instance map (labels.instance_edges is false)")
        return None
    if instance is None:
        raise ValueError("this model needs an instance map (B, H, W) for its instance-edge channel")
    if instance.shape != labels.shape:
        raise ValueError(f"instance map shape {tuple(instance.shape)} differs from labels {tuple(labels.shape)}")
    return instance_edges(instance)


# ---------------------------------------------------------------------------------------
# Class names and colours


@dataclass(frozen=True)
class ClassInfo:
    """Names and RGB colours indexed by raw label id."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]


@lru_cache(maxsize=None)
def ade20k_classes() -> ClassInfo:
    """ADE20K SceneParsing: id 0 = unlabeled, ids 1..150 from ``object150_info.csv`` (first synonym)."""
    data = resources.files("spade_core") / "data"
    with (data / "object150_info.csv").open() as f:
        names = ["unlabeled"] + [row["Name"].split(";")[0] for row in csv.DictReader(f)]
    with (data / "color150.csv").open() as f:
        colors = [(0, 0, 0)] + [(int(r["R"]), int(r["G"]), int(r["B"])) for r in csv.DictReader(f)]
    return ClassInfo(tuple(names), tuple(colors))


def generic_classes(num: int) -> ClassInfo:
    """Numbered names and well-separated deterministic colours for datasets without a palette."""
    colors = []
    for i in range(num):
        # bit-reversal spreads neighbouring ids apart, like the PASCAL VOC colormap
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return ClassInfo(tuple(f"class_{i}" for i in range(num)), tuple(colors))


def classes_for(config: LabelConfig) -> ClassInfo:
    if config.dataset == "ade20k" and config.label_nc == 150:
        return ade20k_classes()
    return generic_classes(config.num_label_channels)


def colorize(labels: torch.Tensor, info: ClassInfo) -> torch.Tensor:
    """(B, H, W) raw label ids -> (B, 3, H, W) uint8 colours (ids without a colour are black)."""
    palette = torch.zeros(256, 3, dtype=torch.uint8)
    palette[: len(info.colors)] = torch.tensor(info.colors[:256], dtype=torch.uint8)
    return palette[labels.long().clamp(0, 255)].permute(0, 3, 1, 2).contiguous()
