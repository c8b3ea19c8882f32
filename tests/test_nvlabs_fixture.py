"""The reference's own checkpoint and outputs: we compute the same functions, before and after conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spade_core
from spade_core.semantics import semantic_input

from .conftest import load_fixture_inputs

TOL = 1e-4


@pytest.fixture(scope="module")
def expected(nvlabs_fixture: Path) -> dict[str, np.ndarray]:
    return dict(np.load(nvlabs_fixture / "expected.npz"))


@pytest.fixture(scope="module")
def converted(nvlabs_fixture: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    subprocess.run(
        [sys.executable, "-m", "spade_core.convert", str(nvlabs_fixture / "checkpoint"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _check_all(model: spade_core.SpadeModel, root: Path, expected: dict[str, np.ndarray]) -> None:
    labels, style = load_fixture_inputs(root)
    mu, logvar = model.encode(style)
    np.testing.assert_allclose(mu.numpy(), expected["mu"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logvar.numpy(), expected["logvar"], atol=TOL, rtol=0)
    fake = model.synthesize(labels, z=mu)
    np.testing.assert_allclose(fake.numpy(), expected["fake"], atol=TOL, rtol=0)
    # style image without seed: z = mu, the same image
    np.testing.assert_allclose(model.synthesize(labels, style=style).numpy(), expected["fake"], atol=TOL, rtol=0)
    seg = semantic_input(labels, model.config.labels)
    with torch.no_grad():
        outputs = model.discriminator(torch.cat([seg, torch.from_numpy(expected["fake"])], dim=1))
    assert len(outputs) == 2
    for i, scale in enumerate(outputs):
        assert len(scale) == 5
        for j, feature in enumerate(scale):
            np.testing.assert_allclose(feature.numpy(), expected[f"D_{i}_{j}"], atol=TOL, rtol=0, err_msg=f"D_{i}_{j}")


def test_reference_checkpoint_reproduces_expected_outputs(nvlabs_fixture: Path, expected: dict) -> None:
    model = spade_core.load_checkpoint(nvlabs_fixture / "checkpoint")
    assert model.config.generator.ngf == 8 and model.config.semantic_nc == 151
    assert model.encoder is not None and model.discriminator is not None
    assert not model.training
    _check_all(model, nvlabs_fixture, expected)


def test_converted_checkpoint_reproduces_expected_outputs(nvlabs_fixture: Path, converted: Path, expected: dict) -> None:
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json",
        "discriminator.safetensors",
        "encoder.safetensors",
        "generator.safetensors",
        "manifest.json",
    ]
    model = spade_core.load_checkpoint(converted)
    _check_all(model, nvlabs_fixture, expected)


def test_conversion_is_a_fixed_point(converted: Path, tmp_path: Path) -> None:
    """Saving a loaded checkpoint again gives the same tensors and config."""
    from safetensors.torch import load_file

    model = spade_core.load_checkpoint(converted)
    spade_core.save_checkpoint(model, tmp_path)
    assert (tmp_path / "config.json").read_text() == (converted / "config.json").read_text()
    for name in ("generator", "encoder", "discriminator"):
        a, b = load_file(converted / f"{name}.safetensors"), load_file(tmp_path / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
