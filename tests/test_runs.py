"""A checkpoint cut off mid-upload is never taken as a run's newest: not by evaluation or
serving (spade_core.runs, serving's remote listing), not by a resumed training run.

Ray Train copies a checkpoint file by file into its final ``checkpoint_*`` folder, so a kill
during the upload leaves any subset of the files, the last one truncated. Every such state
is built here from a real training checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import spade_core
from serve_app import checkpoints as serving
from spade_core.checkpoint import MANIFEST_FILE, incomplete
from spade_core.config import GeneratorConfig, LabelConfig, ModelConfig, SpadeConfig
from spade_core.runs import checkpoint_in, latest_in_run
from train_job.checkpointing import TrainState, read_training_checkpoint, write_training_checkpoint

TINY = ModelConfig(labels=LabelConfig(label_nc=6), generator=GeneratorConfig(ngf=4, crop_size=32, spade=SpadeConfig(hidden=8)))
OLD, NEW = "checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = spade_core.build_model(TINY, seed=0)
    optimizers = {"generator": torch.optim.Adam(model.generator.parameters())}
    return write_training_checkpoint(tmp_path_factory.mktemp("ckpt") / "whole", model=model, ema_generator=None,
                                     optimizers=optimizers, scaler=None, state=TrainState(step=8), train_config={})


def upload_states(whole: Path) -> list[tuple[str, list[tuple[Path, int]]]]:
    """(description, [(file, bytes copied)]) for every point an upload in this order can stop at."""
    files = sorted(p for p in whole.rglob("*") if p.is_file())
    states = []
    for i, f in enumerate(files):
        done = [(g, g.stat().st_size) for g in files[:i]]
        states.append((f"{i} files, {f.relative_to(whole)} not started", done))
        states.append((f"{i} files, {f.relative_to(whole)} half copied", [*done, (f, f.stat().st_size // 2)]))
    return states


def cut_off(whole: Path, target: Path, copied: list[tuple[Path, int]]) -> None:
    target.mkdir(parents=True)
    for f, size in copied:
        out = target / f.relative_to(whole)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(f.read_bytes()[:size])


def test_every_state_of_a_cut_off_upload_is_incomplete_and_skipped(whole: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "CACHE_DIR", tmp_path / "cache")
    assert incomplete(whole) is None
    states = upload_states(whole)
    assert len(states) >= 10  # config, weights, manifest, training state...
    for n, (what, copied) in enumerate(states):
        run = tmp_path / f"run{n}"
        shutil.copytree(whole, run / OLD)
        cut_off(whole, run / NEW, copied)
        assert incomplete(run / NEW) is not None, what
        assert latest_in_run(run) == run / OLD, what  # evaluation and serving (local)
        assert checkpoint_in(run) == run / OLD, what
        assert serving._download(f"file://{run}", "latest").name == OLD, what  # serving's remote listing
        model = spade_core.build_model(TINY, seed=1)
        opt = {"generator": torch.optim.Adam(model.generator.parameters())}
        with pytest.raises(ValueError, match="incomplete checkpoint|not a training checkpoint"):
            read_training_checkpoint(run / NEW, model=model, ema_generator=None, optimizers=opt, scaler=None)


def test_a_run_with_only_a_partial_checkpoint_says_why(whole: Path, tmp_path: Path) -> None:
    cut_off(whole, tmp_path / "run" / NEW, [(f, f.stat().st_size) for f in sorted(whole.rglob("*"))
                                            if f.is_file() and f.name != "generator.safetensors"])
    with pytest.raises(ValueError, match="no complete checkpoint_\\* folder.*generator.safetensors is missing"):
        checkpoint_in(tmp_path / "run")
    with pytest.raises(ValueError, match="is incomplete: generator.safetensors is missing"):
        checkpoint_in(tmp_path / "run" / NEW)  # named directly: refused too
    (tmp_path / "run" / NEW / MANIFEST_FILE).write_text('{"format_version": 1, "fi')  # the manifest itself cut off
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        checkpoint_in(tmp_path / "run")
