"""Every architecture option is as faithful as the fixture-tested one.

For each option (upsampling modes, SPADE norms and kernel, label-map fc vs VAE, aspect
ratio, COCO-like labels with don't-care and instance edges) a randomly weighted model is
written as a REFERENCE-FORMAT checkpoint (latest_net_*.pth + opt.txt), loaded back with
``spade_core.load_checkpoint`` and compared against ``reference_oracle``, an independent
functional statement of the reference networks working on the reference's own keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import spade_core
from spade_core import nvlabs
from spade_core.config import (
    DiscriminatorConfig,
    EncoderConfig,
    GeneratorConfig,
    LabelConfig,
    ModelConfig,
    SpadeConfig,
)

from . import reference_oracle as oracle

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# Helpers


def randomise(model: spade_core.SpadeModel, seed: int) -> None:
    """Weights far from the tiny training init: N(0, 1/fan_in) weights (the spectral ``original``
    included), N(0, 0.1) biases, random batch-norm statistics; spectral u, v from power iteration."""
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    with torch.no_grad():
        for net in (model.generator, model.encoder, model.discriminator):
            if net is None:
                continue
            for name, p in net.named_parameters():
                if p.dim() > 1:
                    normal(p, 0.0, 1.0 / math.sqrt(p[0].numel()))
                elif name.endswith("bias"):
                    normal(p, 0.0, 0.1)
                else:  # affine batch-norm scale (discriminator / encoder with batch norm)
                    normal(p, 1.0, 0.1)
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                    normal(m.running_mean, 0.0, 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                    m.num_batches_tracked.fill_(7)
                if parametrize.is_parametrized(m, "weight"):
                    sn = m.parametrizations.weight[0]
                    w = m.parametrizations.weight.original.flatten(1)
                    u = F.normalize(torch.randn(w.shape[0], generator=g), dim=0)
                    for _ in range(20):
                        v = F.normalize(w.t() @ u, dim=0)
                        u = F.normalize(w @ v, dim=0)
                    sn._u.copy_(u)
                    sn._v.copy_(v)
    model.eval()


def random_labels(batch: int, size: tuple[int, int], num: int, seed: int, *, dontcare: bool = False) -> torch.Tensor:
    """Blocky label maps (regions of 4x4..8x8) with ids 0..num-1 (and some 255 with ``dontcare``)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randint(0, num, (batch, max(1, h // 4), max(1, w // 4)), generator=g)
    labels = F.interpolate(coarse[:, None].float(), size=size, mode="nearest")[:, 0].long()
    labels[:, :2, :] = num - 1  # the last class always present
    if dontcare:
        labels[:, -3:, : w // 3] = 255
    return labels.to(torch.uint8 if num <= 256 else torch.int64)


def random_instances(labels: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, h, w = labels.shape
    coarse = torch.randint(0, 5, (b, max(1, h // 8), max(1, w // 8)), generator=g)
    inst = F.interpolate(coarse[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    return labels.long() * 1000 + inst


@dataclass
class Case:
    config: ModelConfig
    options: dict[str, Any]
    batch: int = 2
    with_discriminator: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _labels(label_nc: int, *, dontcare: bool, instance: bool = False, dataset: str = "custom") -> LabelConfig:
    return LabelConfig(label_nc=label_nc, contain_dontcare_label=dontcare, instance_edges=instance, dataset=dataset)


def _case(
    *,
    label_nc: int = 12,
    dontcare: bool = False,
    instance: bool = False,
    dataset_mode: str = "custom",
    ngf: int = 8,
    ndf: int = 16,
    crop: int = 64,
    aspect: float = 1.0,
    mode: str = "normal",
    norm_g: str = "spectralspadesyncbatch3x3",
    vae: bool = False,
    z_dim: int = 256,
    batch: int = 2,
) -> Case:
    """The same architecture twice: as our ModelConfig and as the reference's options."""
    dataset = {"ade20k": "ade20k", "coco": "coco_stuff"}.get(dataset_mode, "custom")
    spectral = norm_g.startswith("spectral")
    kind = "instance" if "instance" in norm_g else "batch"
    ks = int(norm_g[-1])
    config = ModelConfig(
        labels=_labels(label_nc, dontcare=dontcare, instance=instance, dataset=dataset),
        generator=GeneratorConfig(
            ngf=ngf,
            crop_size=crop,
            aspect_ratio=aspect,
            num_upsampling_layers=mode,  # type: ignore[arg-type]
            spade=SpadeConfig(norm=kind, kernel_size=ks),  # type: ignore[arg-type]
            spectral_norm=spectral,
            z_dim=z_dim if vae else None,
        ),
        # the reference sizes its encoder with ngf and builds 5 convs below crop 256
        encoder=EncoderConfig(ndf=ngf, z_dim=z_dim, input_size=256 if crop >= 256 else 128) if vae else None,
        discriminator=DiscriminatorConfig(ndf=ndf, n_layers=4, num_D=2, norm="instance", spectral_norm=True),
    )
    options = {
        "dataset_mode": dataset_mode,
        "label_nc": label_nc,
        "contain_dontcare_label": dontcare,
        "no_instance": not instance,
        "ngf": ngf,
        "ndf": ndf,
        "crop_size": crop,
        "load_size": crop,
        "aspect_ratio": aspect,
        "num_upsampling_layers": mode,
        "norm_G": norm_g,
        "use_vae": vae,
        "z_dim": z_dim,
        "netG": "spade",
        "netD": "multiscale",
        "netD_subarch": "n_layer",
        "num_D": 2,
        "n_layers_D": 4,
        "norm_D": "spectralinstance",
        "norm_E": "spectralinstance",
        "gpu_ids": "-1",
    }
    return Case(config=config, options=options, batch=batch)


CASES: dict[str, Case] = {
    "more": _case(crop=128, mode="more"),
    "most": _case(crop=128, mode="most", batch=1),
    "instance_norm": _case(norm_g="spectralspadeinstance3x3"),
    "batch_norm": _case(norm_g="spectralspadebatch3x3"),
    "syncbatch_kernel5": _case(norm_g="spectralspadesyncbatch5x5"),
    "instance_kernel5": _case(norm_g="spectralspadeinstance5x5"),
    "no_spectral": _case(norm_g="spadeinstance3x3"),
    "label_fc_ade20k": _case(label_nc=150, dontcare=True, dataset_mode="ade20k"),
    "vae": _case(vae=True),
    "vae_most": _case(vae=True, crop=128, mode="most", batch=1),
    "aspect_2": _case(crop=128, aspect=2.0),
    "aspect_1.5": _case(crop=128, aspect=1.5, norm_g="spectralspadeinstance3x3"),
    "coco_like": _case(label_nc=182, dontcare=True, instance=True, dataset_mode="coco"),
}

EXPECTED_OUTPUT = {"more": (128, 128), "most": (128, 128), "aspect_2": (64, 128), "aspect_1.5": (96, 128)}


def _write(case: Case, model: spade_core.SpadeModel, root: Path) -> Path:
    return oracle.write_reference_checkpoint(
        root,
        case.options,
        model.generator.state_dict(),
        encoder=None if model.encoder is None else model.encoder.state_dict(),
        discriminator=model.discriminator.state_dict() if case.with_discriminator else None,
    )


# ---------------------------------------------------------------------------------------
# Reference-format checkpoints of every architecture option == the oracle


@pytest.mark.parametrize("name", list(CASES))
def test_reference_checkpoint_matches_oracle(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    config = case.config
    seed = sum(map(ord, name))
    model = spade_core.build_model(config, seed=seed)
    randomise(model, seed)
    root = _write(case, model, tmp_path / "ckpt")

    # (a) the architecture read from opt.txt is the one we built
    assert spade_core.read_config(root) == config
    loaded = spade_core.load_checkpoint(root)
    assert loaded.config == config
    assert not loaded.training
    assert (loaded.encoder is not None) == config.use_vae
    assert loaded.discriminator is not None

    ref_g = torch.load(root / "latest_net_G.pth", weights_only=True)
    assert any(k.endswith("weight_orig") for k in ref_g) == config.generator.spectral_norm
    assert not any("parametrizations" in k for k in ref_g)

    # (c) output size
    h, w = config.generator.output_size
    assert (h, w) == EXPECTED_OUTPUT.get(name, (config.generator.crop_size, config.generator.crop_size))
    labels_cfg = config.labels
    labels = random_labels(case.batch, (h, w), labels_cfg.label_nc, seed, dontcare=labels_cfg.contain_dontcare_label)
    instance = random_instances(labels, seed) if labels_cfg.instance_edges else None
    z = None
    if config.use_vae:
        z = torch.randn(case.batch, config.generator.z_dim, generator=torch.Generator().manual_seed(seed))

    out = loaded.synthesize(labels, z=z, instance=instance)
    assert out.shape == (case.batch, 3, h, w)

    # (b) same function as the oracle on the reference's own keys
    seg = oracle.one_hot_input(labels, case.options, instance)
    assert seg.shape[1] == config.semantic_nc
    with torch.no_grad():
        expected = oracle.generator_forward(ref_g, case.options, seg, z)
    assert expected.shape == out.shape
    # outputs far from trivial: spread out, mostly unsaturated, and depending on the labels
    assert float(expected.std()) > 0.1
    assert float((expected.abs() > 0.99).float().mean()) < 0.5
    err = float((out - expected).abs().max())
    assert err <= TOL, f"{name}: max abs diff {err:.3g}"

    if config.use_vae:
        ref_e = torch.load(root / "latest_net_E.pth", weights_only=True)
        assert sorted({k.split(".")[0] for k in ref_e}) == ["fc_mu", "fc_var"] + [f"layer{i}" for i in range(1, 6)]
        style = torch.rand(case.batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        mu, logvar = loaded.encode(style)
        with torch.no_grad():
            mu_ref, logvar_ref = oracle.encoder_forward(ref_e, style)
        assert mu.shape == (case.batch, config.generator.z_dim)
        assert float(mu_ref.std()) > 0.1
        assert float((mu - mu_ref).abs().max()) <= TOL
        assert float((logvar - logvar_ref).abs().max()) <= TOL
        # style image without seed: z = mu
        by_style = loaded.synthesize(labels, style=style, instance=instance)
        with torch.no_grad():
            expected_style = oracle.generator_forward(ref_g, case.options, seg, mu_ref)
        assert float((by_style - expected_style).abs().max()) <= TOL


def test_coco_like_labels_reach_the_right_channels() -> None:
    """Don't care (255) -> channel label_nc, instance boundaries -> the last channel."""
    from spade_core.semantics import semantic_input

    case = CASES["coco_like"]
    labels = random_labels(2, (64, 64), 182, 5, dontcare=True)
    assert int((labels == 255).sum()) > 0
    instance = random_instances(labels, 5)
    ours = semantic_input(labels, case.config.labels, instance=instance)
    ref = oracle.one_hot_input(labels, case.options, instance)
    assert ours.shape == (2, 184, 64, 64)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, 182].bool(), labels == 255)
    assert 0 < float(ours[:, 183].mean()) < 1


def test_oracle_reproduces_the_reference_fixture(nvlabs_fixture: Path) -> None:
    """The oracle itself computes what the reference computed (fixture outputs)."""
    from .conftest import load_fixture_inputs

    ckpt = nvlabs_fixture / "checkpoint"
    opt = nvlabs.parse_opt_txt((ckpt / "opt.txt").read_text())
    expected = dict(np.load(nvlabs_fixture / "expected.npz"))
    labels, style = load_fixture_inputs(nvlabs_fixture)
    g = torch.load(ckpt / "latest_net_G.pth", weights_only=True)
    e = torch.load(ckpt / "latest_net_E.pth", weights_only=True)
    with torch.no_grad():
        mu, logvar = oracle.encoder_forward(e, style)
        fake = oracle.generator_forward(g, opt, oracle.one_hot_input(labels, opt), mu)
    np.testing.assert_allclose(mu.numpy(), expected["mu"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logvar.numpy(), expected["logvar"], atol=TOL, rtol=0)
    np.testing.assert_allclose(fake.numpy(), expected["fake"], atol=TOL, rtol=0)


def test_reference_keys_round_trip() -> None:
    """Our keys -> reference keys -> (spade_core.nvlabs) our keys is the identity."""
    case = CASES["vae"]
    model = spade_core.build_model(case.config, seed=1)
    for net in (model.generator, model.encoder, model.discriminator):
        state = net.state_dict()
        ref = oracle.to_reference_state(state)
        assert not any("parametrizations" in k for k in ref)
        back = nvlabs.convert_state_dict(ref)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_opt_txt_format_parses() -> None:
    text = oracle.format_opt_txt({"ngf": 8, "use_vae": True})
    assert "                      ngf: 8                             \t[default: 64]" in text.splitlines()
    opt = nvlabs.parse_opt_txt(text)
    assert opt["ngf"] == "8" and opt["use_vae"] == "True" and opt["norm_G"] == "spectralspadesyncbatch3x3"


# ---------------------------------------------------------------------------------------
# Parameter counts at the reference's ADE20K defaults


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


ADE20K_OPT = {
    **{k: str(v) for k, v in oracle.REFERENCE_DEFAULTS.items()},
    # what the reference's ade20k dataset mode sets
    "dataset_mode": "ade20k",
    "label_nc": "150",
    "contain_dontcare_label": "True",
    "no_instance": "True",
}


def test_ade20k_opt_txt_gives_the_default_config() -> None:
    """The reference's ADE20K options describe exactly our default architecture."""
    plain = nvlabs.config_from_options(nvlabs.parse_opt_txt(oracle.format_opt_txt(ADE20K_OPT)))
    vae = nvlabs.config_from_options(nvlabs.parse_opt_txt(oracle.format_opt_txt({**ADE20K_OPT, "use_vae": "True"})))
    assert plain == ModelConfig()
    assert vae == ModelConfig(generator=GeneratorConfig(z_dim=256), encoder=EncoderConfig())


def test_parameter_counts_at_ade20k_defaults() -> None:
    plain = ModelConfig()
    vae = ModelConfig(generator=GeneratorConfig(z_dim=256), encoder=EncoderConfig())
    assert plain.semantic_nc == 151 and plain.generator.ngf == 64 and plain.discriminator.ndf == 64
    g = spade_core.SPADEGenerator(plain.generator, semantic_nc=plain.semantic_nc)
    assert _count(g) == 96_492_483
    del g
    g_vae = spade_core.SPADEGenerator(vae.generator, semantic_nc=vae.semantic_nc)
    assert _count(g_vae) == 111_942_595
    del g_vae
    assert vae.encoder is not None
    e = spade_core.ConvEncoder(vae.encoder)
    assert _count(e) == 10_463_424
    assert sorted({k.split(".")[0] for k in e.state_dict()}) == ["fc_mu", "fc_var"] + [f"layer{i}" for i in range(1, 7)]
    d = spade_core.MultiscaleDiscriminator(plain.discriminator, semantic_nc=plain.semantic_nc)
    assert _count(d) == 5_836_930


# ---------------------------------------------------------------------------------------
# The VAE encoder below crop 256 (where the reference crashes)


def test_vae_encoder_works_below_crop_256() -> None:
    config = ModelConfig(
        labels=_labels(10, dontcare=False),
        generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=32),
        encoder=EncoderConfig(ndf=8, z_dim=32),
        discriminator=DiscriminatorConfig(ndf=8),
    )
    assert config.encoder is not None and config.encoder.input_size == 256
    model = spade_core.build_model(config, discriminator=False, seed=3)
    randomise(model, 3)
    style = torch.rand(2, 3, 64, 64) * 2 - 1
    mu, logvar = model.encode(style)
    assert mu.shape == logvar.shape == (2, 32)
    assert torch.isfinite(mu).all() and float(mu.std()) > 0
    labels = random_labels(2, (64, 64), 10, 3)
    out = model.synthesize(labels, style=style)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert torch.equal(out, model.synthesize(labels, z=mu))
    sampled = model.synthesize(labels, style=style, seed=1)
    assert torch.equal(sampled, model.synthesize(labels, style=style, seed=1))
    assert not torch.equal(sampled, out)
    # the same function as the oracle (six convs, input resized to 256)
    ref_e = oracle.to_reference_state(model.encoder.state_dict())
    with torch.no_grad():
        mu_ref, _ = oracle.encoder_forward(ref_e, style)
    assert float((mu - mu_ref).abs().max()) <= TOL


@pytest.mark.parametrize(("input_size", "layers"), [(256, 6), (128, 5), (64, 4)])
def test_encoder_layers_follow_input_size(input_size: int, layers: int) -> None:
    enc = spade_core.ConvEncoder(EncoderConfig(ndf=8, z_dim=16, input_size=input_size))
    top = sorted({k.split(".")[0] for k in enc.state_dict()})
    assert top == ["fc_mu", "fc_var"] + [f"layer{i}" for i in range(1, layers + 1)]
    mu, logvar = enc.eval()(torch.zeros(1, 3, 48, 48))
    assert mu.shape == logvar.shape == (1, 16)
