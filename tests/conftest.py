"""Shared test helpers: where the shared fixtures live, and tiny model configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPADE_SHARED_DIR", REPO.parent / "shared"))
NVLABS_FIXTURE = SHARED / "fixtures" / "nvlabs_ade20k_tiny"
SAMPLES = REPO / "samples"


def require_shared(path: Path) -> Path:
    """Skip when a ../shared fixture is absent (a user's clone), but fail under CI=true."""
    if not path.exists():
        message = f"shared fixture {path} is absent (it lives beside the checkout in ../shared)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def nvlabs_fixture() -> Path:
    return require_shared(NVLABS_FIXTURE)


def load_fixture_inputs(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's two raw label maps (2, 256, 256) and style images (2, 3, 256, 256) in [-1, 1]."""
    labels = torch.stack([torch.from_numpy(np.array(Image.open(root / f"inputs/label_{i}.png"))) for i in range(2)])
    style = torch.stack(
        [torch.from_numpy(np.array(Image.open(root / f"inputs/style_{i}.png").convert("RGB"))).permute(2, 0, 1) for i in range(2)]
    )
    return labels, style.float() / 255 * 2 - 1


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny convs on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------
# Ray: one small local cluster per test session, started only by tests that ask for it.

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DEDUP_LOGS": "0",
    # serve_app's bearer auth reads its token from the replicas' environment (tests/test_serve.py)
    "SPADE_TEST_SERVE_TOKEN": "s3cret-test-token",
    # autoscaling that follows a 30-second load (tests/test_drills.py), as bench/drills.AUTOSCALING_ENV
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}


@pytest.fixture(scope="session")
def ray_cluster():  # type: ignore[no-untyped-def]
    """A local Ray with 2 logical CPUs: the size of this machine, so a resource set-up that
    would starve Ray Data (and hang) on a 2-core node fails here too."""
    os.environ.update(RAY_ENV)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stale or foreign cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytorch-fid's Inception layout with random weights (load with allow_any_inception)."""
    from .test_metrics_fid import random_state

    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_state(0), path)
    return path
