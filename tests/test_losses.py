"""Training losses: hand-computed values on tiny tensors, and the VGG19 file contract.

The VGG tests use random weights on purpose: the real ImageNet file cannot be fetched here,
and what matters is that torchvision's key layout loads strictly and the loss behaves.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spade_core.losses import (
    LossConfig,
    VGG19Features,
    VGGLoss,
    build_vgg_loss,
    feature_matching_loss,
    gan_loss,
    kld_loss,
    load_vgg19,
    reparameterize,
)

# torchvision vgg19().features: a conv at each of these indices (ReLUs and pools between).
TORCHVISION_VGG19_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TORCHVISION_VGG19_FEATURE_KEYS = [f"features.{i}.{p}" for i in TORCHVISION_VGG19_CONV_INDICES for p in ("weight", "bias")]

# Predictions (B=2, 1 channel, 1x2 patches): sample 0 = [0.5, 2.0], sample 1 = [-1.0, 0.0].
PRED = torch.tensor([0.5, 2.0, -1.0, 0.0]).reshape(2, 1, 1, 2)


def gan(preds, mode: str, *, real: bool, disc: bool) -> float:  # type: ignore[no-untyped-def]
    return gan_loss(preds, target_is_real=real, for_discriminator=disc, mode=mode).item()


# ---------------------------------------------------------------------------------------
# Config


def test_loss_config_defaults_are_the_reference_ones() -> None:
    cfg = LossConfig()
    assert (cfg.gan_mode, cfg.lambda_feat, cfg.lambda_vgg, cfg.lambda_kld) == ("hinge", 10.0, 10.0, 0.05)
    assert cfg.use_feat_loss and cfg.use_vgg_loss and cfg.vgg_weights is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gan_mode": "wgan"}, "gan_mode"),
        ({"lambda_feat": -1.0}, "lambda_feat"),
        ({"lambda_vgg": -0.1}, "lambda_vgg"),
        ({"lambda_kld": float("nan")}, "lambda_kld"),
        ({"use_vgg_loss": "yes"}, "use_vgg_loss"),
        ({"vgg_weights": ""}, "vgg_weights"),
    ],
)
def test_loss_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


def test_vgg_loss_without_weights_fails_when_built_not_when_configured() -> None:
    cfg = LossConfig(use_vgg_loss=True, vgg_weights=None)  # a valid config
    with pytest.raises(ValueError, match=r"vgg_weights.*vgg19-dcbb9e9d\.pth"):
        build_vgg_loss(cfg)
    assert build_vgg_loss(LossConfig(use_vgg_loss=False)) is None
    with pytest.raises(ValueError, match="vgg19"):
        VGGLoss(None)


# ---------------------------------------------------------------------------------------
# Adversarial losses


def test_hinge_values() -> None:
    # real: -min(p-1, 0) = [0.5, 0, 2, 1] -> sample means 0.25, 1.5 -> 0.875
    assert gan(PRED, "hinge", real=True, disc=True) == pytest.approx(0.875)
    # fake: -min(-p-1, 0) = [1.5, 3, 0, 1] -> sample means 2.25, 0.5 -> 1.375
    assert gan(PRED, "hinge", real=False, disc=True) == pytest.approx(1.375)
    # generator: -mean(p)
    assert gan(PRED, "hinge", real=True, disc=False) == pytest.approx(-0.375)


def test_hinge_generator_needs_the_real_target() -> None:
    with pytest.raises(ValueError, match="target_is_real"):
        gan_loss(PRED, target_is_real=False, for_discriminator=False, mode="hinge")


def test_least_squares_values() -> None:
    # (p-1)^2 = [0.25, 1, 4, 1] -> 1.5625; p^2 = [0.25, 4, 1, 0] -> 1.3125
    assert gan(PRED, "ls", real=True, disc=True) == pytest.approx(1.5625)
    assert gan(PRED, "ls", real=False, disc=True) == pytest.approx(1.3125)
    assert gan(PRED, "ls", real=True, disc=False) == pytest.approx(1.5625)


def test_original_values() -> None:
    # logits [0, ln 3]: sigmoid = [1/2, 3/4]
    pred = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 1, 2)
    assert gan(pred, "original", real=True, disc=True) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert gan(pred, "original", real=False, disc=True) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert gan(pred, "original", real=True, disc=False) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)


def test_multiscale_output_uses_last_entry_and_averages_over_scales() -> None:
    # Scale 1 has fewer patch elements: averaging per scale (not pooling every element) matters.
    scale0 = [torch.full((2, 4, 3, 3), 100.0), PRED]  # an intermediate feature, then the prediction
    scale1 = [torch.tensor([3.0, -3.0]).reshape(2, 1, 1, 1)]
    # real hinge: scale 0 -> 0.875; scale 1 -> [0, 4] -> 2.0; mean 1.4375 (pooled would be 1.25)
    assert gan([scale0, scale1], "hinge", real=True, disc=True) == pytest.approx(1.4375)
    # bare predictions per scale work the same
    assert gan([PRED, scale1[0]], "hinge", real=True, disc=True) == pytest.approx(1.4375)
    # generator hinge: (-0.375 + 0) / 2
    assert gan([scale0, scale1], "hinge", real=True, disc=False) == pytest.approx(-0.1875)


def test_gan_loss_rejects_unknown_mode_and_empty_output() -> None:
    with pytest.raises(ValueError, match="hinge, ls, original"):
        gan_loss(PRED, target_is_real=True, for_discriminator=True, mode="wgan")
    with pytest.raises(ValueError, match="non-empty"):
        gan_loss([], target_is_real=True, for_discriminator=True, mode="hinge")


# ---------------------------------------------------------------------------------------
# Feature matching, KLD


def test_feature_matching_value_and_gradients_reach_fake_only() -> None:
    fake0 = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2).requires_grad_()
    real0 = torch.zeros(1, 1, 1, 2, requires_grad=True)
    fake1, real1 = torch.full((1, 1, 1, 2), 3.0), torch.ones(1, 1, 1, 2)
    fake2, real2 = torch.zeros(1, 1, 2, 2), torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    pred_fake = [[fake0, fake1, torch.full((1, 1, 1, 1), 9.0)], [fake2, torch.full((1, 1, 1, 1), 9.0)]]
    pred_real = [[real0, real1, torch.zeros(1, 1, 1, 1)], [real2, torch.zeros(1, 1, 1, 1)]]
    loss = feature_matching_loss(pred_fake, pred_real, lambda_feat=10.0)
    # L1s 1.5 + 2 (scale 0) + 1 (scale 1), predictions ignored, each times 10 / 2 scales
    assert loss.item() == pytest.approx(22.5)
    loss.backward()
    assert real0.grad is None
    assert torch.allclose(fake0.grad, torch.full((1, 1, 1, 2), 2.5))  # sign * 5 / 2 elements


def test_feature_matching_rejects_mismatched_scales() -> None:
    feats = [[torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)]]
    with pytest.raises(ValueError, match="number of scales"):
        feature_matching_loss(feats, feats * 2, lambda_feat=10.0)


def test_kld() -> None:
    assert kld_loss(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    mu = torch.tensor([[1.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # terms 1 + logvar - mu^2 - exp(logvar): -1 and -5 + ln 2 -> -0.5 * sum = 3 - ln(2) / 2
    assert kld_loss(mu, logvar).item() == pytest.approx(3 - math.log(2) / 2)


def test_reparameterize_is_mu_plus_scaled_noise_from_the_generator() -> None:
    mu, logvar = torch.ones(2, 3), torch.full((2, 3), math.log(4.0))
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(z, 1 + 2 * eps)


# ---------------------------------------------------------------------------------------
# VGG19


@pytest.fixture(scope="module")
def vgg() -> VGG19Features:
    torch.manual_seed(0)
    return VGG19Features()


@pytest.fixture(scope="module")
def vgg_file(vgg: VGG19Features, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-shaped vgg19 file (random weights) including classifier entries."""
    state = dict(vgg.state_dict())
    state["classifier.0.weight"] = torch.zeros(4, 2)
    state["classifier.0.bias"] = torch.zeros(4)
    path = tmp_path_factory.mktemp("vgg") / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path


def test_vgg19_keys_are_torchvision_features_keys(vgg: VGG19Features) -> None:
    assert list(vgg.state_dict()) == TORCHVISION_VGG19_FEATURE_KEYS
    assert len(vgg.features) == 37  # torchvision's features, final pool included


def test_vgg19_returns_relu1_1_to_relu5_1(vgg: VGG19Features) -> None:
    with torch.no_grad():
        feats = vgg(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]


def test_load_vgg19_ignores_classifier_and_freezes(vgg: VGG19Features, vgg_file: Path) -> None:
    loaded = load_vgg19(vgg_file)
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    got = loaded.state_dict()
    assert list(got) == TORCHVISION_VGG19_FEATURE_KEYS
    assert all(torch.equal(got[key], value) for key, value in vgg.state_dict().items())


def test_load_vgg19_missing_file_says_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*vgg19-dcbb9e9d\.pth.*vgg_weights"):
        load_vgg19(tmp_path / "nope.pth")


def test_load_vgg19_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "vgg19.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"not a loadable state dict.*vgg19"):
        load_vgg19(bad)


def test_load_vgg19_wrong_keys_or_shapes(tmp_path: Path) -> None:
    partial = tmp_path / "partial.pth"
    # vgg19_bn-like: a norm layer at index 1, the rest absent
    state = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}
    torch.save({**state, "features.1.running_mean": torch.zeros(64)}, partial)
    expected = r"torchvision's vgg19.*missing features\.2\.weight.*\(30 in all\); unexpected features\.1\.running_mean"
    with pytest.raises(ValueError, match=expected):
        load_vgg19(partial)
    wrong = tmp_path / "wrong.pth"
    state = {k: torch.zeros(1) for k in TORCHVISION_VGG19_FEATURE_KEYS}
    torch.save(state, wrong)
    expected = r"wrong shape for features\.0\.weight \(1,\) \(expected \(64, 3, 3, 3\)\).*vgg19-dcbb9e9d\.pth"
    with pytest.raises(ValueError, match=expected):
        load_vgg19(wrong)


def test_vgg_loss_from_file(vgg_file: Path) -> None:
    loss = build_vgg_loss(LossConfig(vgg_weights=str(vgg_file)))
    assert isinstance(loss, VGGLoss)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert loss(x, x).item() == 0.0


def test_vgg_loss_is_weighted_l1_of_features(vgg: VGG19Features) -> None:
    loss = VGGLoss(vgg)
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fx, fy = vgg(x), vgg(y)
        expected = sum(w * (a - b).abs().mean() for w, a, b in zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0], fx, fy))
        got = loss(x, y)
    assert got.item() > 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
    assert loss(x, x).item() == 0.0


def test_vgg_loss_backpropagates_to_x_only_on_a_64px_batch(vgg: VGG19Features) -> None:
    loss_fn = VGGLoss(vgg)
    loss_fn.train()
    assert not loss_fn.vgg.training
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    y = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    loss = loss_fn(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None
    assert all(p.grad is None for p in loss_fn.parameters())


def test_vgg_loss_rejects_mismatched_images(vgg: VGG19Features) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        VGGLoss(vgg)(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        VGGLoss(vgg)(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
