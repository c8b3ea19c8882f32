"""Seeds derived from several parts (a run's seed, a rank, an epoch, an image's key): one scheme
for the whole project, numpy's SeedSequence over the parts, strings entering as their CRC-32.
Every derived stream is independent of the others and reproducible from the parts alone, on
any machine and in any process (Python's ``hash`` of a str is salted per process; this is not).

For integer parts ``rng(a, b)`` is exactly ``np.random.default_rng([a, b])``, which is how
``train_job.synthetic`` writes it: its worker processes never import torch (nor this package).
"""

from __future__ import annotations

import zlib

import numpy as np


def _entropy(parts: tuple[int | str, ...]) -> list[int]:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(zlib.crc32(part.encode()))
        elif isinstance(part, (int, np.integer)) and not isinstance(part, bool) and part >= 0:
            out.append(int(part))
        else:
            raise ValueError(f"seed parts must be non-negative integers or strings, got {part!r}")
    return out


def rng(*parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded from ``parts``: ``rng(seed, key)`` draws the same numbers for
    the same image wherever it is drawn."""
    return np.random.default_rng(_entropy(parts))


def derive_seed(*parts: int | str) -> int:
    """A 31-bit integer seed from ``parts``, for APIs that take one int (torch.manual_seed, Ray Data)."""
    return int(np.random.SeedSequence(_entropy(parts)).generate_state(1)[0] >> 1)
