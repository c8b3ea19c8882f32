"""Checkpoints (our format and the reference's) and SpadeModel, the inference-facing bundle.

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

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import nvlabs
from .config import FORMAT_VERSION, ModelConfig
from .discriminator import MultiscaleDiscriminator
from .encoder import ConvEncoder
from .generator import SPADEGenerator
from .init import init_weights
from .semantics import ClassInfo, classes_for, instance_edges, label_channels, one_hot

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
WEIGHT_FILES = {"generator": "generator.safetensors", "encoder": "encoder.safetensors", "discriminator": "discriminator.safetensors"}


class SpadeModel(nn.Module):
    """Generator (+ VAE encoder, + discriminator) with the label semantics of its config."""

    def __init__(
        self,
        config: ModelConfig,
        generator: SPADEGenerator,
        encoder: ConvEncoder | None = None,
        discriminator: MultiscaleDiscriminator | None = None,
    ) -> None:
        super().__init__()
        if (encoder is None) != (config.encoder is None):
            raise ValueError("a VAE model (config.encoder set) needs an encoder, and only a VAE model takes one")
        self.config = config
        self.generator = generator
        self.encoder = encoder
        self.discriminator = discriminator
        self._fast: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def classes(self) -> ClassInfo:
        return classes_for(self.config.labels)

    def enable_fast_path(self, *, dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        """Route :meth:`synthesize` through the eval-only fast generator (see ``spade_core.fast``).

        It is built from the current weights: call it again after changing them.
        """
        from .fast import FastGenerator

        self._fast = FastGenerator(self.generator, label_config=self.config.labels, dtype=dtype, compile=compile)

    def disable_fast_path(self) -> None:
        self._fast = None

    @torch.inference_mode()
    def encode(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style images (B, 3, H, W) in [-1, 1] -> (mu, logvar), each (B, z_dim)."""
        if self.encoder is None:
            raise ValueError("this model has no style encoder (it was not trained as a VAE)")
        _check_images(style, "style")
        with _eval_mode(self.encoder):
            return self.encoder(style.to(self.device, torch.float32))

    @torch.inference_mode()
    def synthesize(
        self,
        labels: torch.Tensor,
        style: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        seed: int | None = None,
        instance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw label ids (B, H, W) -> images (B, 3, H, W) in [-1, 1] at the model's output size.

        VAE models: ``z`` is used as given; else with a ``style`` image z = mu (or a sample
        around mu drawn from ``seed``); else z ~ N(0, I) drawn from ``seed`` (random without
        one). Label maps of another size are resized (nearest) to the model's input first.
        """
        gen_cfg = self.config.generator
        batch = _batch_size(labels)
        z = self._style_code(batch, style=style, z=z, seed=seed)
        size = gen_cfg.output_size
        channels = label_channels(labels, self.config.labels).to(self.device)
        channels = _resize_ids(channels, size)
        edges = None
        if self.config.labels.instance_edges:
            if instance is None:
                raise ValueError("this model needs an instance map (B, H, W) for its instance-edge channel")
            if instance.shape != labels.shape:
                raise ValueError(f"instance map shape {tuple(instance.shape)} differs from labels {tuple(labels.shape)}")
            edges = instance_edges(_resize_ids(instance.to(self.device).long(), size))
        elif instance is not None:
            raise ValueError("this model takes no instance map (labels.instance_edges is false)")

        if self._fast is not None:
            return self._fast(channels, z=z, edges=edges)
        seg = one_hot(channels, self.config.labels.num_label_channels)
        if edges is not None:
            seg = torch.cat([seg, edges.unsqueeze(1).float()], dim=1)
        with _eval_mode(self.generator):
            return self.generator(seg, z=z)

    def _style_code(
        self, batch: int, *, style: torch.Tensor | None, z: torch.Tensor | None, seed: int | None
    ) -> torch.Tensor | None:
        z_dim = self.config.generator.z_dim
        if z_dim is None:
            if style is not None or z is not None:
                raise ValueError("this model has no style input (not a VAE model): pass neither style nor z")
            return None
        if z is not None:
            if style is not None:
                raise ValueError("pass either a style image or a style code z, not both")
            if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != (batch, z_dim):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"z must be a float tensor of shape ({batch}, {z_dim}), got {got}")
            return z.to(self.device, torch.float32)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if style is not None:
            _check_images(style, "style")
            if style.shape[0] != batch:
                raise ValueError(f"style must have shape ({batch}, 3, H, W) to match the labels, got {tuple(style.shape)}")
            mu, logvar = self.encode(style)
            if seed is None:
                return mu
            eps = torch.randn(mu.shape, generator=generator).to(self.device)
            return mu + eps * torch.exp(0.5 * logvar)
        return torch.randn(batch, z_dim, generator=generator).to(self.device)


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Inference is the eval-mode function (running statistics, no spectral-norm update),
    whatever mode the network is in for training; the mode is restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _batch_size(labels: torch.Tensor) -> int:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape (B, H, W), got {got}")
    return labels.shape[0]


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (B, 3, H, W) in [-1, 1]")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name} values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}] (scale x/255*2-1)")


def _resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an integer map (B, H, W), with the same pixel choice as ``F.interpolate``."""
    if tuple(ids.shape[-2:]) == tuple(size):
        return ids
    h, w = ids.shape[-2:]
    rows = (torch.arange(size[0], device=ids.device) * (h / size[0])).floor().long().clamp_max(h - 1)
    cols = (torch.arange(size[1], device=ids.device) * (w / size[1])).floor().long().clamp_max(w - 1)
    return ids[:, rows][:, :, cols]


# ---------------------------------------------------------------------------------------
# Building, saving, loading


def build_model(config: ModelConfig, *, discriminator: bool = True, seed: int | None = None) -> SpadeModel:
    """Fresh networks, initialised as the reference does for training from scratch."""
    if seed is not None:
        torch.manual_seed(seed)
    sem = config.semantic_nc
    gen = SPADEGenerator(config.generator, semantic_nc=sem)
    enc = ConvEncoder(config.encoder) if config.encoder is not None else None
    disc = MultiscaleDiscriminator(config.discriminator, semantic_nc=sem) if discriminator else None
    for net in (gen, enc, disc):
        if net is not None:
            init_weights(net)
    return SpadeModel(config, gen, enc, disc)


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
