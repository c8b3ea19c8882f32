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

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


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
    result = drills.kill_proxy_drill(base, clients=2, seconds=60.0, kill_at=6.0, settle_s=5.0)  # ends once whole again
    print(result)
    assert result["failed_attempts"] > 0, result  # the outage was seen...
    assert result["lost"] == 0, result  # ...and every failed attempt was followed by a 200


# --- sustained load, hang-ups, a hung replica (bench/drills_load.py) --------------------------

import drills_load  # noqa: E402


def test_sustained_load_scales_the_generator_up_and_back_down(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = drills_load.autoscaling_app(tmp_path, crop_size=64, max_replicas=3, downscale_delay_s=8.0)
    with drills.running_app(args) as base:
        result = drills_load.load_drill(base, clients=64, seconds=30.0, cooldown_s=90.0)
    drills_load.print_timeline(result)
    print({k: v for k, v in result.items() if k != "timeline"})
    assert result["other_errors"] == 0 and result["503_without_retry_after"] == 0, result["statuses"]
    assert result["statuses"].get("503", 0) == 0, result["statuses"]  # 64 clients fit the queue (64): never full
    assert result["peak_replicas"] > 1 and result["peak_healthy_metric"] > 1, result  # scaled up, seen both ways
    assert result["final_replicas"] == 1 and result["scaled_down_after_s"] is not None, result  # and back down


def test_a_full_queue_answers_503_with_retry_after_and_serves_the_rest(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = drills.plain_app(tmp_path, replicas=1)
    args["generator"].update(max_ongoing_requests=4, max_queued_requests=2)
    with drills.running_app(args) as base:
        result = drills_load.queue_full_drill(base, clients=16, seconds=8.0)
    print(result)
    assert result["statuses"].get("503", 0) > 0 and result["statuses"].get("200", 0) > 0, result
    assert result["503_without_retry_after"] == 0 and result["other"] == 0, result


def test_clients_that_hang_up_cost_no_forward_pass(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = drills_load.autoscaling_app(tmp_path, crop_size=64, max_replicas=1)
    with drills.running_app(args) as base:
        result = drills_load.disconnect_drill(base, patient=4, impatient=24, hang_up_after_s=1.0, seconds=12.0)
    print(result)
    assert result["hung_up"] >= 16, result  # most really hung up while waiting
    # Serve's proxy counts every hang-up; the app's middleware those that reached it
    assert result["proxy_499"] == result["hung_up"] and 1 <= result["ingress_499"] <= result["hung_up"], result
    # at most the batch that was already computing when they left (batch 4, 2 in flight)
    assert 0 <= result["computed_for_hung_up"] <= 8, result
    assert result["cancelled_queued"] + result["cancelled_running"] >= 1, result  # the replica saw them go


def test_a_replica_that_hangs_mid_batch_is_replaced_and_routed_around(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = drills.plain_app(tmp_path, replicas=2)
    args["generator"].update(health_check_period_s=2.0, health_check_timeout_s=5.0, graceful_shutdown_timeout_s=5.0)
    with drills.running_app(args) as base:
        result = drills_load.hang_drill(base, clients=4, seconds=45.0, hang_at=8.0)
    print(result)
    assert result["server_errors"] == 0 and result["non_200"] <= 0.01 * result["sent"], result
    assert result["found_after_s"] is not None and result["replaced_after_s"] is not None, result
    assert result["served_while_hung"] > 0, result
