"""The reference's generator and discriminator steps, without Ray."""

from __future__ import annotations

import pytest
import torch

import spade_core
from spade_core.config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig
from spade_core.losses import LossConfig, VGG19Features, VGGLoss
from train_job.steps import Networks, discriminator_losses, generator_losses, semantics_of


def tiny(vae: bool) -> tuple[spade_core.SpadeModel, Networks]:
    config = ModelConfig(
        labels=LabelConfig(label_nc=6),
        generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=16 if vae else None),
        encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64) if vae else None,
        discriminator=DiscriminatorConfig(ndf=8, n_layers=3),
    )
    model = spade_core.build_model(config, seed=0).train()
    return model, Networks(model.generator, model.discriminator, model.encoder)


def batch() -> dict[str, torch.Tensor]:
    return {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "label": torch.randint(0, 7, (2, 64, 64))}


@pytest.mark.parametrize("vae", [False, True])
def test_generator_step_terms_and_gradients(vae: bool) -> None:
    model, nets = tiny(vae)
    b = batch()
    sem = semantics_of(b, model.config.labels)
    terms, fake = generator_losses(nets, sem, b["image"], loss=LossConfig(use_vgg_loss=False), vgg=None)
    assert set(terms) == ({"G_GAN", "G_feat", "KLD"} if vae else {"G_GAN", "G_feat"})
    assert fake.shape == (2, 3, 64, 64)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    if vae:
        assert model.encoder.fc_mu.weight.grad is not None and float(terms["KLD"].detach()) > 0


def test_discriminator_step_trains_only_the_discriminator() -> None:
    model, nets = tiny(vae=True)
    b = batch()
    sem = semantics_of(b, model.config.labels)
    terms = discriminator_losses(nets, sem, b["image"], loss=LossConfig(use_vgg_loss=False))
    assert set(terms) == {"D_fake", "D_real"}
    # hinge: each term is at least 0, and around 1 for an untrained discriminator
    assert all(0 <= float(v.detach()) < 3 for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())


def test_vgg_term_needs_a_network_and_uses_lambda() -> None:
    model, nets = tiny(vae=False)
    b = batch()
    sem = semantics_of(b, model.config.labels)
    with pytest.raises(ValueError, match="VGG"):
        generator_losses(nets, sem, b["image"], loss=LossConfig(), vgg=None)
    vgg = VGGLoss(VGG19Features())  # random weights on purpose: real ones cannot be downloaded here
    torch.manual_seed(1)
    terms, _ = generator_losses(nets, sem, b["image"], loss=LossConfig(lambda_vgg=10.0), vgg=vgg)
    torch.manual_seed(1)
    terms2, _ = generator_losses(nets, sem, b["image"], loss=LossConfig(lambda_vgg=5.0), vgg=vgg)
    assert float(terms["G_VGG"].detach()) > 0
    torch.testing.assert_close(terms["G_VGG"], terms2["G_VGG"] * 2)
