"""CI-sized runs of bench/drills_train.py: training and data preparation SIGKILLed and started again.

Each runs the real commands (``python -m train_job``, ``python -m train_job.prepare``) in
their own process sessions; the figures print (pytest -s), bench/drills.py runs them longer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import drills_train  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_killed_driver_reruns_from_the_newest_whole_checkpoint_with_the_exact_step(tmp_path: Path) -> None:
    result = drills_train.kill_driver_drill(tmp_path, steps=12, kill_after_step=7)
    print(result)
    assert result["rerun_exit"] == 0, result
    assert result["newest_whole_checkpoint_step"] is not None and result["newest_whole_checkpoint_step"] >= 6, result
    assert result["resumed_at_step"] == result["newest_whole_checkpoint_step"], result
    assert result["final_step"] == 12 and result["logged_steps"] == list(range(1, 13)), result


def test_a_worker_killed_during_its_checkpoint_upload_is_survived_and_the_partial_folder_never_served(tmp_path: Path) -> None:
    result = drills_train.kill_uploader_drill(tmp_path, steps=12)
    print(result)
    assert result["exit"] == 0, result
    assert not result["partial_taken"], result  # serving / evaluation / training skip it
    # the checkpoint before the one being uploaded (or that one, had the kill come after its last byte)
    assert result["resumed_at_step"] == result["expected_resume_step"], result
    assert result["expected_resume_step"] == (4 if result["gap_at_kill"] else 6), result
    assert result["final_step"] == 12 and sorted(set(result["logged_steps"])) == list(range(1, 13)), result


def test_prepare_killed_at_random_points_ends_with_identical_shards(tmp_path: Path) -> None:
    result = drills_train.kill_prepare_drill(tmp_path, runs=2, kills_per_run=2, n=300, shard_rows=20, seed=1)
    print(result)
    assert result["killed"] >= 2, result  # the kills landed while it worked
    for run in result["runs"]:
        assert run["exit"] == 0 and run["identical"], run
