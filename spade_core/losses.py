"""Training losses: adversarial (hinge / least squares / original), feature matching, KLD, VGG.

Semantics follow the NVlabs/SPADE reference (written here from its documented behaviour):

* Discriminator outputs come as :class:`~spade_core.discriminator.MultiscaleDiscriminator`
  returns them: a list over scales of lists of per-layer features, the last of which is
  the patch prediction. Adversarial losses use only the predictions, one loss per scale,
  averaged over scales.
* Weights: the GAN loss carries none; feature matching takes ``lambda_feat`` itself; the
  KLD and VGG losses are returned unweighted and the caller multiplies by ``lambda_kld`` /
  ``lambda_vgg``, as the reference does.

Pure PyTorch: no Ray, no torchvision (the VGG19 is defined here and loads torchvision's file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from .weights import read_state_dict, state_mismatch

GanMode = Literal["hinge", "ls", "original"]
GAN_MODES: tuple[str, ...] = ("hinge", "ls", "original")

# One scale's output: a bare prediction, or the list of every layer's output (prediction last).
ScaleOutput = Union[torch.Tensor, Sequence[torch.Tensor]]
DiscriminatorOutput = Union[torch.Tensor, Sequence[ScaleOutput]]

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"


@dataclass(frozen=True)
class LossConfig:
    """Which losses the generator trains with, and their weights (the reference's defaults).

    ``vgg_weights`` is the path to torchvision's ImageNet ``vgg19`` state dict. It may be
    None while the VGG loss is on: the config stays valid (e.g. written on a laptop, run on
    a cluster), and :func:`build_vgg_loss` says what is missing when the loss is built.
    """

    gan_mode: GanMode = "hinge"
    use_feat_loss: bool = True
    lambda_feat: float = 10.0
    use_vgg_loss: bool = True
    lambda_vgg: float = 10.0
    lambda_kld: float = 0.05
    vgg_weights: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require(self.gan_mode in GAN_MODES, f"loss.gan_mode must be one of {', '.join(GAN_MODES)}, got {self.gan_mode!r}")
        for name in ("use_feat_loss", "use_vgg_loss"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"loss.{name} must be true or false, got {value!r}")
        for name in ("lambda_feat", "lambda_vgg", "lambda_kld"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            _require(ok, f"loss.{name} must be a finite number >= 0, got {value!r}")
        _require(
            self.vgg_weights is None or (isinstance(self.vgg_weights, str) and self.vgg_weights != ""),
            f"loss.vgg_weights must be a non-empty path string or null, got {self.vgg_weights!r}",
        )


# ---------------------------------------------------------------------------------------
# Adversarial losses


def gan_loss(preds: DiscriminatorOutput, *, target_is_real: bool, for_discriminator: bool, mode: str) -> torch.Tensor:
    """Adversarial loss (a scalar) of discriminator output ``preds`` against a real or fake target.

    ``preds``: a prediction tensor, or a list over scales of predictions or of per-layer
    feature lists (the last entry is the prediction). Per scale: the mean over the batch of
    each sample's mean loss; then the mean over scales.

    hinge: discriminator real ``-mean(min(p - 1, 0))``, fake ``-mean(min(-p - 1, 0))``;
    generator ``-mean(p)`` (real target only). ls: squared error to 1 (real) / 0 (fake).
    original: binary cross entropy with logits to 1 / 0. For ls and original the generator
    side is the same formula; it passes ``target_is_real=True``.
    """
    if mode not in GAN_MODES:
        raise ValueError(f"GAN loss mode must be one of {', '.join(GAN_MODES)}, got {mode!r}")
    if mode == "hinge" and not for_discriminator and not target_is_real:
        raise ValueError("the generator's hinge loss is only defined against the real target (target_is_real=True)")
    scales = _predictions(preds)
    total = sum(_scale_loss(p, target_is_real=target_is_real, for_discriminator=for_discriminator, mode=mode) for p in scales)
    return total / len(scales)


def _predictions(preds: DiscriminatorOutput) -> list[torch.Tensor]:
    if isinstance(preds, torch.Tensor):
        return [preds]
    if not isinstance(preds, Sequence) or len(preds) == 0:
        raise ValueError("discriminator output must be a tensor or a non-empty list over scales")
    out = []
    for i, scale in enumerate(preds):
        if isinstance(scale, Sequence) and not isinstance(scale, torch.Tensor):
            if len(scale) == 0:
                raise ValueError(f"discriminator output for scale {i} is an empty list")
            scale = scale[-1]
        if not isinstance(scale, torch.Tensor):
            raise ValueError(f"discriminator prediction for scale {i} must be a tensor, got {type(scale).__name__}")
        out.append(scale)
    return out


def _scale_loss(pred: torch.Tensor, *, target_is_real: bool, for_discriminator: bool, mode: str) -> torch.Tensor:
    if mode == "hinge":
        if not for_discriminator:
            per_element = -pred
        elif target_is_real:
            per_element = -torch.clamp(pred - 1, max=0)
        else:
            per_element = -torch.clamp(-pred - 1, max=0)
    else:
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        if mode == "ls":
            per_element = F.mse_loss(pred, target, reduction="none")
        else:
            per_element = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    # Each sample's mean first, then the batch mean: the reference's reduction.
    batch = per_element.shape[0] if per_element.dim() > 0 else 1
    return per_element.reshape(batch, -1).mean(dim=1).mean()


def feature_matching_loss(
    pred_fake: Sequence[Sequence[torch.Tensor]], pred_real: Sequence[Sequence[torch.Tensor]], *, lambda_feat: float
) -> torch.Tensor:
    """Sum over scales i and intermediate layers j of ``L1(fake[i][j], real[i][j]) * lambda_feat / num_scales``.

    The predictions (last entries) take no part. Real features are detached: this loss
    trains the generator only.
    """
    if len(pred_fake) == 0 or len(pred_fake) != len(pred_real):
        raise ValueError(
            "feature matching needs the same non-zero number of scales for fake and real, "
            f"got {len(pred_fake)} and {len(pred_real)}"
        )
    num_scales = len(pred_fake)
    for i, (fake, real) in enumerate(zip(pred_fake, pred_real)):
        if isinstance(fake, torch.Tensor) or isinstance(real, torch.Tensor) or len(fake) == 0 or len(fake) != len(real):
            raise ValueError(f"feature matching needs per-layer feature lists of equal length at scale {i}")
    loss = pred_fake[0][-1].new_zeros(())
    for i, (fake, real) in enumerate(zip(pred_fake, pred_real)):
        for j in range(len(fake) - 1):
            if fake[j].shape != real[j].shape:
                raise ValueError(
                    f"feature shapes differ at scale {i}, layer {j}: {tuple(fake[j].shape)} vs {tuple(real[j].shape)}"
                )
            loss = loss + F.l1_loss(fake[j], real[j].detach()) * (lambda_feat / num_scales)
    return loss


# ---------------------------------------------------------------------------------------
# VAE


def kld_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over batch and dimensions (unweighted: times lambda_kld)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mu + eps * exp(0.5 * logvar)`` with eps ~ N(0, I), drawn from ``generator`` when given."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else mu.device
    eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    return mu + eps * torch.exp(0.5 * logvar)


# ---------------------------------------------------------------------------------------
# VGG19 perceptual loss

# torchvision's vgg19 "E" layout: conv widths, "M" for a 2x2 max pool.
_VGG19_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
# Indices in ``features`` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (the ends of the
# torchvision slices [0:2], [2:7], [7:12], [12:21], [21:30]).
_VGG19_TAPS: tuple[int, ...] = (1, 6, 11, 20, 29)
VGG_LAYER_WEIGHTS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class VGG19Features(nn.Module):
    """torchvision's ``vgg19().features`` (same ``features.{idx}`` keys), returning relu1_1..relu5_1.

    Only the first 30 layers run; the rest exist so that torchvision's file loads strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for idx, layer in enumerate(self.features[: _VGG19_TAPS[-1] + 1]):
            x = layer(x)
            if idx in _VGG19_TAPS:
                outputs.append(x)
        return outputs


def _where_to_get_vgg() -> str:
    return (
        f"the VGG loss needs torchvision's ImageNet vgg19 weights ({VGG19_FILE}, from {VGG19_URL}; torchvision "
        f"caches it in ~/.cache/torch/hub/checkpoints/): point LossConfig.vgg_weights at that file, "
        f"or set use_vgg_loss=False"
    )


def load_vgg19(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> VGG19Features:
    """A frozen :class:`VGG19Features` in eval mode from torchvision's vgg19 state-dict file.

    ``classifier.*`` entries are ignored; every ``features.*`` entry must be there with
    torchvision's shape (vgg19, not vgg19_bn or another depth), and nothing else.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise ValueError(f"VGG19 weights {file} {what}; {_where_to_get_vgg()}")
    state = read_state_dict(file, what="VGG19 weights", hint=_where_to_get_vgg())
    # Loaded in float32 whatever the file holds: the loss runs on float32 images.
    features = {k: v.float() for k, v in state.items() if not k.startswith("classifier.")}
    # Built on the meta device and filled by assignment: no random init of 20M weights to throw away.
    with torch.device("meta"):
        vgg = VGG19Features()
    problems = state_mismatch(features, {k: tuple(v.shape) for k, v in vgg.state_dict().items()})
    if problems:
        raise ValueError(
            f"VGG19 weights {file} do not match torchvision's vgg19 features (conv weights and biases at "
            f"features.0..34; vgg19_bn and other depths differ): {problems}; {_where_to_get_vgg()}"
        )
    vgg.load_state_dict(features, strict=True, assign=True)
    return vgg.requires_grad_(False).eval().to(device)


class VGGLoss(nn.Module):
    """Weighted L1 between the VGG19 features (relu1_1..relu5_1) of ``x`` and ``y``; unweighted by lambda_vgg.

    Images in [-1, 1] go into the VGG as they are, without ImageNet mean/std normalisation:
    a deliberate match with the reference, whose trained models and loss scale assume it.

    ``weights``: the torchvision vgg19 file, or an already-built :class:`VGG19Features`
    (which is frozen and put in eval mode here). ``device``: where to put the VGG; by
    default a loaded one goes to the CPU and a given one stays where it is.
    """

    def __init__(
        self, weights: str | os.PathLike[str] | VGG19Features | None, *, device: str | torch.device | None = None
    ) -> None:
        super().__init__()
        if weights is None:
            raise ValueError(f"no VGG19 weights given; {_where_to_get_vgg()}")
        if isinstance(weights, VGG19Features):
            vgg = weights.requires_grad_(False).eval()
            if device is not None:
                vgg = vgg.to(device)
        else:
            vgg = load_vgg19(weights, device=device if device is not None else "cpu")
        self.vgg = vgg

    def train(self, mode: bool = True) -> VGGLoss:
        # The VGG is a fixed feature extractor: it stays in eval mode whatever the trainer sets.
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``: generated images, ``y``: real ones, both (B, 3, H, W) in [-1, 1]; gradients reach ``x`` only."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG loss needs two (B, 3, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:  # four 2x poolings come before relu5_1
            raise ValueError(f"VGG loss needs images of at least 16x16, got {tuple(x.shape[-2:])}")
        x_feats = self.vgg(x)
        # The target side needs no graph: same gradients as detaching its features, less memory.
        with torch.no_grad():
            y_feats = self.vgg(y)
        loss = x.new_zeros(())
        for weight, fx, fy in zip(VGG_LAYER_WEIGHTS, x_feats, y_feats):
            loss = loss + weight * F.l1_loss(fx, fy)
        return loss


def build_vgg_loss(config: LossConfig, *, device: str | torch.device = "cpu") -> VGGLoss | None:
    """The VGG loss ``config`` asks for (None when ``use_vgg_loss`` is off)."""
    if not config.use_vgg_loss:
        return None
    if config.vgg_weights is None:
        raise ValueError(f"use_vgg_loss is on but loss.vgg_weights is not set; {_where_to_get_vgg()}")
    return VGGLoss(config.vgg_weights, device=device)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
