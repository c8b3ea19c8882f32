"""Checkpoints: our format and the reference's, saved and loaded as a ``spade_core.model.SpadeModel``.

Our format is a directory::

    config.json                {"format_version": 1, "model": ModelConfig as a dict}
    generator.safetensors
    encoder.safetensors        (VAE models)
    discriminator.safetensors  (optional: serving needs none)
    manifest.json              {"format_version": 1, "files": {relative path: size in bytes}}, written last

The manifest is what makes a copied checkpoint trustworthy: Ray Train uploads a checkpoint
file by file straight into its final ``checkpoint_*`` folder, so a kill during the upload
leaves a folder that has a config.json but not all of its weights (or a truncated one).
:func:`incomplete` compares a folder with its manifest; readers of a run take only folders
it passes (``spade_core.runs``). Sizes, not hashes: a cut-off copy is always shorter, and
checking costs one stat per file rather than reading gigabytes.

Loading never unpickles: safetensors for ours, ``torch.load(weights_only=True)`` for the reference's.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import nvlabs
from .config import FORMAT_VERSION, ModelConfig
from .model import SpadeModel, build_model

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
WEIGHT_FILES = {"generator": "generator.safetensors", "encoder": "encoder.safetensors", "discriminator": "discriminator.safetensors"}


def save_checkpoint(model: SpadeModel, path: str | os.PathLike[str], *, include_discriminator: bool = True) -> Path:
    """Write ``model`` in our format; each file is replaced atomically."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    nets = {"generator": model.generator, "encoder": model.encoder}
    if include_discriminator:
        nets["discriminator"] = model.discriminator
    for name, net in nets.items():
        target = out / WEIGHT_FILES[name]
        if net is None:
            target.unlink(missing_ok=True)
            continue
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        _atomic_write(target, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    text = json.dumps({"format_version": FORMAT_VERSION, "model": model.config.to_dict()}, indent=2)
    _atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    write_manifest(out)
    return out


def write_manifest(path: str | os.PathLike[str]) -> Path:
    """Record every file under ``path`` with its size, as the last write of a checkpoint
    (a writer that adds files afterwards, like training's state, writes it again)."""
    root = Path(path)
    files = {f.relative_to(root).as_posix(): f.stat().st_size for f in sorted(root.rglob("*"))
             if f.is_file() and f.name != MANIFEST_FILE and not f.name.startswith(".")}
    text = json.dumps({"format_version": MANIFEST_VERSION, "files": files}, indent=2)
    _atomic_write(root / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    return root / MANIFEST_FILE


def manifest_gaps(manifest: bytes | str | None, sizes: dict[str, int]) -> str | None:
    """Why a checkpoint whose manifest text is ``manifest`` and whose files have ``sizes``
    (relative path -> bytes) is incomplete, or None when it is whole. Shared by local folders
    and remote listings (serving reads a run on S3 the same way)."""
    if manifest is None:
        return f"no {MANIFEST_FILE} (it is written last: the checkpoint was not finished)"
    try:
        data = json.loads(manifest)
        files = data["files"]
        if data.get("format_version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError("unexpected layout")
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} is unreadable ({exc}): it was cut off while being copied"
    for name, size in sorted(files.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} is {sizes[name]} of its {size} bytes"
    return None


def incomplete(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint folder ``path`` is not whole (see :func:`manifest_gaps`), or None."""
    root = Path(path)
    manifest = root / MANIFEST_FILE
    sizes = {f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    return manifest_gaps(manifest.read_bytes() if manifest.is_file() else None, sizes)


def _atomic_write(target: Path, write) -> None:  # type: ignore[no-untyped-def]
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a checkpoint directory in either format."""
    root = Path(path)
    if (root / CONFIG_FILE).is_file():
        try:
            data = json.loads((root / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{root / CONFIG_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{root / CONFIG_FILE} must hold a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        # bool is an int subclass and 1.0 == 1: only the integer itself is accepted
        if type(version) is not int or version != FORMAT_VERSION:
            raise ValueError(f"{root / CONFIG_FILE}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        unknown = sorted(set(data) - {"format_version", "model"})
        if unknown:
            raise ValueError(
                f"{root / CONFIG_FILE}: unknown key(s) {', '.join(unknown)}; expected 'format_version' and 'model'"
            )
        return ModelConfig.from_dict(data.get("model"))
    if (root / "opt.txt").is_file():
        try:
            text = (root / "opt.txt").read_text()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{root / 'opt.txt'} is not a text file of options: {exc}") from exc
        return nvlabs.config_from_options(nvlabs.parse_opt_txt(text))
    raise ValueError(_not_a_checkpoint(root))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SpadeModel:
    """Load a checkpoint directory, ours or the reference's, strictly; the model is in eval mode."""
    root = Path(path)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ValueError(f"checkpoint directory {root} {what}")
    ours = (root / CONFIG_FILE).is_file()
    if not ours and not nvlabs.is_nvlabs_dir(root):
        raise ValueError(_not_a_checkpoint(root))
    if not ours and not (root / "opt.txt").is_file():
        raise ValueError(f"{root} holds reference weights but no opt.txt to build the architecture from")
    config = read_config(root)
    files = WEIGHT_FILES if ours else nvlabs.NET_FILES
    states = {name: _read_state(root / fname, ours) for name, fname in files.items() if (root / fname).is_file()}
    if "generator" not in states:
        raise ValueError(f"{root} has no generator weights ({files['generator']})")
    if config.use_vae and "encoder" not in states:
        raise ValueError(f"{root} is a VAE model (config has an encoder) but {files['encoder']} is missing")
    if not config.use_vae and "encoder" in states:
        raise ValueError(f"{root} has {files['encoder']} but its config has no encoder")
    model = build_model(config, discriminator="discriminator" in states)
    for name, state in states.items():
        net = getattr(model, name)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{root / files[name]} does not match the architecture in its config: {exc}") from exc
    return model.to(device).eval()


def _read_state(path: Path, ours: bool) -> dict[str, torch.Tensor]:
    if not ours:
        return nvlabs.load_net(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _not_a_checkpoint(root: Path) -> str:
    present = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
    return (
        f"{root} is not a checkpoint: expected {CONFIG_FILE} + {WEIGHT_FILES['generator']} (spade-ray) "
        f"or opt.txt + {nvlabs.NET_FILES['generator']} (NVlabs/SPADE); found {present}"
    )
