"""Every mistake a user can make gives a ValueError that says what is wrong and what was expected."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import spade_core
from spade_core.config import (
    DiscriminatorConfig,
    EncoderConfig,
    GeneratorConfig,
    LabelConfig,
    ModelConfig,
    SpadeConfig,
)

from . import reference_oracle as oracle



pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# Tiny models, built once


def _config(*, vae: bool = False, dontcare: bool = True, instance: bool = False, label_nc: int = 10) -> ModelConfig:
    return ModelConfig(
        labels=LabelConfig(label_nc=label_nc, contain_dontcare_label=dontcare, instance_edges=instance, dataset="custom"),
        generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=16 if vae else None),
        encoder=EncoderConfig(ndf=8, z_dim=16, input_size=64) if vae else None,
        discriminator=DiscriminatorConfig(ndf=8, n_layers=2),
    )


@pytest.fixture(scope="module")
def plain() -> spade_core.SpadeModel:
    """label_nc 10 + don't care (255 -> channel 10), no VAE."""
    return spade_core.build_model(_config(), discriminator=False, seed=0).eval()


@pytest.fixture(scope="module")
def no_dontcare() -> spade_core.SpadeModel:
    return spade_core.build_model(_config(dontcare=False), discriminator=False, seed=0).eval()


@pytest.fixture(scope="module")
def vae() -> spade_core.SpadeModel:
    return spade_core.build_model(_config(vae=True), discriminator=False, seed=0).eval()


@pytest.fixture(scope="module")
def with_instance() -> spade_core.SpadeModel:
    return spade_core.build_model(_config(instance=True), discriminator=False, seed=0).eval()


def labels(batch: int = 2, value: int = 3, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    out = torch.randint(0, 10, (batch, 64, 64)).to(dtype)
    out[:, 0, 0] = value
    return out


def style(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64) * 2 - 1


# ---------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("bad", [11, 12, 100, 254, -1])
def test_label_ids_outside_the_classes(plain: spade_core.SpadeModel, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"label ids \[{bad}\] are outside the model's classes; expected 0\.\.10 or 255 \(don't care\)"):
        plain.synthesize(labels(value=bad))


def test_dontcare_value_accepted_and_mapped_to_channel_label_nc(plain: spade_core.SpadeModel) -> None:
    from spade_core.semantics import label_channels, semantic_input

    raw = labels(dtype=torch.uint8)
    raw[:, :8] = 255
    out = plain.synthesize(raw)
    assert out.shape == (2, 3, 64, 64)
    channels = label_channels(raw, plain.config.labels)
    assert torch.equal(channels == 10, raw == 255)
    seg = semantic_input(raw, plain.config.labels)
    assert seg.shape == (2, 11, 64, 64)
    assert torch.equal(seg[:, 10].bool(), raw == 255)
    # raw id 10 (= label_nc) is the don't-care channel too, as in the reference
    assert torch.equal(plain.synthesize(torch.where(raw == 255, 10, raw.long())), out)


def test_dontcare_value_refused_without_dontcare_channel(no_dontcare: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"label ids \[255\] are outside the model's classes; expected 0\.\.9$"):
        no_dontcare.synthesize(labels(value=255, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"label ids \[10\] are outside"):
        no_dontcare.synthesize(labels(value=10))


def test_many_bad_ids_are_listed_briefly(plain: spade_core.SpadeModel) -> None:
    raw = torch.arange(64 * 64).reshape(1, 64, 64) + 20
    with pytest.raises(ValueError, match=r"label ids \[20, 21, 22, 23, 24, 25, 26, 27, 28, 29\] are outside"):
        plain.synthesize(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_labels(plain: spade_core.SpadeModel, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"labels must have an integer dtype \(raw label ids\), got {dtype}"):
        plain.synthesize(labels().to(dtype))


@pytest.mark.parametrize("shape", [(64, 64), (1, 1, 64, 64), (64,)])
def test_wrong_label_dims(plain: spade_core.SpadeModel, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(B, H, W\), got \(" + ", ".join(map(str, shape))):
        plain.synthesize(torch.zeros(shape, dtype=torch.long))


def test_labels_not_a_tensor(plain: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(B, H, W\), got ndarray"):
        plain.synthesize(np.zeros((1, 64, 64), dtype=np.int64))  # type: ignore[arg-type]


def test_semantic_input_checks_labels_too() -> None:
    from spade_core.semantics import label_channels

    cfg = LabelConfig(label_nc=5, contain_dontcare_label=False)
    with pytest.raises(ValueError, match=r"labels must be a torch.Tensor of integer label ids, got list"):
        label_channels([[1]], cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must have shape \(B, H, W\), got \(4, 4\)"):
        label_channels(torch.zeros(4, 4, dtype=torch.long), cfg)


def test_instance_map_errors(plain: spade_core.SpadeModel, with_instance: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"needs an instance map \(B, H, W\)"):
        with_instance.synthesize(labels())
    with pytest.raises(ValueError, match=r"instance map shape \(2, 32, 32\) differs from labels \(2, 64, 64\)"):
        with_instance.synthesize(labels(), instance=torch.zeros(2, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"takes no instance map"):
        plain.synthesize(labels(), instance=labels())
    assert with_instance.synthesize(labels(), instance=labels()).shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------
# Style inputs


def test_style_image_for_model_without_encoder(plain: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"no style input \(not a VAE model\): send neither a style image nor a style code"):
        plain.synthesize(labels(), style=style())
    with pytest.raises(ValueError, match=r"this model has no style input \(not a VAE model\)"):
        plain.encode(style())


def test_z_for_model_without_vae(plain: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"no style input \(not a VAE model\): send neither a style image nor a style code"):
        plain.synthesize(labels(), z=torch.zeros(2, 16))


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 255.0), (-1.5, 1.0), (0.0, 1.2)])
def test_style_out_of_range(vae: spade_core.SpadeModel, lo: float, hi: float) -> None:
    img = torch.rand(2, 3, 64, 64) * (hi - lo) + lo
    img[0, 0, 0, 0], img[0, 0, 0, 1] = lo, hi
    with pytest.raises(ValueError, match=r"style values must lie in \[-1, 1\], got .*\(scale x/255\*2-1\)"):
        vae.synthesize(labels(), style=img)
    with pytest.raises(ValueError, match=r"style values must lie in \[-1, 1\]"):
        vae.encode(img)


def test_style_batch_mismatch(vae: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"style must have shape \(2, 3, H, W\) to match the labels, got \(1, 3, 64, 64\)"):
        vae.synthesize(labels(batch=2), style=style(batch=1))


@pytest.mark.parametrize(
    ("img", "message"),
    [
        (torch.zeros(3, 64, 64), r"style must have shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        (torch.zeros(2, 1, 64, 64), r"style must have shape \(B, 3, H, W\), got \(2, 1, 64, 64\)"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), r"style must be a float tensor \(B, 3, H, W\) in \[-1, 1\]"),
        (np.zeros((2, 3, 64, 64), dtype=np.float32), r"style must be a float tensor \(B, 3, H, W\) in \[-1, 1\]"),
    ],
)
def test_malformed_style(vae: spade_core.SpadeModel, img: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.synthesize(labels(), style=img)


@pytest.mark.parametrize(
    ("z", "got"),
    [
        (torch.zeros(2, 15), r"\(2, 15\)"),
        (torch.zeros(1, 16), r"\(1, 16\)"),
        (torch.zeros(2, 16, 1), r"\(2, 16, 1\)"),
        (torch.zeros(32), r"\(32,\)"),
        (torch.zeros(2, 16, dtype=torch.long), r"\(2, 16\)"),
        (np.zeros((2, 16), dtype=np.float32), "ndarray"),
    ],
)
def test_z_of_wrong_shape(vae: spade_core.SpadeModel, z: Any, got: str) -> None:
    with pytest.raises(ValueError, match=r"z must be a float tensor of shape \(2, 16\), got " + got):
        vae.synthesize(labels(), z=z)


def test_z_must_be_finite(vae: spade_core.SpadeModel) -> None:
    z = torch.zeros(2, 16)
    z[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"z must be finite"):
        vae.synthesize(labels(), z=z)


def test_a_seed_gives_one_style_code_whichever_caller_draws_it(vae: spade_core.SpadeModel) -> None:
    """sample_z is the one place a seed becomes z: synthesize(seed=) and a caller that samples
    first (the Serve replica does, per request) draw the same image."""
    lab = labels(batch=1)
    assert torch.equal(vae.synthesize(lab, seed=7), vae.synthesize(lab, z=vae.sample_z(1, seed=7)))
    image = style(batch=1)
    mu, logvar = vae.encode(image)
    assert torch.equal(vae.sample_z(1, mu=mu, logvar=logvar), mu)  # no seed: the encoded style itself
    assert torch.equal(vae.synthesize(lab, style=image, seed=3),
                       vae.synthesize(lab, z=vae.sample_z(1, seed=3, mu=mu, logvar=logvar)))
    with pytest.raises(ValueError, match=r"style code's mu must be 1 x 16 finite numbers"):
        vae.sample_z(1, mu=torch.zeros(1, 15))


def test_style_and_z_together(vae: spade_core.SpadeModel) -> None:
    with pytest.raises(ValueError, match=r"pass either a style image or a style code z, not both"):
        vae.synthesize(labels(), style=style(), z=torch.zeros(2, 16))


def test_valid_style_inputs_work(vae: spade_core.SpadeModel) -> None:
    assert vae.synthesize(labels(), style=style()).shape == (2, 3, 64, 64)
    assert vae.synthesize(labels(), z=torch.zeros(2, 16)).shape == (2, 3, 64, 64)
    assert vae.synthesize(labels(), seed=3).shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------
# Checkpoint directories (ours)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid VAE checkpoint in our format."""
    model = spade_core.build_model(_config(vae=True), seed=0)
    return spade_core.save_checkpoint(model, tmp_path_factory.mktemp("saved") / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(root: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = json.loads((root / "config.json").read_text())
    edit(data)
    (root / "config.json").write_text(json.dumps(data))
    return root


def test_saved_checkpoint_loads(saved: Path) -> None:
    model = spade_core.load_checkpoint(saved)
    assert model.config == _config(vae=True)


def test_checkpoint_dir_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint directory .*missing does not exist"):
        spade_core.load_checkpoint(tmp_path / "missing")


def test_checkpoint_path_is_a_file(saved: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint directory .*config.json is not a directory"):
        spade_core.load_checkpoint(saved / "config.json")


def test_checkpoint_dir_empty(tmp_path: Path) -> None:
    expected = (
        r"is not a checkpoint: expected config.json \+ generator.safetensors \(spade-ray\) "
        r"or opt.txt \+ latest_net_G.pth \(NVlabs/SPADE\); found \[\]"
    )
    with pytest.raises(ValueError, match=expected):
        spade_core.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=expected):
        spade_core.read_config(tmp_path)


def test_unrelated_files_are_listed(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is not a checkpoint: .*found \['model.ckpt'\]"):
        spade_core.load_checkpoint(tmp_path)


def test_config_without_generator_weights(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path / "c")
    (root / "generator.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no generator weights \(generator.safetensors\)"):
        spade_core.load_checkpoint(root)


def test_vae_config_without_encoder_weights(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path / "c")
    (root / "encoder.safetensors").unlink()
    with pytest.raises(ValueError, match=r"is a VAE model \(config has an encoder\) but encoder.safetensors is missing"):
        spade_core.load_checkpoint(root)


def test_encoder_weights_without_vae_config(saved: Path, tmp_path: Path) -> None:
    root = _copy(saved, tmp_path / "c")
    shutil.copy(saved / "encoder.safetensors", tmp_path / "enc")
    spade_core.save_checkpoint(spade_core.build_model(_config(), seed=0), root)
    shutil.copy(tmp_path / "enc", root / "encoder.safetensors")
    with pytest.raises(ValueError, match=r"has encoder.safetensors but its config has no encoder"):
        spade_core.load_checkpoint(root)


def test_weights_do_not_match_config(saved: Path, tmp_path: Path) -> None:
    root = _edit_config(_copy(saved, tmp_path / "c"), lambda d: d["model"]["generator"].update(ngf=16))
    with pytest.raises(ValueError, match=r"generator.safetensors does not match the architecture in its config:(.|\n)*size mismatch for fc"):
        spade_core.load_checkpoint(root)


def test_weights_with_missing_keys(saved: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    root = _copy(saved, tmp_path / "c")
    state = load_file(root / "discriminator.safetensors")
    state.pop(next(iter(state)))
    save_file(state, root / "discriminator.safetensors")
    with pytest.raises(ValueError, match=r"discriminator.safetensors does not match the architecture in its config:(.|\n)*Missing key"):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize(
    "corrupt",
    [b"", b"garbage" * 20, "truncate"],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_safetensors(saved: Path, tmp_path: Path, corrupt: Any) -> None:
    root = _copy(saved, tmp_path / "c")
    target = root / "generator.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if corrupt == "truncate" else corrupt)
    with pytest.raises(ValueError, match=r"generator.safetensors is not a readable safetensors file"):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"].update(extra=1), r"unknown key model.extra; model takes labels, generator"),
        (lambda d: d["model"]["generator"].update(ngff=8), r"unknown key model.generator.ngff; model.generator takes ngf"),
        (lambda d: d["model"]["generator"]["spade"].update(kernel=3), r"unknown key model.generator.spade.kernel; model.generator.spade takes norm"),
        (lambda d: d["model"]["labels"].update(label_count=3), r"unknown key model.labels.label_count"),
        (lambda d: d["model"]["encoder"].update(nef=3), r"unknown key model.encoder.nef"),
        (lambda d: d["model"]["discriminator"].update(netD="x"), r"unknown key model.discriminator.netD"),
        (lambda d: d.update(comment="hi"), r"config.json: unknown key\(s\) comment; expected 'format_version' and 'model'"),
    ],
    ids=["model", "generator", "spade", "labels", "encoder", "discriminator", "top_level"],
)
def test_config_unknown_key(saved: Path, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    root = _edit_config(_copy(saved, tmp_path / "c"), edit)
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"]["generator"].update(ngf="8"), r"model.generator.ngf has a wrong value '8'; expected an integer"),
        (lambda d: d["model"]["generator"].update(ngf=8.0), r"model.generator.ngf has a wrong value 8.0; expected an integer"),
        (lambda d: d["model"]["generator"].update(ngf=True), r"model.generator.ngf has a wrong value True; expected an integer"),
        (lambda d: d["model"]["generator"].update(z_dim="16"), r"model.generator.z_dim has a wrong value '16'; expected an integer or null"),
        (lambda d: d["model"]["generator"].update(aspect_ratio="1"), r"model.generator.aspect_ratio has a wrong value '1'; expected a finite number"),
        (
            lambda d: d["model"]["generator"].update(num_upsampling_layers="many"),
            r"generator.num_upsampling_layers has a wrong value 'many'; expected one of 'normal', 'more', 'most'",
        ),
        (
            lambda d: d["model"]["generator"]["spade"].update(norm="group"),
            r"generator.spade.norm has a wrong value 'group'; expected one of 'instance', 'batch'",
        ),
        (lambda d: d["model"]["labels"].update(contain_dontcare_label=1), r"model.labels.contain_dontcare_label has a wrong value 1; expected true or false"),
        (lambda d: d["model"].update(generator=5), r"generator must be a mapping, got int"),
        (lambda d: d["model"].update(generator=[["ngf", 8]]), r"generator must be a mapping, got list"),
        (lambda d: d["model"]["generator"].update(spade="batch"), r"generator.spade must be a mapping, got str"),
        (lambda d: d["model"].update(encoder=[1]), r"encoder must be a mapping, got list"),
        (lambda d: d["model"].update(labels=None), r"model.labels must be a mapping, got null"),
        (lambda d: d.update(model=[]), r"model config must be a mapping, got list"),
        (lambda d: d.pop("model"), r"model config must be a mapping, got NoneType"),
    ],
)
def test_config_wrong_type(saved: Path, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    root = _edit_config(_copy(saved, tmp_path / "c"), edit)
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_config_bad_format_version(saved: Path, tmp_path: Path, version: Any) -> None:
    root = _edit_config(_copy(saved, tmp_path / "c"), lambda d: d.update(format_version=version))
    with pytest.raises(ValueError, match=rf"config.json: format_version {re.escape(repr(version))} is not supported \(expected 1\)"):
        spade_core.load_checkpoint(root)


def test_config_without_format_version(saved: Path, tmp_path: Path) -> None:
    root = _edit_config(_copy(saved, tmp_path / "c"), lambda d: d.pop("format_version"))
    with pytest.raises(ValueError, match=r"format_version None is not supported \(expected 1\)"):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"config.json is not valid JSON"),
        (b"\xff\xfe\x00garbage", r"config.json is not valid JSON"),
        (b"[1, 2]", r"config.json must hold a JSON object, got list"),
    ],
    ids=["syntax", "binary", "array"],
)
def test_config_not_json(saved: Path, tmp_path: Path, content: bytes, message: str) -> None:
    root = _copy(saved, tmp_path / "c")
    (root / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)
    with pytest.raises(ValueError, match=message):
        spade_core.read_config(root)


def test_config_that_fails_validation(saved: Path, tmp_path: Path) -> None:
    root = _edit_config(_copy(saved, tmp_path / "c"), lambda d: d["model"]["encoder"].update(z_dim=32))
    with pytest.raises(ValueError, match=r"model.generator.z_dim \(16\) must equal model.encoder.z_dim \(32\)"):
        spade_core.load_checkpoint(root)


# ---------------------------------------------------------------------------------------
# Checkpoint directories (the reference's)


REF_OPT = {
    "dataset_mode": "custom",
    "label_nc": 10,
    "contain_dontcare_label": True,
    "no_instance": True,
    "ngf": 8,
    "ndf": 8,
    "n_layers_D": 2,
    "crop_size": 64,
    "norm_G": "spectralspadesyncbatch3x3",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = spade_core.build_model(_config(), seed=0)
    root = tmp_path_factory.mktemp("reference") / "ckpt"
    return oracle.write_reference_checkpoint(
        root, REF_OPT, model.generator.state_dict(), discriminator=model.discriminator.state_dict()
    )


def _with_opt(reference: Path, dst: Path, **options: Any) -> Path:
    root = _copy(reference, dst)
    (root / "opt.txt").write_text(oracle.format_opt_txt({**REF_OPT, **options}))
    return root


def test_reference_checkpoint_loads(reference: Path) -> None:
    assert spade_core.load_checkpoint(reference).config == _config()


@pytest.mark.parametrize(
    ("norm_g", "message"),
    [
        ("spectralbatch3x3", r"unsupported norm_G 'spectralbatch3x3'; expected e.g. 'spectralspadesyncbatch3x3'"),
        ("spectralspadegroup3x3", r"unsupported norm_G 'spectralspadegroup3x3'"),
        ("spectralspadeinstance", r"unsupported norm_G 'spectralspadeinstance'"),
        ("spectralspadebatch4x4", r"spade.kernel_size must be 3 or 5, got 4"),
    ],
)
def test_opt_txt_unsupported_norm_g(reference: Path, tmp_path: Path, norm_g: str, message: str) -> None:
    root = _with_opt(reference, tmp_path / "c", norm_G=norm_g)
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"netG": "pix2pixhd"}, r"only netG 'spade' is supported, opt.txt has 'pix2pixhd'"),
        ({"netD_subarch": "other"}, r"only netD 'multiscale' with netD_subarch 'n_layer' is supported"),
        ({"ngf": "abc"}, r"opt.txt option 'ngf' must be an integer, got 'abc'"),
        ({"crop_size": "1.5"}, r"opt.txt option 'crop_size' must be an integer, got '1.5'"),
        ({"aspect_ratio": "wide"}, r"opt.txt option 'aspect_ratio' must be a number, got 'wide'"),
        ({"n_layers_D": "four"}, r"opt.txt option 'n_layers_D' must be an integer, got 'four'"),
        ({"no_instance": "yes"}, r"opt.txt option 'no_instance' must be True or False, got 'yes'"),
        ({"num_upsampling_layers": "many"}, r"generator.num_upsampling_layers must be one of \['more', 'most', 'normal'\], got 'many'"),
        ({"norm_D": "spectralgroup"}, r"unsupported norm_D 'spectralgroup'; expected e.g. 'spectralinstance'"),
        ({"use_vae": True, "norm_E": "weird"}, r"unsupported norm_E 'weird'; expected e.g. 'spectralinstance'"),
        ({"crop_size": 16}, r"generator.crop_size 16 is too small for 5 upsamplings \(need >= 32\)"),
    ],
)
def test_opt_txt_bad_options(reference: Path, tmp_path: Path, options: dict[str, Any], message: str) -> None:
    root = _with_opt(reference, tmp_path / "c", **options)
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)


def test_opt_txt_missing_option(reference: Path, tmp_path: Path) -> None:
    root = _copy(reference, tmp_path / "c")
    text = (root / "opt.txt").read_text()
    (root / "opt.txt").write_text("\n".join(line for line in text.splitlines() if "label_nc" not in line))
    with pytest.raises(ValueError, match=r"opt.txt has no 'label_nc' option; is this a SPADE checkpoint\?"):
        spade_core.load_checkpoint(root)


def test_opt_txt_not_text(reference: Path, tmp_path: Path) -> None:
    root = _copy(reference, tmp_path / "c")
    (root / "opt.txt").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=r"opt.txt is not a text file of options"):
        spade_core.load_checkpoint(root)


def test_reference_weights_without_opt_txt(reference: Path, tmp_path: Path) -> None:
    root = _copy(reference, tmp_path / "c")
    (root / "opt.txt").unlink()
    with pytest.raises(ValueError, match=r"holds reference weights but no opt.txt to build the architecture from"):
        spade_core.load_checkpoint(root)


def test_opt_txt_without_generator_weights(reference: Path, tmp_path: Path) -> None:
    root = _copy(reference, tmp_path / "c")
    (root / "latest_net_G.pth").unlink()
    with pytest.raises(ValueError, match=r"has no generator weights \(latest_net_G.pth\)"):
        spade_core.load_checkpoint(root)


def test_reference_vae_without_encoder_weights(reference: Path, tmp_path: Path) -> None:
    root = _with_opt(reference, tmp_path / "c", use_vae=True)
    with pytest.raises(ValueError, match=r"is a VAE model \(config has an encoder\) but latest_net_E.pth is missing"):
        spade_core.load_checkpoint(root)


def test_reference_weights_of_another_size(reference: Path, tmp_path: Path) -> None:
    root = _with_opt(reference, tmp_path / "c", ngf=16)
    with pytest.raises(ValueError, match=r"latest_net_G.pth does not match the architecture in its config:(.|\n)*size mismatch"):
        spade_core.load_checkpoint(root)


@pytest.mark.parametrize("content", ["garbage", "list", "module"])
def test_reference_weights_not_a_state_dict(reference: Path, tmp_path: Path, content: str) -> None:
    root = _copy(reference, tmp_path / "c")
    target = root / "latest_net_G.pth"
    if content == "garbage":
        target.write_bytes(b"not a pickle at all")
        message = r"latest_net_G.pth is not a loadable state dict"
    elif content == "list":
        torch.save([torch.zeros(1)], target)
        message = r"latest_net_G.pth does not hold a state dict of tensors"
    else:  # a pickled module is refused without being unpickled
        torch.save(torch.nn.Linear(2, 2), target)
        message = r"latest_net_G.pth is not a loadable state dict"
    with pytest.raises(ValueError, match=message):
        spade_core.load_checkpoint(root)


# ---------------------------------------------------------------------------------------
# ModelConfig validation


def _gen(**kw: Any) -> ModelConfig:
    return ModelConfig(generator=GeneratorConfig(**{"ngf": 8, "crop_size": 64, **kw}))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: _gen(num_upsampling_layers="many"),
            r"generator.num_upsampling_layers must be one of \['more', 'most', 'normal'\], got 'many'",
        ),
        (lambda: _gen(spade=SpadeConfig(kernel_size=4)), r"spade.kernel_size must be 3 or 5, got 4"),
        (
            lambda: _gen(spade=SpadeConfig(norm="group")),  # type: ignore[arg-type]
            r"spade.norm must be 'instance' or 'batch', got 'group'",
        ),
        (lambda: _gen(crop_size=16), r"generator.crop_size 16 is too small for 5 upsamplings \(need >= 32\)"),
        (
            lambda: _gen(crop_size=64, num_upsampling_layers="most"),
            r"generator.crop_size 64 is too small for 7 upsamplings \(need >= 128\)",
        ),
        (
            lambda: _gen(crop_size=32, num_upsampling_layers="more"),
            r"generator.crop_size 32 is too small for 6 upsamplings \(need >= 64\)",
        ),
        (lambda: _gen(crop_size=64, aspect_ratio=4.0), r"generator.crop_size 64 is too small for 5 upsamplings"),
        (
            lambda: _gen(crop_size=32, spade=SpadeConfig(norm="instance")),
            r"generator.crop_size 32 is too small for spade.norm 'instance' with 5 upsamplings: the first block would "
            r"run on a 1x1 grid, and instance norm needs more than one pixel",
        ),
        (lambda: _gen(ngf=0), r"generator.ngf must be >= 1"),
        (lambda: _gen(ngf=1, crop_size=128, num_upsampling_layers="most"), r"generator.ngf must be >= 2 with 'most'"),
        (lambda: _gen(aspect_ratio=0.0), r"generator.aspect_ratio must be > 0"),
        (lambda: _gen(z_dim=0), r"generator.z_dim must be >= 1 or null"),
        (
            lambda: ModelConfig(generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=64), encoder=EncoderConfig(z_dim=256)),
            r"model.generator.z_dim \(64\) must equal model.encoder.z_dim \(256\) in a VAE model",
        ),
        (
            lambda: ModelConfig(generator=GeneratorConfig(ngf=8, crop_size=64), encoder=EncoderConfig(z_dim=256)),
            r"model.generator.z_dim \(None\) must equal model.encoder.z_dim \(256\) in a VAE model",
        ),
        (
            lambda: ModelConfig(encoder=EncoderConfig(input_size=100), generator=GeneratorConfig(z_dim=256)),
            r"encoder.input_size must be 4 \* 2\^k with k >= 1 \(e.g. 256\), got 100",
        ),
        (lambda: ModelConfig(labels=LabelConfig(label_nc=0)), r"labels.label_nc must be >= 1"),
        (lambda: ModelConfig(labels=LabelConfig(dontcare_value=300)), r"labels.dontcare_value must be in 0..255"),
        (lambda: ModelConfig(discriminator=DiscriminatorConfig(n_layers=0)), r"discriminator.n_layers must be >= 1"),
        (lambda: ModelConfig(discriminator=DiscriminatorConfig(num_D=0)), r"discriminator.num_D must be >= 1"),
        (
            lambda: ModelConfig(discriminator=DiscriminatorConfig(norm="group")),  # type: ignore[arg-type]
            r"discriminator.norm must be instance, batch or none, got 'group'",
        ),
    ],
)
def test_model_config_validation(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        build()


def test_instance_norm_at_the_smallest_grid_that_works() -> None:
    """Two pixels are enough for instance norm (and one is for batch norm)."""
    cfg = _gen(crop_size=64, spade=SpadeConfig(norm="instance"))
    assert cfg.generator.initial_size == (2, 2)
    tall = _gen(crop_size=32, aspect_ratio=0.5, spade=SpadeConfig(norm="instance"))
    assert tall.generator.initial_size == (2, 1)
    assert _gen(crop_size=32).generator.initial_size == (1, 1)  # batch norm: fine


def test_config_replace_is_validated() -> None:
    cfg = _gen()
    with pytest.raises(ValueError, match=r"spade.kernel_size must be 3 or 5, got 7"):
        dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, spade=SpadeConfig(kernel_size=7)))


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match=r"model config must be a mapping, got str"):
        ModelConfig.from_dict("config")  # type: ignore[arg-type]
    assert ModelConfig.from_dict(_config(vae=True).to_dict()) == _config(vae=True)
