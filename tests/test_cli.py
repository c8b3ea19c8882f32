"""The command-line tools a user runs first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spade_core
from spade_core.synthesize import main as synthesize_main

from .conftest import SAMPLES

ADE_LABEL = SAMPLES / "ade20k/ADEChallengeData2016/annotations/training/ADE_train_00000001.png"


def test_synthesize_tiny_model_writes_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert synthesize_main(["--tiny", "--labels", str(ADE_LABEL), "--out", str(out), "--seed", "3"]) == 0
    image = np.array(Image.open(out))
    assert image.shape == (256, 256, 3)
    assert image.std() > 1  # not a flat image
    assert "wrote" in capsys.readouterr().out
    # the tiny model and its synthesis are deterministic
    again = tmp_path / "again.png"
    synthesize_main(["--tiny", "--labels", str(ADE_LABEL), "--out", str(again), "--seed", "3"])
    assert np.array_equal(np.array(Image.open(again)), image)


def test_synthesize_from_converted_fixture_with_style_and_grid(nvlabs_fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["--checkpoint", str(nvlabs_fixture / "checkpoint"), "--labels", str(nvlabs_fixture / "inputs/label_0.png")]
    args += ["--style", str(nvlabs_fixture / "inputs/style_0.png"), "--out", str(out), "--grid"]
    assert synthesize_main(args) == 0
    grid = np.array(Image.open(out))
    assert grid.shape == (256, 512, 3)
    expected = np.load(nvlabs_fixture / "expected.npz")["fake"][0]
    want = np.round((np.clip(expected, -1, 1) + 1) * 127.5).transpose(1, 2, 0)
    assert np.abs(grid[:, 256:].astype(float) - want).max() <= 1  # z = mu: the reference's image


def test_synthesize_rejects_an_rgb_label_map_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (32, 32), (120, 120, 120)).save(rgb)
    assert synthesize_main(["--tiny", "--labels", str(rgb), "--out", str(tmp_path / "x.png")]) == 2
    assert "single-channel" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_convert_cli_reports_a_bad_source(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spade_core.convert", str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "is not a checkpoint" in result.stderr


def test_convert_cli_without_discriminator(nvlabs_fixture: Path, tmp_path: Path) -> None:
    from spade_core.convert import main as convert_main

    assert convert_main([str(nvlabs_fixture / "checkpoint"), str(tmp_path), "--no-discriminator"]) == 0
    assert not (tmp_path / "discriminator.safetensors").exists()
    model = spade_core.load_checkpoint(tmp_path)
    assert model.discriminator is None and model.encoder is not None
