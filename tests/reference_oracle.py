"""An independent, functional re-statement of the reference (NVlabs/SPADE) networks in eval mode.

Written from the published description of the architecture, not from spade_core and not
from the reference's code. It works directly on REFERENCE-FORMAT state dicts (old-style
spectral norm keys ``weight_orig`` / ``weight_u`` / ``weight_v``, SPADE keys such as
``head_0.norm_0.mlp_shared.0.weight``) and on the reference's options (``opt.txt`` values as
strings), using only ``torch.nn.functional``. It is the oracle the architecture tests
compare spade_core against.

Also here: converting one of our state dicts (torch parametrisation keys) to reference
keys, and writing a reference-format checkpoint directory (``latest_net_*.pth`` + ``opt.txt``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
State = Mapping[str, Tensor]

EPS = 1e-5  # eps of the reference's parameter-free norms (torch defaults)
LRELU = 0.2
NUM_UP = {"normal": 5, "more": 6, "most": 7}


# ---------------------------------------------------------------------------------------
# Options


def _flag(opt: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = opt.get(key, default)
    if isinstance(value, bool):
        return value
    if value not in ("True", "False"):
        raise ValueError(f"option {key} must be True or False, got {value!r}")
    return value == "True"


def semantic_nc(opt: Mapping[str, Any]) -> int:
    """label_nc (+1 don't care) (+1 instance edges), as the reference computes it."""
    return (
        int(opt["label_nc"])
        + int(_flag(opt, "contain_dontcare_label"))
        + int(not _flag(opt, "no_instance"))
    )


def latent_grid(opt: Mapping[str, Any]) -> tuple[int, int]:
    """(sh, sw): sw = crop // 2**n, sh = round(sw / aspect_ratio)."""
    n = NUM_UP[str(opt["num_upsampling_layers"])]
    sw = int(opt["crop_size"]) // (2**n)
    sh = round(sw / float(opt.get("aspect_ratio", 1.0)))
    return sh, sw


def _parse_norm_g(norm_g: str) -> tuple[str, int]:
    """'spectralspadesyncbatch3x3' -> ('batch', 3); 'spadeinstance5x5' -> ('instance', 5)."""
    text = norm_g[len("spectral") :] if norm_g.startswith("spectral") else norm_g
    match = re.fullmatch(r"spade(\D+)(\d)x\d", text)
    if not match:
        raise ValueError(f"not a SPADE norm_G: {norm_g!r}")
    kind = match.group(1)
    if kind == "instance":
        return "instance", int(match.group(2))
    if kind in ("batch", "syncbatch"):
        return "batch", int(match.group(2))
    raise ValueError(f"unknown parameter-free norm {kind!r} in {norm_g!r}")


# ---------------------------------------------------------------------------------------
# Primitive layers


def weight(state: State, prefix: str) -> Tensor:
    """The effective weight of ``prefix``: spectral norm in eval mode is W / (u . W_mat v)."""
    if f"{prefix}.weight_orig" in state:
        w = state[f"{prefix}.weight_orig"]
        u = state[f"{prefix}.weight_u"]
        v = state[f"{prefix}.weight_v"]
        w_mat = w.reshape(w.shape[0], -1)
        sigma = torch.dot(u, w_mat @ v)
        return w / sigma
    return state[f"{prefix}.weight"]


def conv(state: State, prefix: str, x: Tensor, *, stride: int = 1, padding: int | None = None) -> Tensor:
    w = weight(state, prefix)
    if padding is None:
        padding = w.shape[-1] // 2
    return F.conv2d(x, w, state.get(f"{prefix}.bias"), stride=stride, padding=padding)


def linear(state: State, prefix: str, x: Tensor) -> Tensor:
    return F.linear(x, weight(state, prefix), state.get(f"{prefix}.bias"))


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LRELU)


def spade(state: State, prefix: str, x: Tensor, seg: Tensor, *, norm: str, ks: int) -> Tensor:
    """norm(x) * (1 + gamma(seg)) + beta(seg), seg resized (nearest) to x."""
    if norm == "instance":
        normalized = F.instance_norm(x, eps=EPS)
    else:
        normalized = F.batch_norm(
            x,
            state[f"{prefix}.param_free_norm.running_mean"],
            state[f"{prefix}.param_free_norm.running_var"],
            training=False,
            eps=EPS,
        )
    seg = F.interpolate(seg, size=x.shape[-2:], mode="nearest")
    shared_w = state[f"{prefix}.mlp_shared.0.weight"]
    assert shared_w.shape[-1] == ks, f"{prefix}: kernel {shared_w.shape[-1]} != norm_G's {ks}"
    actv = F.relu(F.conv2d(seg, shared_w, state[f"{prefix}.mlp_shared.0.bias"], padding=ks // 2))
    gamma = F.conv2d(actv, state[f"{prefix}.mlp_gamma.weight"], state[f"{prefix}.mlp_gamma.bias"], padding=ks // 2)
    beta = F.conv2d(actv, state[f"{prefix}.mlp_beta.weight"], state[f"{prefix}.mlp_beta.bias"], padding=ks // 2)
    return normalized * (1 + gamma) + beta


def resnet_block(state: State, prefix: str, x: Tensor, seg: Tensor, *, norm: str, ks: int) -> Tensor:
    """x_s + conv_1(lrelu(norm_1(conv_0(lrelu(norm_0(x)))))), x_s learned (1x1, no bias) if fin != fout."""
    fin = x.shape[1]
    fout = weight(state, f"{prefix}.conv_1").shape[0]
    learned = f"{prefix}.conv_s.weight_orig" in state or f"{prefix}.conv_s.weight" in state
    assert learned == (fin != fout), f"{prefix}: learned shortcut iff fin != fout"
    if learned:
        assert f"{prefix}.conv_s.bias" not in state
        x_s = F.conv2d(spade(state, f"{prefix}.norm_s", x, seg, norm=norm, ks=ks), weight(state, f"{prefix}.conv_s"))
    else:
        x_s = x
    dx = conv(state, f"{prefix}.conv_0", lrelu(spade(state, f"{prefix}.norm_0", x, seg, norm=norm, ks=ks)), padding=1)
    dx = conv(state, f"{prefix}.conv_1", lrelu(spade(state, f"{prefix}.norm_1", dx, seg, norm=norm, ks=ks)), padding=1)
    return x_s + dx


def up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# ---------------------------------------------------------------------------------------
# Networks


def generator_forward(state: State, opt: Mapping[str, Any], seg: Tensor, z: Tensor | None = None) -> Tensor:
    """The reference SPADEGenerator in eval mode: one-hot ``seg`` (B, semantic_nc, H, W) -> (B, 3, H, W)."""
    ngf = int(opt["ngf"])
    mode = str(opt["num_upsampling_layers"])
    norm, ks = _parse_norm_g(str(opt["norm_G"]))
    sh, sw = latent_grid(opt)
    assert seg.shape[1] == semantic_nc(opt), f"seg has {seg.shape[1]} channels, opt says {semantic_nc(opt)}"

    if _flag(opt, "use_vae"):
        assert z is not None, "a VAE generator needs z"
        x = linear(state, "fc", z).view(-1, 16 * ngf, sh, sw)
    else:
        x = conv(state, "fc", F.interpolate(seg, size=(sh, sw), mode="nearest"), padding=1)

    def block(name: str, x: Tensor) -> Tensor:
        return resnet_block(state, name, x, seg, norm=norm, ks=ks)

    x = block("head_0", x)
    x = up(x)
    x = block("G_middle_0", x)
    if mode in ("more", "most"):
        x = up(x)
    x = block("G_middle_1", x)
    names = ["up_0", "up_1", "up_2", "up_3"] + (["up_4"] if mode == "most" else [])
    assert ("up_4.conv_0.weight_orig" in state or "up_4.conv_0.weight" in state) == (mode == "most")
    for name in names:
        x = up(x)
        x = block(name, x)
    x = conv(state, "conv_img", lrelu(x), padding=1)
    return torch.tanh(x)


def encoder_forward(state: State, image: Tensor) -> tuple[Tensor, Tensor]:
    """The reference ConvEncoder in eval mode (spectral instance norm): image -> (mu, logvar).

    The image is resized (bilinear) to the size its convs bring down to 4x4: 256 with the
    reference's six convs (``layer1..layer6``). With five convs (the reference's crop < 256
    layout) that is 128, where the reference itself would crash.
    """
    n = 0
    while any(k.startswith(f"layer{n + 1}.") for k in state):
        n += 1
    size = 4 * 2**n
    x = image
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    for i in range(1, n + 1):
        if i > 1:
            x = lrelu(x)
        assert f"layer{i}.0.bias" not in state, "a following norm drops the conv bias"
        x = F.conv2d(x, weight(state, f"layer{i}.0"), None, stride=2, padding=1)
        x = F.instance_norm(x, eps=EPS)
    x = lrelu(x).flatten(1)
    return linear(state, "fc_mu", x), linear(state, "fc_var", x)


# ---------------------------------------------------------------------------------------
# Inputs


def one_hot_input(
    labels: Tensor, opt: Mapping[str, Any], instance: Tensor | None = None
) -> Tensor:
    """Raw label ids (B, H, W) (+ instance ids) -> the reference's one-hot input.

    Raw id k -> channel k; 255 -> channel label_nc (don't care); then the instance edge map.
    """
    label_nc = int(opt["label_nc"])
    ids = labels.long().clone()
    if _flag(opt, "contain_dontcare_label"):
        ids[ids == 255] = label_nc
    nc = label_nc + int(_flag(opt, "contain_dontcare_label"))
    b, h, w = ids.shape
    seg = torch.zeros(b, nc, h, w).scatter_(1, ids.unsqueeze(1), 1.0)
    if not _flag(opt, "no_instance"):
        assert instance is not None
        seg = torch.cat([seg, edge_map(instance).unsqueeze(1).float()], dim=1)
    return seg


def edge_map(t: Tensor) -> Tensor:
    """True where an instance id differs from its right/left/lower/upper neighbour."""
    e = torch.zeros(t.shape, dtype=torch.bool)
    horiz = t[:, :, 1:] != t[:, :, :-1]
    vert = t[:, 1:, :] != t[:, :-1, :]
    e[:, :, 1:] = e[:, :, 1:] | horiz
    e[:, :, :-1] = e[:, :, :-1] | horiz
    e[:, 1:, :] = e[:, 1:, :] | vert
    e[:, :-1, :] = e[:, :-1, :] | vert
    return e


# ---------------------------------------------------------------------------------------
# Our state dicts -> reference checkpoints

_OURS_TO_REF = {
    "parametrizations.weight.original": "weight_orig",
    "parametrizations.weight.0._u": "weight_u",
    "parametrizations.weight.0._v": "weight_v",
}


def to_reference_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torch-parametrisation spectral-norm keys to the reference's old-style keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for ours, ref in _OURS_TO_REF.items():
            if key.endswith("." + ours) or key == ours:
                new = key[: len(key) - len(ours)] + ref
                break
        assert new not in out, f"duplicate key {new}"
        out[new] = value.detach().cpu().clone()
    return out


# The reference's options with their defaults (only those that shape the networks, plus a few
# that always appear), as its option parser would print them.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "aspect_ratio": 1.0,
    "batchSize": 1,
    "contain_dontcare_label": False,
    "crop_size": 256,
    "dataset_mode": "coco",
    "gpu_ids": "0",
    "init_type": "xavier",
    "init_variance": 0.02,
    "isTrain": True,
    "label_nc": 182,
    "load_size": 286,
    "model": "pix2pix",
    "n_layers_D": 4,
    "name": "label2coco",
    "ndf": 64,
    "nef": 16,
    "netD": "multiscale",
    "netD_subarch": "n_layer",
    "netG": "spade",
    "ngf": 64,
    "no_instance": False,
    "norm_D": "spectralinstance",
    "norm_E": "spectralinstance",
    "norm_G": "spectralspadesyncbatch3x3",
    "num_D": 2,
    "num_upsampling_layers": "normal",
    "output_nc": 3,
    "use_vae": False,
    "z_dim": 256,
}


def format_opt_txt(options: Mapping[str, Any], defaults: Mapping[str, Any] = REFERENCE_DEFAULTS) -> str:
    """Options in the reference's ``opt.txt`` layout: ``{key:>25}: {value:<30}`` + ``\\t[default: x]``."""
    lines = []
    for key in sorted({**defaults, **options}):
        value = options.get(key, defaults.get(key))
        comment = ""
        if key in defaults and str(defaults[key]) != str(value):
            comment = f"\t[default: {defaults[key]}]"
        lines.append(f"{key:>25}: {str(value):<30}{comment}")
    return "\n".join(lines) + "\n"


def write_reference_checkpoint(
    path: str | Path,
    options: Mapping[str, Any],
    generator: Mapping[str, Tensor],
    encoder: Mapping[str, Tensor] | None = None,
    discriminator: Mapping[str, Tensor] | None = None,
    *,
    convert: bool = True,
) -> Path:
    """A directory as the reference writes it: latest_net_{G,E,D}.pth (torch.save) + opt.txt.

    ``options`` override :data:`REFERENCE_DEFAULTS`. State dicts in our key format are
    renamed to reference keys first (``convert=False`` writes them as given).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name, state in (("G", generator), ("E", encoder), ("D", discriminator)):
        if state is None:
            continue
        torch.save(to_reference_state(state) if convert else dict(state), root / f"latest_net_{name}.pth")
    (root / "opt.txt").write_text(format_opt_txt(options))
    return root
