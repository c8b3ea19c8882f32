"""CI-sized runs of bench/drills.py's fault drills: parts killed or broken under load.

Each drives closed-loop clients against a Serve app on 127.0.0.1 and asserts what a user
relies on: no 5xx but a 503 with Retry-After, at most 1% of answers not 200, the part back,
latency back to its level. The figures print (pytest -s); bench/drills.py runs them longer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import drills  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture()
def plain(ray_cluster, tmp_path: Path):  # type: ignore[no-untyped-def]
    args = drills.plain_app(tmp_path, replicas=1)
    with drills.running_app(args) as base:
        yield base, args


def test_a_killed_generator_replica_costs_no_request(plain) -> None:  # type: ignore[no-untyped-def]
    base, _ = plain
    result = drills.kill_replica_drill(base, replicas=1, clients=4, seconds=24.0, kill_at=8.0)
    drills.print_kill(result)
    assert result["server_errors"] == 0, result
    assert result["503_without_retry_after"] == 0, result
    assert result["non_200_share"] <= 0.01, result
    assert result["recovered_after_s"] is not None, result
    assert result["p50_after_recovery_ms"] <= 1.5 * result["p50_before_ms"] + 50, result


def test_a_broken_checkpoint_rollout_keeps_the_old_model_serving(plain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, args = plain
    result = drills.broken_rollout_drill(base, args, clients=2, tmp=tmp_path / "broken")
    print(result)
    assert result["non_200"] == 0, result
    for rollout in result["rollouts"]:
        assert rollout["still_serving"] and rollout["reported"], rollout


def test_requests_are_served_while_the_serve_controller_restarts(plain) -> None:  # type: ignore[no-untyped-def]
    base, _ = plain
    result = drills.kill_controller_drill(base, clients=4, seconds=18.0, kill_at=6.0)
    print(result)
    assert result["restarted_after_s"] is not None, result
    assert result["sent_while_down"] > 0 and result["non_200"] == 0, result


def test_clients_retrying_with_backoff_lose_nothing_when_the_http_proxy_dies(plain) -> None:  # type: ignore[no-untyped-def]
    base, _ = plain
    result = drills.kill_proxy_drill(base, clients=2, seconds=60.0, kill_at=6.0)
    print(result)
    assert result["failed_attempts"] > 0, result  # the outage was seen...
    assert result["lost"] == 0, result  # ...and every failed attempt was followed by a 200
