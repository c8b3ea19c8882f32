"""Training checkpoints: spade_core's format (what serving loads) plus the training state.

    config.json, generator.safetensors, [encoder.safetensors], discriminator.safetensors
        spade_core's format; with EMA on, generator.safetensors holds the EMA weights (the
        exported model) and training/generator.safetensors the raw ones
    training/state.pt        optimisers, grad scaler, step, epoch, position in the epoch
    training/train_config.json   the run's TrainConfig, for reference

state.pt holds only tensors and plain containers, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spade_core.checkpoint import WEIGHT_FILES, SpadeModel, save_checkpoint

STATE_FILE = "training/state.pt"
RAW_GENERATOR = "training/generator.safetensors"
CONFIG_COPY = "training/train_config.json"


@dataclass
class TrainState:
    """Where training stands: ``step`` counts iterations over the whole run, ``epoch_step``
    iterations into ``epoch`` (the data position to skip to on resume)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def write_training_checkpoint(
    out: Path,
    *,
    model: SpadeModel,
    ema_generator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    train_config: dict[str, Any],
) -> Path:
    """``model`` holds the raw (unwrapped) networks; with EMA, the exported generator is the EMA one."""
    exported = model
    if ema_generator is not None:
        exported = SpadeModel(model.config, ema_generator, model.encoder, model.discriminator)
    save_checkpoint(exported, out)
    (out / "training").mkdir(exist_ok=True)
    if ema_generator is not None:
        save_file(_tensors(model.generator), str(out / RAW_GENERATOR))
    torch.save(
        {
            "state": asdict(state),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        out / STATE_FILE,
    )
    (out / CONFIG_COPY).write_text(json.dumps(train_config, indent=2) + "\n")
    return out


def read_training_checkpoint(
    path: Path,
    *,
    model: SpadeModel,
    ema_generator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
) -> TrainState:
    """Load every network, optimiser and the scaler in place; return the training state."""
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a training checkpoint (no {STATE_FILE}); to fine-tune from an exported "
                         "model, load its weights instead")
    exported = {name: load_file(path / fname) for name, fname in WEIGHT_FILES.items() if (path / fname).is_file()}
    raw_generator = load_file(path / RAW_GENERATOR) if (path / RAW_GENERATOR).is_file() else exported["generator"]
    model.generator.load_state_dict(raw_generator)
    if ema_generator is not None:
        ema_generator.load_state_dict(exported["generator"])
    for name in ("encoder", "discriminator"):
        net = getattr(model, name)
        if net is not None:
            if name not in exported:
                raise ValueError(f"{path} has no {WEIGHT_FILES[name]}, which this run trains")
            net.load_state_dict(exported[name])
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved["optimizers"][name])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return TrainState(**saved["state"])


def _tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
