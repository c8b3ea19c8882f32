"""Reference (NVlabs/SPADE) checkpoints: ``opt.txt`` -> ModelConfig, and state-dict key renames.

The reference writes ``latest_net_{G,E,D}.pth`` (plain state dicts) and ``opt.txt``. Its
norm options are strings such as ``spectralspadesyncbatch3x3``; they are read here, at the
boundary, and never travel further than this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .config import DiscriminatorConfig, EncoderConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig

NET_FILES = {"generator": "latest_net_G.pth", "encoder": "latest_net_E.pth", "discriminator": "latest_net_D.pth"}
_DATASETS = {"ade20k": "ade20k", "coco": "coco_stuff", "cityscapes": "cityscapes", "custom": "custom"}


def is_nvlabs_dir(path: Path) -> bool:
    return (path / "opt.txt").is_file() or (path / NET_FILES["generator"]).is_file()


def parse_opt_txt(text: str) -> dict[str, str]:
    """``  key: value   [default: x]`` lines -> {key: value} (values stay strings)."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z_][\w]*):\s*(.*?)\s*(\[default:.*\])?\s*$", line)
        if match:
            options[match.group(1)] = match.group(2)
    return options


def config_from_options(opt: dict[str, str]) -> ModelConfig:
    """The architecture the reference builds from these options."""

    def get(key: str) -> str:
        if key not in opt:
            raise ValueError(f"opt.txt has no '{key}' option; is this a SPADE checkpoint?")
        return opt[key]

    def flag(key: str, default: bool | None = None) -> bool:
        if key not in opt and default is not None:
            return default
        value = get(key)
        if value not in ("True", "False"):
            raise ValueError(f"opt.txt option '{key}' must be True or False, got {value!r}")
        return value == "True"

    def number(key: str, kind: type, default: str | None = None) -> Any:
        value = opt.get(key, default) if default is not None else get(key)
        try:
            return kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"opt.txt option '{key}' must be {what}, got {value!r}") from None

    if get("netG") != "spade":
        raise ValueError(f"only netG 'spade' is supported, opt.txt has {opt['netG']!r}")
    if opt.get("netD", "multiscale") != "multiscale" or opt.get("netD_subarch", "n_layer") != "n_layer":
        raise ValueError("only netD 'multiscale' with netD_subarch 'n_layer' is supported")

    dataset_mode = opt.get("dataset_mode", "custom")
    labels = LabelConfig(
        label_nc=number("label_nc", int),
        contain_dontcare_label=flag("contain_dontcare_label"),
        instance_edges=not flag("no_instance"),
        dataset=_DATASETS.get(dataset_mode, "custom"),
    )
    spectral_g, spade = _spade_norm(get("norm_G"))
    use_vae = flag("use_vae", default=False)
    z_dim = number("z_dim", int, "256")
    crop_size = number("crop_size", int)
    ngf = number("ngf", int)
    generator = GeneratorConfig(
        ngf=ngf,
        crop_size=crop_size,
        aspect_ratio=number("aspect_ratio", float, "1.0"),
        num_upsampling_layers=get("num_upsampling_layers"),  # type: ignore[arg-type]
        spade=spade,
        spectral_norm=spectral_g,
        z_dim=z_dim if use_vae else None,
    )
    encoder = None
    if use_vae:
        spectral_e, norm_e = _plain_norm(opt.get("norm_E", "spectralinstance"), "norm_E")
        # The reference builds a sixth conv only when crop_size >= 256; with five convs its
        # weights fit an encoder whose input is 128 (which the reference itself never runs).
        encoder = EncoderConfig(
            ndf=ngf,
            z_dim=z_dim,
            input_size=256 if crop_size >= 256 else 128,
            norm=norm_e,  # type: ignore[arg-type]
            spectral_norm=spectral_e,
        )
    spectral_d, norm_d = _plain_norm(opt.get("norm_D", "spectralinstance"), "norm_D")
    discriminator = DiscriminatorConfig(
        ndf=number("ndf", int, "64"),
        n_layers=number("n_layers_D", int, "4"),
        num_D=number("num_D", int, "2"),
        norm=norm_d,  # type: ignore[arg-type]
        spectral_norm=spectral_d,
        image_nc=number("output_nc", int, "3"),
    )
    return ModelConfig(labels=labels, generator=generator, encoder=encoder, discriminator=discriminator)


def _spade_norm(norm_g: str) -> tuple[bool, SpadeConfig]:
    match = re.fullmatch(r"(spectral)?spade(instance|batch|syncbatch)(\d)x\d", norm_g)
    if not match:
        raise ValueError(f"unsupported norm_G {norm_g!r}; expected e.g. 'spectralspadesyncbatch3x3'")
    norm = "instance" if match.group(2) == "instance" else "batch"  # synced batch norm: same weights
    return bool(match.group(1)), SpadeConfig(norm=norm, kernel_size=int(match.group(3)))


def _plain_norm(norm: str, option: str) -> tuple[bool, str]:
    match = re.fullmatch(r"(spectral)?(instance|batch|syncbatch|sync_batch|none|)", norm)
    if not match:
        raise ValueError(f"unsupported {option} {norm!r}; expected e.g. 'spectralinstance'")
    kind = match.group(2)
    kind = "none" if kind == "" else ("batch" if "batch" in kind else kind)
    return bool(match.group(1)), kind


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old-style spectral-norm keys (``weight_orig/_u/_v``) to torch's parametrisation keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        head = f"{prefix}." if prefix else ""
        if leaf == "weight_orig":
            out[f"{head}parametrizations.weight.original"] = value
        elif leaf == "weight_u":
            out[f"{head}parametrizations.weight.0._u"] = value
        elif leaf == "weight_v":
            out[f"{head}parametrizations.weight.0._v"] = value
        elif leaf == "weight" and f"{head}weight_orig" in state:
            continue  # very old torch also saved the derived weight; the parametrisation recomputes it
        else:
            out[key] = value
    return out


def load_net(path: Path) -> dict[str, Any]:
    """A reference ``.pth`` state dict, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-weight files
        raise ValueError(f"{path} is not a loadable state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return convert_state_dict(state)
