"""Compute precision by name: the one table that configs, command lines, the fast path and the
training loop's autocast share, so "bf16" means the same dtype everywhere it is written."""

from __future__ import annotations

from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(DTYPES) == get_args(Precision)


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; ValueError listing the names for anything else."""
    try:
        return DTYPES[precision]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}") from None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype mixed precision autocasts to, None for fp32 (no autocast)."""
    dtype = dtype_of(precision)
    return None if dtype == torch.float32 else dtype
