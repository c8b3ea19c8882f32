"""One rule for paths and URIs, one for derived seeds: shared by training, evaluation and serving."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from spade_core.locations import absolute, filesystem, is_remote, is_uri, local_path


def test_plain_paths_become_absolute_and_uris_stay_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute("~/runs") == os.path.expanduser("~/runs")
    for uri in ("s3://bucket/runs", "gs://b/r", "file:///srv/runs"):
        assert is_uri(uri) and absolute(uri) == uri
    assert is_remote("s3://bucket/x") and not is_remote("file:///x") and not is_remote("/x")


def test_local_path_takes_file_uris_and_refuses_remote_ones() -> None:
    assert local_path("file:///srv/runs") == "/srv/runs" and local_path("/srv/runs") == "/srv/runs"
    with pytest.raises(ValueError, match="remote URI"):
        local_path("s3://bucket/runs")


def test_filesystem_opens_paths_and_file_uris_and_names_what_it_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    for location in (str(tmp_path) + "/", f"file://{tmp_path}"):
        fs, path = filesystem(location)
        assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
        assert fs.get_file_info(f"{path}/a.txt").type == pafs.FileType.File
    with pytest.raises(ValueError, match="cannot open nosuchscheme://x"):
        filesystem("nosuchscheme://x")


def test_derived_seeds_are_reproducible_distinct_and_refuse_what_is_not_a_seed() -> None:
    import numpy as np

    from spade_core import seeds

    assert seeds.derive_seed(3, 0, 1) == seeds.derive_seed(3, 0, 1) < 2**31
    assert len({seeds.derive_seed(3, rank, epoch) for rank in range(4) for epoch in range(4)}) == 16
    # integer parts are numpy's own list seeding; strings enter as their CRC-32
    assert np.array_equal(seeds.rng(7, 2).random(4), np.random.default_rng([7, 2]).random(4))
    assert seeds.rng(7, "ADE_train_1").random() == seeds.rng(7, "ADE_train_1").random() != seeds.rng(7, "ADE_train_2").random()
    for bad in (-1, 1.5, None, True):
        with pytest.raises(ValueError, match="seed parts"):
            seeds.rng(bad)  # type: ignore[arg-type]
