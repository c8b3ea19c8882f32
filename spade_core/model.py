"""SpadeModel: the inference-facing bundle (generator, VAE encoder, discriminator) and the one
input contract every caller goes through.

``check_inputs`` holds every rule a synthesis input must meet, with the message a user sees
(the CLI, the HTTP API and a notebook show the same words); ``sample_z`` is the one way a seed
becomes a style code, so ``spade-synthesize --seed 3``, ``POST /v1/synthesize seed=3`` and
``model.synthesize(labels, seed=3)`` draw the same image. diffusers' pipelines keep their
``check_inputs`` and ``randn_tensor`` the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import ModelConfig
from .discriminator import MultiscaleDiscriminator
from .encoder import ConvEncoder
from .generator import SPADEGenerator
from .init import init_weights
from .semantics import INTEGER_DTYPES, ClassInfo, classes_for, instance_edges, label_channels, one_hot

NO_STYLE_INPUT = "this model has no style input (not a VAE model): send neither a style image nor a style code"


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

    # --- the input contract -----------------------------------------------------------------

    def check_inputs(
        self,
        labels: torch.Tensor,
        *,
        style: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        instance: torch.Tensor | None = None,
    ) -> None:
        """ValueError, saying what is wrong, unless these are inputs :meth:`synthesize` takes:

        - ``labels``: integer tensor (B, H, W) of raw ids the model has a channel for (any size:
          synthesis resizes it, nearest, to the model's input);
        - ``z`` (B, z_dim) finite floats or ``style`` images (B, 3, H, W) in [-1, 1], not both,
          and neither for a model without an encoder;
        - ``instance``: integer ids of the labels' shape, exactly when the model uses instance edges.
        """
        batch = _batch_size(labels)
        label_channels(labels, self.config.labels)  # integer ids the model has a channel for, else it names them
        z_dim = self.config.generator.z_dim
        if z_dim is None and (style is not None or z is not None):
            raise ValueError(NO_STYLE_INPUT)
        if z is not None and style is not None:
            raise ValueError("pass either a style image or a style code z, not both")
        if z is not None:
            if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != (batch, z_dim):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"z must be a float tensor of shape ({batch}, {z_dim}), got {got}")
            if not bool(torch.isfinite(z).all()):
                raise ValueError("z must be finite (no NaN or infinity)")
        if style is not None:
            _check_images(style, "style")
            if style.shape[0] != batch:
                raise ValueError(f"style must have shape ({batch}, 3, H, W) to match the labels, got {tuple(style.shape)}")
        if self.config.labels.instance_edges:
            if instance is None:
                raise ValueError("this model needs an instance map (B, H, W) for its instance-edge channel")
            if not isinstance(instance, torch.Tensor) or instance.dtype not in INTEGER_DTYPES:
                raise ValueError("the instance map must be an integer tensor of ids")
            if instance.shape != labels.shape:
                raise ValueError(f"instance map shape {tuple(instance.shape)} differs from labels {tuple(labels.shape)}")
        elif instance is not None:
            raise ValueError("this model takes no instance map (labels.instance_edges is false)")

    def sample_z(
        self,
        batch: int,
        *,
        seed: int | None = None,
        mu: torch.Tensor | None = None,
        logvar: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The style code (batch, z_dim) of a VAE model, None for the others.

        Without ``mu``: z ~ N(0, I) drawn from ``seed`` (random without one). With ``mu`` (an
        encoded style): ``mu`` itself without a seed or without ``logvar``, else a sample
        ``mu + eps * exp(logvar / 2)`` with eps drawn from ``seed``. Drawn on the CPU with
        torch's generator, so a seed gives the same code on every device.
        """
        z_dim = self.config.generator.z_dim
        if z_dim is None:
            if mu is not None:
                raise ValueError(NO_STYLE_INPUT)
            return None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if mu is None:
            return torch.randn(batch, z_dim, generator=generator).to(self.device)
        for name, value in (("mu", mu), ("logvar", logvar)):
            if value is not None and (not value.is_floating_point() or tuple(value.shape) != (batch, z_dim)
                                      or not bool(torch.isfinite(value).all())):
                raise ValueError(f"the style code's {name} must be {batch} x {z_dim} finite numbers, got {tuple(value.shape)}")
        mu = mu.to(self.device, torch.float32)
        if seed is None or logvar is None:
            return mu
        eps = torch.randn(mu.shape, generator=generator).to(self.device)
        return mu + eps * torch.exp(0.5 * logvar.to(self.device, torch.float32))

    # --- inference --------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style images (B, 3, H, W) in [-1, 1] -> (mu, logvar), each (B, z_dim)."""
        if self.encoder is None:
            raise ValueError(NO_STYLE_INPUT)
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
        one): see :meth:`sample_z`. Label maps of another size are resized (nearest) to the
        model's input first. Inputs are checked by :meth:`check_inputs`.
        """
        self.check_inputs(labels, style=style, z=z, instance=instance)
        batch = labels.shape[0]
        if z is None:
            mu, logvar = self.encode(style) if style is not None else (None, None)
            z = self.sample_z(batch, seed=seed, mu=mu, logvar=logvar)
        else:
            z = z.to(self.device, torch.float32)
        size = self.config.generator.output_size
        channels = resize_ids(label_channels(labels, self.config.labels).to(self.device), size)
        edges = None
        if instance is not None:
            edges = instance_edges(resize_ids(instance.to(self.device).long(), size))

        if self._fast is not None:
            return self._fast(channels, z=z, edges=edges)
        semantics = one_hot(channels, self.config.labels.num_label_channels)
        if edges is not None:
            semantics = torch.cat([semantics, edges.unsqueeze(1).float()], dim=1)
        with _eval_mode(self.generator):
            return self.generator(semantics, z=z)


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


def resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an integer map (..., H, W) to ``size``, picking the pixels ``F.interpolate``
    picks (which takes no integer tensors): the one id resize of synthesis and serving."""
    if tuple(ids.shape[-2:]) == tuple(size):
        return ids
    h, w = ids.shape[-2:]
    rows = (torch.arange(size[0], device=ids.device) * (h / size[0])).floor().long().clamp_max(h - 1)
    cols = (torch.arange(size[1], device=ids.device) * (w / size[1])).floor().long().clamp_max(w - 1)
    return ids[..., rows, :][..., cols]


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
