"""Kernel Inception Distance: the unbiased polynomial-kernel MMD^2 over random subsets.

As torch-fidelity and clean-fid define it (Bińkowski et al., 2018): with the kernel
``k(x, y) = (x . y / d + 1) ** 3`` (d = feature dims), each of ``subsets`` draws takes
``m`` features from each set without replacement and computes the unbiased estimate

    MMD^2 = (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2

KID is the mean over the draws, reported with their standard deviation (numpy's, ddof 0,
as torch-fidelity's). Defaults are the common ones: 100 subsets of 1000, ``m`` clipped to
the smaller set (clean-fid's behaviour; torch-fidelity refuses instead), seed 2020
(torch-fidelity's). The draws use ``np.random.RandomState(seed).choice`` in torch-fidelity's
order (set 1, then set 2, per subset), so equal features and seed give its numbers; the
kernel sums run in float64 (torch-fidelity's in float32), which changes them only at
float32 rounding level.

Features come from :func:`spade_core.metrics.fid.activations` (2048 dims, as for FID).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


@dataclass(frozen=True)
class KIDResult:
    """KID mean and standard deviation over ``subsets`` draws of ``subset_size`` features per set."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized feature sets under ``(x . y / d + 1) ** 3``, in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> KIDResult:
    """KID of two feature sets ``(N1, d)`` and ``(N2, d)`` (module docstring): mean and std over subsets."""
    f1 = np.asarray(features1)
    f2 = np.asarray(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N1, d) and (N2, d) with the same d, got {f1.shape} and {f2.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(f1)} and {len(f2)}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        mmds[i] = polynomial_mmd2(x, y)
    return KIDResult(float(np.mean(mmds)), float(np.std(mmds)), subsets, m)
