"""spade_core.metrics KID: the unbiased polynomial MMD^2 over seeded subsets, against a plain loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spade_core.metrics import fid as fidlib
from spade_core.metrics.inception import load_fid_inception
from spade_core.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance, polynomial_mmd2

from .test_metrics_fid import _images, random_state

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate written out pair by pair, in float64."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def loop_kid(f1: np.ndarray, f2: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """torch-fidelity's procedure: RandomState(seed); per subset draw from set 1, then set 2."""
    rng = np.random.RandomState(seed)
    m = min(size, len(f1), len(f2))
    values = []
    for _ in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)].astype(np.float64)
        b = f2[rng.choice(len(f2), m, replace=False)].astype(np.float64)
        values.append(loop_mmd2(a, b))
    return float(np.mean(values)), float(np.std(values))


def test_kid_equals_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(30, 16)).astype(np.float32)
    f2 = (rng.normal(size=(25, 16)) * 1.3 + 0.2).astype(np.float32)
    r = kernel_inception_distance(f1, f2, subsets=7, subset_size=12, seed=3)
    mean, std = loop_kid(f1, f2, 7, 12, 3)
    assert r.mean == pytest.approx(mean, rel=1e-10) and r.std == pytest.approx(std, rel=1e-8)
    assert (r.subsets, r.subset_size) == (7, 12)
    assert r.mean > 0 and r.std > 0
    assert polynomial_mmd2(f1[:12], f2[:12]) == pytest.approx(loop_mmd2(f1[:12].astype(np.float64), f2[:12].astype(np.float64)), rel=1e-10)


def test_kid_of_random_inception_features_equals_the_loop(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save(random_state(0), weights)
    model = load_fid_inception(weights, allow_any_inception=True)
    a = fidlib.activations([_images(50, 10, (48, 48))], model, dims=64)
    b = fidlib.activations([_images(51, 8, (48, 48)).flip(-2)], model, dims=64)
    r = kernel_inception_distance(a, b, subsets=4, subset_size=6, seed=11)
    mean, std = loop_kid(a, b, 4, 6, 11)
    assert r.mean == pytest.approx(mean, rel=1e-9, abs=1e-12) and r.std == pytest.approx(std, rel=1e-7, abs=1e-12)


def test_subsets_defaults_seed_and_clipping() -> None:
    assert (KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED) == (100, 1000, 2020)  # torch-fidelity's defaults
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(20, 8)), rng.normal(size=(14, 8)) + 0.5
    r = kernel_inception_distance(f1, f2, subsets=10)  # subset size 1000 clipped to the smaller set
    assert r.subset_size == 14 and r.subsets == 10
    assert r == kernel_inception_distance(f1, f2, subsets=10)  # seeded: the same again
    assert r != kernel_inception_distance(f1, f2, subsets=10, seed=1)
    assert kernel_inception_distance(f1, f2).subsets == 100
    # subsets of whole equal-size sets are the sets themselves: every draw the same value
    whole = kernel_inception_distance(f1[:14], f2, subsets=5)
    assert whole.std == pytest.approx(0, abs=1e-12) and whole.mean == pytest.approx(polynomial_mmd2(f1[:14], f2), rel=1e-12)


def test_kid_is_unbiased_near_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(2)
    same = kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), subsets=20, subset_size=100)
    shifted = kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.5, subsets=20, subset_size=100)
    assert abs(same.mean) < 3 * same.std + 1e-3  # may be negative: the estimate is unbiased
    assert shifted.mean > 10 * max(abs(same.mean), same.std)


def test_kid_errors() -> None:
    f = np.zeros((5, 4))
    for args, kwargs, match in (
        ((f, np.zeros((5, 3))), {}, "same d"),
        ((f[0], f), {}, r"\(N1, d\)"),
        ((f, f), {"subsets": 0}, "subsets must be >= 1"),
        ((f, f), {"subset_size": 1}, "subset_size must be >= 2"),
        ((f[:1], f), {}, "at least 2 features"),
    ):
        with pytest.raises(ValueError, match=match):
            kernel_inception_distance(*args, **kwargs)
