"""The training job's YAML config: presets, overrides, validation messages, round trips."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import spade_core
from spade_core.config import EncoderConfig, ModelConfig
from spade_core.losses import LossConfig
from spade_core.preprocess import PreprocessConfig
from train_job.config import (
    DataConfig,
    OptimConfig,
    ScalingConfig,
    StorageConfig,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    load_train_config,
)

from .conftest import REPO

CONFIGS = REPO / "cluster" / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths resolve against the current directory: make it a known one.
    monkeypatch.chdir(tmp_path)


def minimal(**sections: Any) -> dict[str, Any]:
    """The smallest valid raw config (the default model: crop 256), with sections replaced."""
    raw: dict[str, Any] = {
        "data": {"shards": "/shards/x", "batch_size": 4},
        "storage": {"path": "/runs", "name": "t"},
    }
    raw.update(sections)
    return raw


def write(tmp_path: Path, raw: dict[str, Any] | str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_presets_exist() -> None:
    assert {"ade20k.yaml", "ade20k_vae.yaml", "tiny.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    config = load_train_config(CONFIGS / name)
    assert TrainConfig.from_dict(config.to_dict()) == config
    again = load_train_config(write(tmp_path, dump_yaml(config), "dumped.yaml"))
    assert again == config
    assert config.data.batch_size % config.scaling.num_workers == 0
    assert config.data.preprocess.crop_size == config.model.generator.crop_size
    assert os.path.isabs(config.storage.path) or "://" in config.storage.path


def test_ade20k_is_the_papers_setup() -> None:
    c = load_train_config(CONFIGS / "ade20k.yaml")
    assert (c.model.labels.label_nc, c.model.labels.semantic_nc, c.model.labels.instance_edges) == (150, 151, False)
    g = c.model.generator
    assert (g.ngf, g.crop_size, g.spade.norm, g.spade.kernel_size, g.spectral_norm, g.z_dim) == (64, 256, "batch", 3, True, None)
    assert c.model.encoder is None
    d = c.model.discriminator
    assert (d.ndf, d.num_D, d.n_layers) == (64, 2, 4)
    assert (c.loss.gan_mode, c.loss.use_feat_loss, c.loss.use_vgg_loss) == ("hinge", True, True)
    assert c.loss.vgg_weights is not None and c.loss.vgg_weights.endswith("vgg19-dcbb9e9d.pth")
    assert c.data.preprocess == PreprocessConfig(mode="resize_and_crop", load_size=286, crop_size=256, flip=True)
    assert c.data.batch_size == 32 and c.worker_batch_size == 4
    assert (c.optim.niter, c.optim.niter_decay, c.optim.total_epochs) == (100, 100, 200)
    assert (c.optim.lr_g, c.optim.lr_d, c.optim.betas) == (pytest.approx(1e-4), pytest.approx(4e-4), (0.0, 0.9))
    assert (c.scaling.num_workers, c.scaling.use_gpu) == (8, True)
    assert c.scaling.worker_resources == {"CPU": 1.0, "GPU": 1.0}
    assert c.storage.path.startswith("s3://") and c.data.shards.startswith("s3://")


def test_ade20k_vae_differs_only_in_the_vae_parts() -> None:
    base = load_train_config(CONFIGS / "ade20k.yaml")
    vae = load_train_config(CONFIGS / "ade20k_vae.yaml")
    assert vae.model.use_vae and vae.model.generator.z_dim == 256
    assert vae.model.encoder == EncoderConfig(ndf=64, z_dim=256)
    assert vae.loss.lambda_kld == 0.05
    expected = dataclasses.replace(
        vae,
        model=dataclasses.replace(
            vae.model, encoder=None, generator=dataclasses.replace(vae.model.generator, z_dim=None)
        ),
        storage=dataclasses.replace(vae.storage, name=base.storage.name),
    )
    assert expected == base


def test_tiny_resolves_relative_paths_and_builds(tmp_path: Path) -> None:
    c = load_train_config(CONFIGS / "tiny.yaml")
    assert c.storage.path == str(tmp_path / "out" / "runs")
    assert c.data.shards == str(tmp_path / "out" / "shards" / "synthetic")
    assert c.storage.name == "tiny"
    assert (c.scaling.num_workers, c.scaling.use_gpu, c.scaling.sync_batchnorm) == (2, False, True)
    assert c.scaling.ray_kwargs() == {
        "num_workers": 2,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 0.5},
        "placement_strategy": "PACK",
    }
    assert (c.data.batch_size, c.worker_batch_size) == (8, 4)
    assert (c.optim.total_epochs, c.optim.precision, c.loss.use_vgg_loss) == (10, "fp32", False)
    assert (c.checkpoint.every_steps, c.checkpoint.keep) == (50, 2)
    assert c.data.preprocess.load_size == 72 and c.model.generator.crop_size == 64
    # The preset's networks really are buildable at its size (cheap at ngf 16).
    model = spade_core.build_model(c.model, discriminator=False, seed=0).eval()
    with torch.no_grad():
        fake = model.generator(torch.zeros(1, c.model.semantic_nc, 64, 64))
    assert fake.shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------
# Overrides


def test_overrides_at_every_depth(tmp_path: Path) -> None:
    c = load_train_config(
        CONFIGS / "tiny.yaml",
        [
            "optim.lr=1e-4",  # PyYAML alone would read a string here
            "optim.no_ttur=true",
            "optim.grad_clip=null",
            "optim.ema_decay=null",
            "scaling.num_workers=4",
            "scaling.resources_per_worker.CPU=0.25",
            "model.generator.ngf=32",
            "model.generator.spade.hidden=64",
            "data.preprocess.flip=false",
            "logging.metrics_port=null",
            "storage.name = renamed",
        ],
    )
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert (c.optim.no_ttur, c.optim.ema_decay, c.logging.metrics_port) == (True, None, None)
    assert (c.scaling.num_workers, c.scaling.resources_per_worker, c.worker_batch_size) == (4, {"CPU": 0.25}, 2)
    assert (c.model.generator.ngf, c.model.generator.spade.hidden, c.data.preprocess.flip) == (32, 64, False)
    assert c.storage.name == "renamed"


def test_override_creates_missing_sections_and_takes_yaml_values(tmp_path: Path) -> None:
    c = load_train_config(
        write(tmp_path, minimal()),
        [
            "model.encoder.z_dim=256",  # encoder absent in the file: created with defaults
            "model.generator.z_dim=256",
            "scaling.resources_per_worker={CPU: 2, memory: 1e9}",
            "optim.lr=1",  # an int where a float is wanted: accepted as 1.0
        ],
    )
    assert c.model.encoder == EncoderConfig(z_dim=256)
    assert c.scaling.resources_per_worker == {"CPU": 2.0, "memory": 1e9}
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)


def test_apply_overrides_leaves_the_input_alone() -> None:
    raw = minimal()
    out = apply_overrides(raw, ["data.batch_size=8"])
    assert out["data"]["batch_size"] == 8 and raw["data"]["batch_size"] == 4


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lr_gg=1", r"unknown key optim\.lr_gg; optim takes niter, niter_decay, lr"),
        ("model.generator.ngff=32", r"unknown key model\.generator\.ngff"),
        ("model.generator.spade.normm=batch", r"unknown key model\.generator\.spade\.normm"),
        ("nope.x=1", r"unknown key nope; the top level takes model, loss"),
        ("optim.lr.x=1", r"optim\.lr is a value, not a section"),
        ("scaling.resources_per_worker.CPU.x=1", r"scaling\.resources_per_worker\.CPU is a value"),
        ("optim.lr", r"override 'optim\.lr' must look like key=value"),
        ("=3", r"malformed key ''"),
        ("optim..lr=3", r"malformed key 'optim\.\.lr'"),
        ("optim.lr=[1, 2", r"override 'optim\.lr=\[1, 2'.*not valid YAML"),
        ("optim.lr=abc", r"optim\.lr has a wrong value 'abc'; expected a finite number"),
    ],
)
def test_bad_overrides_name_the_key(override: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        load_train_config(write(tmp_path, minimal()), [override])


def test_overrides_must_be_a_list() -> None:
    with pytest.raises(ValueError, match="list of 'key=value' strings"):
        apply_overrides(minimal(), "optim.lr=1e-4")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Validation messages


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        # unknown keys at every depth
        ({"extra": 1}, r"unknown key extra; the top level takes model, loss, data"),
        ({"optim": {"lr_g": 1e-4}}, r"unknown key optim\.lr_g; optim takes"),
        ({"data": {"shards": "/s", "batch_size": 4, "preprocess": {"crop": 1}}}, r"unknown key data\.preprocess\.crop;"),
        ({"model": {"generator": {"spade": {"nrm": "batch"}}}}, r"unknown key model\.generator\.spade\.nrm"),
        ({"model": {"encoder": {"zdim": 8}}}, r"unknown key model\.encoder\.zdim"),
        ({"model": {"typo": {}}}, r"unknown key model\.typo; model takes labels, generator"),
        ({"loss": {"lambda_vggg": 1.0}}, r"unknown key loss\.lambda_vggg"),
        # wrong types
        ({"optim": {"niter": 1.5}}, r"optim\.niter has a wrong value 1\.5; expected an integer"),
        ({"optim": {"no_ttur": "yes please"}}, r"optim\.no_ttur has a wrong value 'yes please'; expected true or false"),
        ({"optim": {"lr": float("nan")}}, r"optim\.lr has a wrong value nan; expected a finite number"),
        ({"scaling": {"num_workers": True}}, r"scaling\.num_workers has a wrong value True; expected an integer"),
        ({"scaling": {"resources_per_worker": {"CPU": "half"}}}, r"scaling\.resources_per_worker\.CPU has a wrong value 'half'"),
        (
            {"scaling": {"resources_per_worker": [1]}},
            r"scaling\.resources_per_worker has a wrong value \[1\]; expected a mapping",
        ),
        ({"model": {"generator": {"ngf": "64"}}}, r"model\.generator\.ngf has a wrong value '64'; expected an integer"),
        ({"model": {"labels": 3}}, r"model\.labels must be a mapping, got int"),
        ({"loss": {"lambda_feat": "ten"}}, r"loss\.lambda_feat has a wrong value 'ten'"),
        ({"optim": 5}, r"optim must be a mapping, got int"),
        # bad literals
        ({"optim": {"precision": "fp8"}}, r"optim\.precision has a wrong value 'fp8'; expected one of 'fp32', 'bf16', 'fp16'"),
        (
            {"scaling": {"placement_strategy": "pack"}},
            r"scaling\.placement_strategy has a wrong value 'pack'; expected one of 'PACK'",
        ),
        ({"loss": {"gan_mode": "wgan"}}, r"loss\.gan_mode has a wrong value 'wgan'; expected one of 'hinge'"),
        (
            {"model": {"generator": {"num_upsampling_layers": "many"}}},
            r"model\.generator\.num_upsampling_layers has a wrong value",
        ),
        (
            {"data": {"shards": "/s", "batch_size": 4, "preprocess": {"mode": "zoom"}}},
            r"data\.preprocess\.mode has a wrong value 'zoom'",
        ),
        # out-of-range values, from this module and from spade_core's own checks
        ({"optim": {"lr": -1}}, r"optim\.lr must be > 0, got -1"),
        ({"optim": {"niter": 0, "niter_decay": 0}}, r"optim\.niter \+ optim\.niter_decay must be >= 1"),
        ({"optim": {"beta2": 1.0}}, r"optim\.beta2 must be in \[0, 1\) or null"),
        ({"optim": {"ema_decay": 1.0}}, r"optim\.ema_decay must be in \(0, 1\) or null"),
        ({"scaling": {"num_workers": 0}}, r"scaling\.num_workers must be >= 1, got 0"),
        (
            {"scaling": {"resources_per_worker": {"GPU": 1}}},
            r"scaling\.resources_per_worker\.GPU is 1.* scaling\.use_gpu is false",
        ),
        ({"logging": {"metrics_port": 15000}}, r"logging\.metrics_port 15000 is in 10002\.\.19999"),
        (
            {"checkpoint": {"every_steps": 0, "at_epoch_end": False}},
            r"checkpoint\.every_steps is 0 and checkpoint\.at_epoch_end is false",
        ),
        ({"storage": {"path": "/runs", "name": "a/b"}}, r"storage\.name must be a plain directory name"),
        ({"model": {"generator": {"ngf": 0}}}, r"model\.generator\.ngf must be >= 1"),
        ({"model": {"generator": {"spade": {"kernel_size": 4}}}}, r"model\.generator\.spade\.kernel_size must be 3 or 5"),
        ({"model": {"encoder": {"z_dim": 8}}}, r"model\.generator\.z_dim \(None\) must equal model\.encoder\.z_dim \(8\)"),
        ({"loss": {"lambda_vgg": -1}}, r"loss\.lambda_vgg must be a finite number >= 0"),
        (
            {"data": {"shards": "/s", "batch_size": 4, "preprocess": {"load_size": 200}}},
            r"data\.preprocess\.load_size \(200\) must be >= data\.preprocess\.crop_size \(256\)",
        ),
        # required keys
        ({"data": {"batch_size": 4}}, r"data\.shards is required \(a string\)"),
        ({"data": None}, r"data must be a mapping, got null"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_train_config(write(tmp_path, minimal(**raw)))
    assert str(info.value).startswith(str(tmp_path / "c.yaml") + ": ")


def test_missing_section() -> None:
    with pytest.raises(ValueError, match="section storage is required"):
        TrainConfig.from_dict({"data": {"shards": "/s", "batch_size": 4}})


def test_batch_must_divide_over_workers() -> None:
    with pytest.raises(ValueError, match=r"data\.batch_size \(6\) must be divisible by scaling\.num_workers \(4\)"):
        TrainConfig.from_dict(minimal(data={"shards": "/s", "batch_size": 6}, scaling={"num_workers": 4}))


def test_crop_size_must_match_the_generator() -> None:
    raw = minimal(
        data={"shards": "/s", "batch_size": 4, "preprocess": {"load_size": 143, "crop_size": 128}},
    )
    with pytest.raises(ValueError, match=r"data\.preprocess\.crop_size \(128\) must equal model\.generator\.crop_size \(256\)"):
        TrainConfig.from_dict(raw)
    raw["model"] = {"generator": {"crop_size": 128}}
    assert TrainConfig.from_dict(raw).model.generator.output_size == (128, 128)


def test_generator_output_must_match_the_crop() -> None:
    # crop 200 is not a multiple of 2^5: the generator would make 192x192 images
    raw = minimal(
        model={"generator": {"crop_size": 200}},
        data={"shards": "/s", "batch_size": 4, "preprocess": {"load_size": 220, "crop_size": 200}},
    )
    match = r"model\.generator makes 192x192 .* data\.preprocess mode 'resize_and_crop' gives 200x200"
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(raw)


def test_fixed_mode_checks_the_aspect_ratio() -> None:
    # 'fixed' 256 wide at aspect 2 gives 128x256 (height x width): the generator must match.
    pre = {"mode": "fixed", "load_size": 256, "crop_size": 256, "aspect_ratio": 2.0}
    raw = minimal(data={"shards": "/s", "batch_size": 4, "preprocess": pre})
    with pytest.raises(ValueError, match=r"makes 256x256 .* gives 128x256"):
        TrainConfig.from_dict(raw)
    raw["model"] = {"generator": {"aspect_ratio": 2.0}}
    assert TrainConfig.from_dict(raw).model.generator.output_size == (128, 256)


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    raw = minimal(
        data={"shards": "shards/x", "batch_size": 4},
        storage={"path": "runs", "name": "t", "resume_from": "old/ckpt"},
        loss={"vgg_weights": "weights/vgg19.pth"},
    )
    c = load_train_config(write(tmp_path, raw))
    assert c.data.shards == str(tmp_path / "shards" / "x")
    assert c.storage.path == str(tmp_path / "runs")
    assert c.storage.resume_from == str(tmp_path / "old" / "ckpt")
    assert c.loss.vgg_weights == str(tmp_path / "weights" / "vgg19.pth")
    # URIs stay as given; direct construction resolves too
    assert StorageConfig(path="s3://b/runs", name="t").path == "s3://b/runs"
    assert StorageConfig(path="file:///abs/runs", name="t").path == "file:///abs/runs"
    assert DataConfig(shards="rel", batch_size=1).shards == str(tmp_path / "rel")


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_train_config(write(tmp_path, "optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_train_config(write(tmp_path, "optim: [\n"))
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_train_config(write(tmp_path, "- 1\n"))
    with pytest.raises(FileNotFoundError):
        load_train_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------
# Optimiser settings


def test_ttur_rates_and_betas() -> None:
    o = OptimConfig()
    assert (o.lr, o.lr_g, o.lr_d, o.betas) == (2e-4, 1e-4, 4e-4, (0.0, 0.9))
    n = OptimConfig(no_ttur=True)
    assert (n.lr_g, n.lr_d, n.betas) == (2e-4, 2e-4, (0.5, 0.999))
    # explicit betas win in both modes, as the reference's --beta1 / --beta2
    assert OptimConfig(beta1=0.1).betas == (0.1, 0.9)
    assert OptimConfig(no_ttur=True, beta2=0.99).betas == (0.5, 0.99)
    assert (o.uses_grad_scaler, OptimConfig(precision="fp16").uses_grad_scaler) == (False, True)


def test_linear_decay_follows_the_reference() -> None:
    o = OptimConfig(niter=2, niter_decay=4, lr=4e-4)
    factors = [o.lr_factor(e) for e in range(o.total_epochs)]
    # the reference: full rate through epoch niter (1-based), then lr / niter_decay less per epoch
    assert factors == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert o.learning_rates(4) == pytest.approx((1e-4, 4e-4))
    assert OptimConfig(niter=3).lr_factor(10) == 1.0


def test_scaling_resources() -> None:
    assert ScalingConfig().worker_resources == {"CPU": 1.0}
    assert ScalingConfig(use_gpu=True).worker_resources == {"CPU": 1.0, "GPU": 1.0}
    assert ScalingConfig(use_gpu=True, resources_per_worker={"CPU": 4}).worker_resources == {"CPU": 4.0, "GPU": 1.0}
    mine = {"CPU": 0.5}
    s = ScalingConfig(resources_per_worker=mine)
    mine["CPU"] = 8
    assert s.resources_per_worker == {"CPU": 0.5}


# ---------------------------------------------------------------------------------------
# Round trips


def test_round_trip_of_a_config_with_every_kind_of_value(tmp_path: Path) -> None:
    c = load_train_config(
        CONFIGS / "ade20k_vae.yaml",
        [
            "optim.lr=1e-5",
            "optim.beta1=0.5",
            "optim.grad_clip=1",
            "storage.name='1e5'",  # a string that looks like a number must stay a string
            "storage.resume_from=s3://b/ckpt",
            "scaling.resources_per_worker={CPU: 0.5, GPU: 1}",
        ],
    )
    assert c.storage.name == "1e5"
    d = c.to_dict()
    assert isinstance(d["model"], dict) and d["model"]["encoder"]["z_dim"] == 256
    assert TrainConfig.from_dict(d) == c
    text = dump_yaml(c, tmp_path / "out.yaml")
    assert (tmp_path / "out.yaml").read_text() == text
    assert load_train_config(tmp_path / "out.yaml") == c
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == c


def test_from_dict_accepts_built_sections() -> None:
    c = TrainConfig(
        model=ModelConfig(),
        loss=LossConfig(use_vgg_loss=False),
        data=DataConfig(shards="/s", batch_size=2),
        storage=StorageConfig(path="/r", name="n"),
    )
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="optim has a wrong value"):
        TrainConfig(data=c.data, storage=c.storage, optim={"lr": 1})  # type: ignore[arg-type]


def test_a_dead_head_in_rays_address_file_is_recognised(tmp_path: Path) -> None:
    """spade-train warns about an address file left by a stopped `ray start` head (each Ray
    Train run would wait ~12 s on it), and says nothing of a live one or of none."""
    import socket

    from train_job.__main__ import dead_recorded_head

    recorded = tmp_path / "ray_current_cluster"
    assert dead_recorded_head(recorded) is None  # no file
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        recorded.write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
        assert dead_recorded_head(recorded) is None
        dead_port = live.getsockname()[1]
    recorded.write_text(f"127.0.0.1:{dead_port}")
    assert dead_recorded_head(recorded) == f"127.0.0.1:{dead_port}"
    recorded.write_text("garbage")
    assert dead_recorded_head(recorded) == "garbage"
