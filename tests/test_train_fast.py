"""The trainable fast path (LabelMap gathers, fused SPADE modulation, fused spectral norm,
channels_last, bf16 autocast) computes the plain path's function and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import spade_core
from spade_core.config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from spade_core.labelmap import LabelMap, label_map
from spade_core.losses import LossConfig, VGG19Features, VGGLoss
from spade_core.norms import set_fast_training
from spade_core.processors import FusedProcessor
from spade_core.spectral import SpectralNorm
from spade_core.semantics import semantic_input
from spade_core.testing import randomize_weights
from train_job.steps import Networks, discriminator_losses, generator_losses, semantics_of

D = DiscriminatorConfig(ndf=8, n_layers=3, num_D=2)

CONFIGS = {
    "batch-k3-label-fc": ModelConfig(
        labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=128, spade=SpadeConfig(hidden=16)), discriminator=D
    ),
    "instance-k5-vae": ModelConfig(
        labels=LabelConfig(label_nc=12),
        generator=GeneratorConfig(ngf=8, crop_size=128, z_dim=16, spade=SpadeConfig(norm="instance", kernel_size=5, hidden=16)),
        encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64),
        discriminator=D,
    ),
    "edges-batch-k5": ModelConfig(
        labels=LabelConfig(label_nc=9, instance_edges=True, dataset="coco_stuff"),
        generator=GeneratorConfig(ngf=8, crop_size=128, spade=SpadeConfig(kernel_size=5, hidden=16)),
        discriminator=DiscriminatorConfig(ndf=8, n_layers=3, num_D=3),
    ),
    "edges-instance-more-no-spectral": ModelConfig(
        labels=LabelConfig(label_nc=9, instance_edges=True, contain_dontcare_label=False, dataset="coco_stuff"),
        generator=GeneratorConfig(
            ngf=8, crop_size=256, num_upsampling_layers="more", spectral_norm=False, spade=SpadeConfig(norm="instance", hidden=16)
        ),
        discriminator=DiscriminatorConfig(ndf=8, n_layers=2, num_D=2, spectral_norm=False),
    ),
}


def make_batch(config: ModelConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = config.generator.output_size
    labels = torch.randint(0, config.labels.num_label_channels, (batch, h // 8, w // 8), generator=g)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    if config.labels.contain_dontcare_label:
        labels[0, :5, :7] = 255
    out = {"image": torch.rand(batch, 3, h, w, generator=g) * 2 - 1, "label": labels}
    if config.labels.instance_edges:
        inst = torch.randint(0, 4, (batch, h // 4, w // 4), generator=g)
        out["instance"] = inst.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return out


def model_for(name: str) -> spade_core.SpadeModel:
    return randomize_weights(spade_core.build_model(CONFIGS[name], seed=1), seed=2).train()


def fast_copy(model: spade_core.SpadeModel, *, channels_last: bool = False) -> spade_core.SpadeModel:
    fast = set_fast_training(copy.deepcopy(model))
    return fast.to(memory_format=torch.channels_last) if channels_last else fast


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(fast: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], *, rel: float = 1e-5) -> None:
    """Every gradient within ``rel`` (relative norm of the difference) of the plain one, and
    elementwise within rtol 1e-4 / atol ``rel`` x the largest entry of the network.

    Gradients that are exactly zero in exact arithmetic (biases a following batch norm
    cancels, whose gradients are pure rounding noise) pass no relative test of their own:
    the norm test covers the tensors with a norm at least 1e-3 of the largest one.
    """
    assert fast.keys() == plain.keys()
    scale = max(float(g.abs().max()) for g in plain.values())
    largest = max(float(g.norm()) for g in plain.values())
    for name, g in plain.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-4, atol=rel * scale, msg=lambda m, n=name: f"{n}: {m}")
        if float(g.norm()) >= 1e-3 * largest:
            err = float((fast[name] - g).norm() / g.norm())
            assert err <= rel, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------
# The gathered convolutions


@pytest.mark.parametrize("edges", [False, True])
@pytest.mark.parametrize(
    "kernel,stride,padding,pool_levels,size",
    [(3, 1, 1, 0, None), (5, 1, 2, 0, None), (3, 1, 1, 0, (5, 7)), (3, 1, 1, 0, (40, 36)), (4, 2, 2, 0, None), (4, 2, 2, 1, None), (4, 2, 2, 2, None)],
)
def test_label_map_conv_equals_dense_conv(edges: bool, kernel: int, stride: int, padding: int, pool_levels: int, size) -> None:
    g = torch.Generator().manual_seed(kernel + 10 * pool_levels)
    channels = torch.randint(0, 7, (2, 20, 18), generator=g)
    lm = LabelMap(channels, 7, torch.rand(2, 20, 18, generator=g) > 0.7 if edges else None)
    dense = lm.dense(torch.float64)
    if size is not None:
        dense = F.interpolate(dense, size=size, mode="nearest")
    for _ in range(pool_levels):
        dense = F.avg_pool2d(dense, 3, stride=2, padding=1, count_include_pad=False)
    weight = torch.randn(5, lm.semantic_nc, kernel, kernel, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    expected = F.conv2d(dense, weight, bias, stride, padding)
    out = lm.conv(weight, bias, size=size, stride=stride, padding=padding, pool_levels=pool_levels)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    up = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (weight, bias), up), torch.autograd.grad(expected, (weight, bias), up)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # the backward sums in float32


def test_label_map_matches_semantic_input() -> None:
    config = CONFIGS["edges-batch-k5"]
    b = make_batch(config)
    lm = label_map(b["label"], config.labels, instance=b["instance"])
    assert lm.semantic_nc == config.labels.semantic_nc
    torch.testing.assert_close(lm.dense(), semantic_input(b["label"], config.labels, instance=b["instance"]))
    with pytest.raises(ValueError, match="instance"):
        label_map(b["label"], config.labels)
    with pytest.raises(ValueError, match="int64"):
        LabelMap(b["label"].int(), 10)


# ---------------------------------------------------------------------------------------
# Generator and discriminator: fast == plain, fp32, train mode


# float64 shows that the function and the gradients are the same up to rounding, strictly.
# float32 has the brief's tolerance for the images, but its gradients cannot be compared at
# 1e-5: rounding-level differences (1e-5 in the images; the plain path in channels_last
# alone moves that much) flip some ReLU / leaky ReLU whose input is that close to zero, over
# a whole label region, and that moves gradients by up to ~1e-2. The plain path does the
# same to itself when its weights move by 1e-7 (relative). So float32 gradients are checked
# loosely (global relative error <= 1e-2), and exactly in float64.
TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (3e-5, None)}  # (image atol, gradient rel)
CASES = [(name, dtype, cl) for name in sorted(CONFIGS) for dtype in (torch.float64, torch.float32) for cl in (False, True)]


def assert_grads_roughly_close(fast: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], *, rel: float = 1e-2) -> None:
    assert fast.keys() == plain.keys()
    a = torch.cat([plain[n].flatten() for n in plain])
    b = torch.cat([fast[n].flatten() for n in plain])
    err = float((a - b).norm() / a.norm())
    assert err <= rel, f"global gradient relative error {err:.2e}"
    assert all(torch.isfinite(g).all() for g in fast.values())


@pytest.mark.parametrize("name,dtype,channels_last", CASES)
def test_generator_forward_and_gradients_match(name: str, dtype: torch.dtype, channels_last: bool) -> None:
    plain = model_for(name).to(dtype)
    fast = fast_copy(plain, channels_last=channels_last)
    config = plain.config
    b = make_batch(config)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, config.generator.z_dim, generator=g, dtype=dtype) if config.generator.z_dim else None
    up = torch.randn(b["image"].shape, generator=g, dtype=dtype)

    out_plain = plain.generator(semantics_of(b, config.labels).to(dtype), z=z)
    out_plain.backward(up)
    out_fast = fast.generator(semantics_of(b, config.labels, as_label_map=True), z=z)
    out_fast.backward(up)
    assert out_plain.std() > 0.1  # a non-trivial image, so the comparison means something
    assert out_fast.dtype == dtype
    if channels_last:
        assert out_fast.is_contiguous(memory_format=torch.channels_last)
    atol, rel = TOLERANCES[dtype]
    torch.testing.assert_close(out_fast, out_plain, atol=atol, rtol=0)
    assert float((out_fast - out_plain).detach().abs().mean()) < atol / 10
    if rel is None:
        assert_grads_roughly_close(grads(fast.generator), grads(plain.generator))
        return
    assert_grads_close(grads(fast.generator), grads(plain.generator), rel=rel)
    # the power iteration and the batch-norm statistics moved alike
    for (n, a), (_, c) in zip(plain.generator.named_buffers(), fast.generator.named_buffers()):
        torch.testing.assert_close(c, a, atol=10 * atol, rtol=rel, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["batch-k3-label-fc", "edges-batch-k5"])
def test_discriminator_forward_and_gradients_match(name: str, channels_last: bool, dtype: torch.dtype) -> None:
    plain = model_for(name).to(dtype)
    fast = fast_copy(plain, channels_last=channels_last)
    config = plain.config
    b = make_batch(config)
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, *config.generator.output_size, generator=g, dtype=dtype)
    dense = semantics_of(b, config.labels).to(dtype)
    x_plain = images.clone().requires_grad_()
    x_fast = images.clone().requires_grad_()
    out_plain = plain.discriminator(torch.cat([dense.repeat(2, 1, 1, 1), x_plain], dim=1))
    out_fast = fast.discriminator(x_fast, semantics=semantics_of(b, config.labels, as_label_map=True))
    flat_plain = [f for scale in out_plain for f in scale]
    flat_fast = [f for scale in out_fast for f in scale]
    ups = [torch.randn(f.shape, generator=g, dtype=dtype) for f in flat_plain]
    sum((f * u).sum() for f, u in zip(flat_plain, ups)).backward()
    sum((f * u).sum() for f, u in zip(flat_fast, ups)).backward()
    atol, rel = (1e-10, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)
    for a, c in zip(flat_fast, flat_plain):
        torch.testing.assert_close(a, c, atol=atol, rtol=rel)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, atol=atol, rtol=rel * 10)
    assert_grads_close(grads(fast.discriminator), grads(plain.discriminator), rel=rel)


def test_discriminator_given_dense_semantics_computes_the_reference_concatenation_exactly() -> None:
    """The images + dense label maps call is the reference's concatenated input, bit for bit
    (training without the fast path must stay the reference's computation)."""
    model = model_for("edges-batch-k5")
    config = model.config
    b = make_batch(config)
    images = torch.randn(4, 3, *config.generator.output_size, generator=torch.Generator().manual_seed(5))
    dense = semantics_of(b, config.labels)
    twin = copy.deepcopy(model.discriminator)  # train mode: each call steps spectral norm's power iteration
    reference = model.discriminator(torch.cat([dense.repeat(2, 1, 1, 1), images], dim=1))
    given = twin(images, semantics=dense)
    for ref_scale, given_scale in zip(reference, given, strict=True):
        for ref, got in zip(ref_scale, given_scale, strict=True):
            assert torch.equal(ref, got)
    with pytest.raises(ValueError, match="whole number"):
        model.discriminator(images[:3], semantics=dense)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_steps_match(name: str) -> None:
    """train_job.steps with a LabelMap: the loss terms and the discriminator step's gradients
    equal the plain path's. (The generator step's gradients pass through the discriminator's
    leaky ReLUs and instance norms, where a 1e-5 change of the fakes already moves them by a
    few percent in the plain path itself: compared above, with a fixed upstream gradient.)"""
    plain = model_for(name)
    fast = fast_copy(plain, channels_last=True)
    config = plain.config
    b = make_batch(config)
    loss = LossConfig(use_vgg_loss=False)
    results = []
    for model, as_label_map in ((plain, False), (fast, True)):
        nets = Networks(model.generator, model.discriminator, model.encoder)
        sem = semantics_of(b, config.labels, as_label_map=as_label_map)
        torch.manual_seed(3)
        g_terms, fake = generator_losses(nets, sem, b["image"], loss=loss, vgg=None)
        sum(g_terms.values()).backward()
        model.zero_grad(set_to_none=True)
        # the same fakes on both paths, so the discriminator step compares strictly
        fake = results[0][1] if results else fake
        d_terms = discriminator_losses(nets, sem, b["image"], loss=loss, fake=fake)
        sum(d_terms.values()).backward()
        results.append((g_terms, fake.detach(), d_terms, grads(model.discriminator)))
    (g_plain, _, d_plain, dg_plain), (g_fast, _, d_fast, dg_fast) = results
    for terms_fast, terms_plain in ((g_fast, g_plain), (d_fast, d_plain)):
        assert terms_fast.keys() == terms_plain.keys()
        for k in terms_plain:
            torch.testing.assert_close(terms_fast[k], terms_plain[k], atol=1e-5, rtol=1e-5)
    assert_grads_close(dg_fast, dg_plain, rel=1e-4)


def test_state_dict_keys_and_values_are_unchanged() -> None:
    plain = model_for("instance-k5-vae")
    fast = fast_copy(plain, channels_last=True)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, SpectralNorm) and m.fused for m in fast.modules()) > 0
    set_fast_training(fast, False)
    assert not any(isinstance(m, SpectralNorm) and m.fused for m in fast.modules())
    assert not any(isinstance(m, FusedProcessor) for m in fast.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_fused_spectral_norm_eval_mode_and_linear() -> None:
    conv = spade_core.spectral.spectral(torch.nn.Conv2d(6, 5, 3))
    lin = spade_core.spectral.spectral(torch.nn.Linear(7, 4))
    for layer in (conv, lin):
        layer.eval()
        plain = layer.weight.detach().clone()
        layer.parametrizations.weight[0].fused = True
        torch.testing.assert_close(layer.weight, plain)


# ---------------------------------------------------------------------------------------
# bf16 autocast


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a.detach().float() - b.detach().float()) ** 2).mean()))


@pytest.mark.parametrize("name", ["batch-k3-label-fc", "instance-k5-vae"])
def test_bf16_autocast_training_step(name: str) -> None:
    plain = model_for(name)
    fast = fast_copy(plain, channels_last=True)
    config = plain.config
    b = make_batch(config)
    loss = LossConfig(lambda_vgg=10.0)
    vgg = VGGLoss(VGG19Features())
    torch.manual_seed(3)
    terms_plain, fake_plain = generator_losses(
        Networks(plain.generator, plain.discriminator, plain.encoder), semantics_of(b, config.labels), b["image"], loss=loss, vgg=vgg
    )
    sum(terms_plain.values()).backward()
    nets = Networks(fast.generator, fast.discriminator, fast.encoder)
    sem = semantics_of(b, config.labels, as_label_map=True)
    # the real photos in channels_last too, as the Trainer passes them with optim.channels_last
    # (torch's bf16 CPU convolution on NCHW input is ~16x slower than on channels_last)
    image = b["image"].contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, fake = generator_losses(nets, sem, image, loss=loss, vgg=vgg)
    sum(terms.values()).backward()
    assert fake.dtype == torch.bfloat16 and fake.is_contiguous(memory_format=torch.channels_last)
    assert psnr(fake, fake_plain) > 38  # plain bf16 autocast: ~45 dB here
    for k, v in terms.items():
        v, ref = v.detach(), terms_plain[k].detach()
        assert torch.isfinite(v) and abs(float(v) - float(ref)) <= 0.05 * abs(float(ref)) + 1e-3, k
    g_fast, g_plain = grads(fast.generator), grads(plain.generator)
    assert g_fast.keys() == g_plain.keys() and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g_fast.values())
    flat_fast = torch.cat([g.flatten() for g in g_fast.values()])
    flat_plain = torch.cat([g.flatten() for g in g_plain.values()])
    assert float(F.cosine_similarity(flat_fast, flat_plain, dim=0)) > 0.97  # plain bf16 autocast: ~0.99
    fast.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_terms = discriminator_losses(nets, sem, image, loss=loss, fake=fake)
    sum(d_terms.values()).backward()
    assert all(torch.isfinite(v) for v in d_terms.values())
    assert all(torch.isfinite(p.grad).all() for p in fast.discriminator.parameters())


def test_training_loop_iteration_takes_the_fast_path_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer with optim.fast_path on (the presets' default) and off: the fast run
    trains fused networks on a LabelMap, the plain one the reference's computation on the
    dense one-hot, and one iteration gives the same loss terms."""
    from pathlib import Path

    import train_job.trainer as trainer_module
    from train_job.config import load_train_config
    from spade_core.norms import SPADE

    seen = []
    real_generator_losses = trainer_module.generator_losses
    monkeypatch.setattr(trainer_module, "generator_losses",
                        lambda nets, sem, *a, **k: seen.append(sem) or real_generator_losses(nets, sem, *a, **k))
    terms = {}
    for fast_path in (False, True):
        cfg = load_train_config(Path(__file__).parents[1] / "cluster/configs/tiny.yaml",
                                [f"optim.fast_path={str(fast_path).lower()}", "optim.ema_decay=null"])
        trainer = trainer_module.Trainer(cfg, device=torch.device("cpu"))  # no Ray: one rank, no process group
        model = trainer.model
        randomize_weights(model, seed=2)
        assert all(isinstance(m.processor, FusedProcessor) == fast_path for m in model.modules() if isinstance(m, SPADE))
        assert all(m.fused == fast_path for m in model.modules() if isinstance(m, SpectralNorm))
        torch.manual_seed(0)
        batch = make_batch(cfg.model, batch=2)
        terms[fast_path] = trainer.train_step(batch)
        assert isinstance(seen[-1], LabelMap) == fast_path
    assert terms[True].keys() == terms[False].keys() == {"G_GAN", "G_feat", "D_fake", "D_real"}
    for k in terms[False]:
        assert terms[True][k] == pytest.approx(terms[False][k], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_channels_last_and_clipping_train_and_checkpoint(tmp_path, precision: str) -> None:  # type: ignore[no-untyped-def]
    """The Trainer's AMP steps (autocast, fp16's grad scaler, clipping, channels_last) give
    finite losses, and the checkpoint they write holds the scaler exactly when fp16 needs one,
    restores into a new Trainer and loads for serving."""
    from pathlib import Path

    from train_job.checkpointing import read_training_checkpoint, write_training_checkpoint
    from train_job.config import load_train_config
    from train_job.trainer import Trainer

    cfg = load_train_config(Path(__file__).parents[1] / "cluster/configs/tiny.yaml", [
        f"optim.precision={precision}", "optim.channels_last=true", "optim.grad_clip=1.0", "optim.ema_decay=null",
        "model.generator.ngf=8", "model.discriminator.ndf=8"])
    trainer = Trainer(cfg, device=torch.device("cpu"))  # no Ray: one rank, no process group
    for step in range(2):
        terms = trainer.train_step(make_batch(cfg.model, batch=2, seed=step))
        assert terms and all(math.isfinite(v) for v in terms.values()), terms
        trainer.state.step += 1
    assert (trainer.scaler is not None) == (precision == "fp16")
    write_training_checkpoint(tmp_path, **trainer.parts(), state=trainer.state, train_config=cfg.to_dict())
    saved = torch.load(tmp_path / "training/state.pt", weights_only=True)
    assert saved["state"]["step"] == 2 and (saved["scaler"] is not None) == (precision == "fp16")
    again = Trainer(cfg, device=torch.device("cpu"))
    assert read_training_checkpoint(tmp_path, **again.parts()).step == 2
    if precision == "fp16":
        assert again.scaler.state_dict() == trainer.scaler.state_dict()
    model = spade_core.load_checkpoint(tmp_path)
    assert torch.isfinite(model.synthesize(torch.zeros(1, 64, 64, dtype=torch.long))).all()
