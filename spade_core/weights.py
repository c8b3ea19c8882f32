"""Pretrained weight files (VGG19, pytorch-fid's Inception): read safely, checked, explained in one line."""

from __future__ import annotations

from pathlib import Path

import torch


def read_state_dict(file: Path, *, what: str, hint: str) -> dict[str, torch.Tensor]:
    """The state dict in ``file`` (never unpickling code: ``weights_only``); ValueError naming
    ``what`` and ending with ``hint`` (where to get the right file) when it is not one."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-weight files
        # torch's own text is long and may suggest weights_only=False, which we never want here.
        reason = one_line(f"{type(exc).__name__}: {exc}")
        raise ValueError(f"{what} {file} is not a loadable state dict ({reason}); {hint}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {file} does not hold a state dict of tensors; {hint}")
    return state


def state_mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str:
    """A short account of missing, unexpected and wrongly shaped keys; empty when ``state`` fits."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {some(missing)}")
    if unexpected:
        parts.append(f"unexpected {some(unexpected)}")
    if shapes:
        parts.append(f"wrong shape for {some(shapes)}")
    return "; ".join(parts)


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
