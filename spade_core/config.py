"""Architecture configs: frozen dataclasses that travel with the weights as config.json.

They describe shapes and wiring only. Training choices (losses, optimiser, synced batch
norm) live elsewhere: the same weights load whichever way they were trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1

ParamFreeNorm = Literal["instance", "batch"]
UpsamplingLayers = Literal["normal", "more", "most"]
# How many 2x upsamplings the generator performs for each setting.
NUM_UPSAMPLINGS: dict[str, int] = {"normal": 5, "more": 6, "most": 7}


@dataclass(frozen=True)
class LabelConfig:
    """How raw dataset label ids become input channels.

    Raw id k goes to channel k (this is what the reference does for every dataset,
    ADE20K included: its intended ``label - 1`` shift is a no-op). With a don't-care
    channel, the raw value ``dontcare_value`` (255) goes to channel ``label_nc``.
    With ``instance_edges`` one more channel carries the instance boundary map.
    """

    label_nc: int = 150
    contain_dontcare_label: bool = True
    instance_edges: bool = False
    dontcare_value: int = 255
    dataset: str = "ade20k"  # names the class list and palette; not an architecture switch

    @property
    def num_label_channels(self) -> int:
        return self.label_nc + int(self.contain_dontcare_label)

    @property
    def semantic_nc(self) -> int:
        return self.num_label_channels + int(self.instance_edges)

    def __post_init__(self) -> None:
        self.validate()  # built by configtools.build, a broken rule names its full key

    def validate(self) -> None:
        _require(self.label_nc >= 1, "labels.label_nc must be >= 1")
        _require(0 <= self.dontcare_value <= 255, "labels.dontcare_value must be in 0..255")


@dataclass(frozen=True)
class SpadeConfig:
    norm: ParamFreeNorm = "batch"  # synced batch norm is a runtime choice, see norms.py
    kernel_size: int = 3
    hidden: int = 128

    def __post_init__(self) -> None:
        self.validate()  # built by configtools.build, a broken rule names its full key

    def validate(self) -> None:
        _require(self.norm in ("instance", "batch"), f"spade.norm must be 'instance' or 'batch', got {self.norm!r}")
        _require(self.kernel_size in (3, 5), f"spade.kernel_size must be 3 or 5, got {self.kernel_size}")
        _require(self.hidden >= 1, "spade.hidden must be >= 1")


@dataclass(frozen=True)
class GeneratorConfig:
    ngf: int = 64
    crop_size: int = 256
    aspect_ratio: float = 1.0
    num_upsampling_layers: UpsamplingLayers = "normal"
    spade: SpadeConfig = field(default_factory=SpadeConfig)
    spectral_norm: bool = True
    # Style-code input (VAE models): fc is a Linear from z. None: fc is a 3x3 conv
    # on the label map downsampled to the initial grid.
    z_dim: int | None = None

    @property
    def num_upsamplings(self) -> int:
        return NUM_UPSAMPLINGS[self.num_upsampling_layers]

    @property
    def initial_size(self) -> tuple[int, int]:
        """(height, width) of the grid the first block works on."""
        sw = self.crop_size // (2**self.num_upsamplings)
        sh = round(sw / self.aspect_ratio)
        return sh, sw

    @property
    def output_size(self) -> tuple[int, int]:
        sh, sw = self.initial_size
        scale = 2**self.num_upsamplings
        return sh * scale, sw * scale

    def __post_init__(self) -> None:
        self.validate()  # built by configtools.build, a broken rule names its full key

    def validate(self) -> None:
        _require(
            self.num_upsampling_layers in NUM_UPSAMPLINGS,
            f"generator.num_upsampling_layers must be one of {sorted(NUM_UPSAMPLINGS)}, got {self.num_upsampling_layers!r}",
        )
        _require(self.ngf >= 1, "generator.ngf must be >= 1")
        _require(self.num_upsampling_layers != "most" or self.ngf >= 2, "generator.ngf must be >= 2 with 'most'")
        _require(self.aspect_ratio > 0, "generator.aspect_ratio must be > 0")
        sh, sw = self.initial_size
        _require(
            sh >= 1 and sw >= 1,
            f"generator.crop_size {self.crop_size} is too small for {self.num_upsamplings} upsamplings "
            f"(need >= {2**self.num_upsamplings})",
        )
        _require(
            self.spade.norm != "instance" or sh * sw > 1,
            f"generator.crop_size {self.crop_size} is too small for spade.norm 'instance' with "
            f"{self.num_upsamplings} upsamplings: the first block would run on a {sh}x{sw} grid, and instance "
            f"norm needs more than one pixel (at aspect_ratio 1: crop_size >= {2 * 2**self.num_upsamplings})",
        )
        _require(self.z_dim is None or self.z_dim >= 1, "generator.z_dim must be >= 1 or null")
        self.spade.validate()


@dataclass(frozen=True)
class EncoderConfig:
    """VAE style encoder: stride-2 3x3 convs down to a 4x4 grid, then fc_mu / fc_var.

    The input is resized to ``input_size`` first (the reference always uses 256, with 6
    convs); the number of convs follows from it, so any crop size works.
    """

    ndf: int = 64  # the reference sizes the encoder with ngf
    z_dim: int = 256
    input_size: int = 256
    norm: Literal["instance", "batch", "none"] = "instance"
    spectral_norm: bool = True

    @property
    def num_layers(self) -> int:
        return int(round(math.log2(self.input_size // 4)))

    def __post_init__(self) -> None:
        self.validate()  # built by configtools.build, a broken rule names its full key

    def validate(self) -> None:
        n = self.input_size // 4
        _require(
            self.input_size % 4 == 0 and n >= 2 and n & (n - 1) == 0,
            f"encoder.input_size must be 4 * 2^k with k >= 1 (e.g. 256), got {self.input_size}",
        )
        _require(self.norm in ("instance", "batch", "none"), f"encoder.norm must be instance, batch or none, got {self.norm!r}")
        _require(self.ndf >= 1 and self.z_dim >= 1, "encoder.ndf and encoder.z_dim must be >= 1")


@dataclass(frozen=True)
class DiscriminatorConfig:
    ndf: int = 64
    n_layers: int = 4
    num_D: int = 2
    norm: Literal["instance", "batch", "none"] = "instance"
    spectral_norm: bool = True
    image_nc: int = 3

    def __post_init__(self) -> None:
        self.validate()  # built by configtools.build, a broken rule names its full key

    def validate(self) -> None:
        _require(self.n_layers >= 1, "discriminator.n_layers must be >= 1")
        _require(self.num_D >= 1, "discriminator.num_D must be >= 1")
        _require(self.norm in ("instance", "batch", "none"), f"discriminator.norm must be instance, batch or none, got {self.norm!r}")
        _require(self.ndf >= 1, "discriminator.ndf must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    labels: LabelConfig = field(default_factory=LabelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    encoder: EncoderConfig | None = None
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def semantic_nc(self) -> int:
        return self.labels.semantic_nc

    @property
    def use_vae(self) -> bool:
        return self.encoder is not None

    def validate(self) -> None:
        self.labels.validate()
        self.generator.validate()
        self.discriminator.validate()
        if self.encoder is not None:
            self.encoder.validate()
            _require(
                self.generator.z_dim == self.encoder.z_dim,
                f"model.generator.z_dim ({self.generator.z_dim}) must equal model.encoder.z_dim ({self.encoder.z_dim}) in a VAE model",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelConfig:
        """Build from a mapping (config.json's ``model``, a training YAML's ``model:``); unknown
        or mistyped keys and broken rules are errors naming the key's full dotted path.

        Read by ``spade_core.configtools.build``, the loader every config of the project uses:
        one set of rules and messages for config.json, the training job and serving.
        """
        from .configtools import build

        if not isinstance(data, Mapping):
            raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
        return build(cls, data, where)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
