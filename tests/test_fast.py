"""The fast inference path computes the same function as the plain generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import spade_core
from spade_core.config import DiscriminatorConfig, GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from spade_core.fast import FastGenerator, GatherConv
from spade_core.labelmap import LabelMap
from spade_core.norms import SPADE
from spade_core.processors import FoldedProcessor, ReferenceProcessor
from spade_core.semantics import label_channels
from spade_core.testing import randomize_weights

from .conftest import load_fixture_inputs

SMALL_D = DiscriminatorConfig(ndf=8, num_D=1, n_layers=2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))  # images in [-1, 1]: peak-to-peak 2


def blocky_labels(batch: int, size: tuple[int, int], num: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num, (batch, size[0] // 8, size[1] // 8), generator=g)
    return coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("edges", [False, True])
def test_gather_conv_equals_dense_conv_of_one_hot(kernel: int, edges: bool) -> None:
    num_labels = 7
    conv = torch.nn.Conv2d(num_labels + int(edges), 5, kernel, padding=kernel // 2)
    channels = torch.randint(0, num_labels, (2, 9, 11))
    edge_map = torch.rand(2, 9, 11) > 0.7 if edges else None
    dense = F.one_hot(channels, num_labels).permute(0, 3, 1, 2).float()
    if edges:
        dense = torch.cat([dense, edge_map.unsqueeze(1).float()], dim=1)
    gathered = GatherConv(conv, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(gathered(LabelMap(channels, num_labels, edge_map), size=(9, 11)), conv(dense), atol=1e-5, rtol=0)


def test_fast_path_reproduces_reference_fixture(nvlabs_fixture: Path) -> None:
    expected = np.load(nvlabs_fixture / "expected.npz")
    labels, _ = load_fixture_inputs(nvlabs_fixture)
    model = spade_core.load_checkpoint(nvlabs_fixture / "checkpoint")
    z = torch.from_numpy(expected["mu"])
    model.enable_fast_path()
    fast = model.synthesize(labels, z=z)
    np.testing.assert_allclose(fast.numpy(), expected["fake"], atol=1e-4, rtol=0)
    model.enable_fast_path(dtype=torch.bfloat16)
    assert psnr(model.synthesize(labels, z=z), torch.from_numpy(expected["fake"])) >= 35
    model.disable_fast_path()
    np.testing.assert_allclose(model.synthesize(labels, z=z).numpy(), expected["fake"], atol=1e-4, rtol=0)


ARCHITECTURES = {
    "normal-vae": ModelConfig(
        labels=LabelConfig(label_nc=12),
        generator=GeneratorConfig(ngf=8, crop_size=64, z_dim=16),
        encoder=spade_core.EncoderConfig(ndf=8, z_dim=16, input_size=64),
        discriminator=SMALL_D,
    ),
    "more-label-input": ModelConfig(
        labels=LabelConfig(label_nc=12), generator=GeneratorConfig(ngf=8, crop_size=64, num_upsampling_layers="more"), discriminator=SMALL_D
    ),
    "most": ModelConfig(
        labels=LabelConfig(label_nc=12),
        generator=GeneratorConfig(ngf=8, crop_size=128, num_upsampling_layers="most"),
        discriminator=SMALL_D,
    ),
    "instance-norm": ModelConfig(
        labels=LabelConfig(label_nc=12),
        generator=GeneratorConfig(ngf=8, crop_size=64, spade=SpadeConfig(norm="instance")),
        discriminator=SMALL_D,
    ),
    "kernel5-aspect2": ModelConfig(
        labels=LabelConfig(label_nc=12),
        generator=GeneratorConfig(ngf=8, crop_size=128, aspect_ratio=2.0, spade=SpadeConfig(kernel_size=5)),
        discriminator=SMALL_D,
    ),
    "coco-edges-no-spectral": ModelConfig(
        labels=LabelConfig(label_nc=20, instance_edges=True, dataset="coco_stuff"),
        generator=GeneratorConfig(ngf=8, crop_size=64, spectral_norm=False),
        discriminator=SMALL_D,
    ),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fast_path_matches_plain_generator(name: str) -> None:
    config = ARCHITECTURES[name]
    model = randomize_weights(spade_core.build_model(config, discriminator=False, seed=1)).eval()
    h, w = config.generator.output_size
    labels = blocky_labels(2, (h, w), config.labels.num_label_channels)
    labels[0, :4, :4] = 255 if config.labels.contain_dontcare_label else 0  # the don't-care id, too
    instance = blocky_labels(2, (h, w), 5, seed=3) if config.labels.instance_edges else None
    z = torch.randn(2, config.generator.z_dim) if config.generator.z_dim else None
    plain = model.synthesize(labels, z=z, instance=instance)
    model.enable_fast_path()
    fast = model.synthesize(labels, z=z, instance=instance)
    assert fast.shape == plain.shape == (2, 3, h, w)
    assert plain.std() > 0.05  # a non-trivial image, so the comparison means something
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    model.enable_fast_path(dtype=torch.bfloat16)
    assert psnr(model.synthesize(labels, z=z, instance=instance), plain) >= 35


def test_fast_path_leaves_the_plain_model_untouched() -> None:
    """Building fast generators twice must not strip spectral norm from the source model."""
    config = ARCHITECTURES["normal-vae"]
    model = randomize_weights(spade_core.build_model(config, seed=2)).eval()
    labels = blocky_labels(1, (64, 64), 13)
    z = torch.randn(1, 16)
    before = model.synthesize(labels, z=z)
    keys = set(model.generator.state_dict())
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model.enable_fast_path(dtype=dtype)
        model.synthesize(labels, z=z)
    model.disable_fast_path()
    assert set(model.generator.state_dict()) == keys
    torch.testing.assert_close(model.synthesize(labels, z=z), before)


def test_fast_path_is_the_generator_graph_with_folded_layers() -> None:
    """One module graph: the fast generator runs a copy of the generator itself, its SPADEs
    computing with folded processors and no spectral norm left; the source keeps its own."""
    config = ARCHITECTURES["normal-vae"]
    model = randomize_weights(spade_core.build_model(config, discriminator=False, seed=2)).eval()
    fast = FastGenerator(model.generator, label_config=config.labels)
    assert type(fast.generator) is type(model.generator)
    assert fast.generator.schedule() == model.generator.schedule()
    spades = [m for m in fast.generator.modules() if isinstance(m, SPADE)]
    assert spades and all(isinstance(m.processor, FoldedProcessor) for m in spades)
    assert not any(parametrize.is_parametrized(m) for m in fast.generator.modules())
    assert all(isinstance(m.processor, ReferenceProcessor) for m in model.generator.modules() if isinstance(m, SPADE))
    assert any(parametrize.is_parametrized(m) for m in model.generator.modules())
    with pytest.raises(TypeError, match="LabelMap"):
        spades[0](torch.zeros(1, spades[0].processor.modulation_weight.shape[0] // 2, 8, 8), torch.zeros(1, 13, 8, 8))


def test_fast_generator_rejects_missing_edges_and_bad_dtype() -> None:
    config = ARCHITECTURES["coco-edges-no-spectral"]
    model = spade_core.build_model(config, discriminator=False)
    fast = FastGenerator(model.generator, label_config=config.labels)
    with pytest.raises(ValueError, match="edges"):
        fast(torch.zeros(1, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        FastGenerator(model.generator, label_config=config.labels, dtype=torch.int8)


@pytest.mark.slow
def test_compiled_fast_path_matches_plain_generator() -> None:
    config = ARCHITECTURES["more-label-input"]
    model = randomize_weights(spade_core.build_model(config, discriminator=False, seed=4)).eval()
    labels = blocky_labels(1, (64, 64), 13)
    plain = model.synthesize(labels)
    model.enable_fast_path(compile=True)
    torch.testing.assert_close(model.synthesize(labels), plain, atol=1e-4, rtol=0)
    channels = label_channels(labels, config.labels)
    assert model._fast is not None and model._fast(channels).shape == (1, 3, 64, 64)
