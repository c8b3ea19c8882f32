"""One generator step and one discriminator step: plain functions of (networks, batch, losses).

They hold the reference's algorithm (pix2pix_model: compute_generator_loss /
compute_discriminator_loss) and know nothing of Ray, DDP or optimisers, so they are tested
without a cluster; the training loop wraps them with backward, optimiser steps and AMP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spade_core.config import LabelConfig
from spade_core.labelmap import LabelMap, label_map
from spade_core.losses import LossConfig, VGGLoss, feature_matching_loss, gan_loss, kld_loss, reparameterize
from spade_core.semantics import semantic_input


@dataclass
class Networks:
    """The trained networks (possibly DDP-wrapped); ``encoder`` only for VAE models."""

    generator: nn.Module
    discriminator: nn.Module
    encoder: nn.Module | None = None


def semantics_of(
    batch: dict[str, torch.Tensor], labels: LabelConfig, *, as_label_map: bool = False
) -> torch.Tensor | LabelMap:
    """The one-hot (+ instance edge) network input of a batch from the data pipeline.

    ``as_label_map``: the equivalent :class:`~spade_core.labelmap.LabelMap` instead, which
    the generator and discriminator take for their fast path (same function and gradients).
    """
    if as_label_map:
        return label_map(batch["label"], labels, instance=batch.get("instance"))
    return semantic_input(batch["label"], labels, instance=batch.get("instance"))


def generate(nets: Networks, semantics: torch.Tensor | LabelMap, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fake images and, for VAE models, the unweighted KLD of the real images' style codes."""
    if nets.encoder is None:
        return nets.generator(semantics), None
    mu, logvar = nets.encoder(real)
    z = reparameterize(mu, logvar)
    return nets.generator(semantics, z=z), kld_loss(mu, logvar)


def discriminate(
    discriminator: nn.Module, semantics: torch.Tensor | LabelMap, fake: torch.Tensor, real: torch.Tensor
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Fake and real through the discriminator in one batch (as the reference: batch-norm
    discriminators see both halves together), split back per scale and layer."""
    outputs = discriminator(torch.cat([fake, real], dim=0), semantics=semantics)  # a LabelMap's gather runs once for both
    n = fake.shape[0]
    pred_fake = [[f[:n] for f in scale] for scale in outputs]
    pred_real = [[f[n:] for f in scale] for scale in outputs]
    return pred_fake, pred_real


def generator_losses(
    nets: Networks,
    semantics: torch.Tensor | LabelMap,
    real: torch.Tensor,
    *,
    loss: LossConfig,
    vgg: VGGLoss | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Weighted generator loss terms (sum them to train) and the fake images."""
    fake, kld = generate(nets, semantics, real)
    pred_fake, pred_real = discriminate(nets.discriminator, semantics, fake, real)
    terms = {"G_GAN": gan_loss(pred_fake, target_is_real=True, for_discriminator=False, mode=loss.gan_mode)}
    if loss.use_feat_loss:
        terms["G_feat"] = feature_matching_loss(pred_fake, pred_real, lambda_feat=loss.lambda_feat)
    if loss.use_vgg_loss:
        if vgg is None:
            raise ValueError("the VGG loss is on but no VGG network was given (LossConfig.vgg_weights)")
        terms["G_VGG"] = vgg(fake, real) * loss.lambda_vgg
    if kld is not None:
        terms["KLD"] = kld * loss.lambda_kld
    return terms, fake


def discriminator_losses(
    nets: Networks, semantics: torch.Tensor | LabelMap, real: torch.Tensor, *, loss: LossConfig, fake: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Discriminator loss terms. Without ``fake``, new fakes are drawn without gradients, as the
    reference does; pass the generator step's fakes to save that forward pass."""
    if fake is None:
        with torch.no_grad():
            fake, _ = generate(nets, semantics, real)
    fake = fake.detach()
    pred_fake, pred_real = discriminate(nets.discriminator, semantics, fake, real)
    return {
        "D_fake": gan_loss(pred_fake, target_is_real=False, for_discriminator=True, mode=loss.gan_mode),
        "D_real": gan_loss(pred_real, target_is_real=True, for_discriminator=True, mode=loss.gan_mode),
    }
