"""Reading ahead: inspected pairs handed to the shard writer in listing order, from any start index.

:class:`_Inspector` runs :func:`~train_job.prepare.checks.inspect_pair` over the listing,
in this process or (``workers`` > 1) ahead of the writer in a spawned process pool, a
bounded number of chunks in flight. A bad pair comes back as a :class:`_Bad` value in its
place, so the writer decides whether it stops the run or is skipped.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from spade_core.config import LabelConfig

from ..datasets import Pair
from .checks import BadPairError, PairData, inspect_pair

_CHUNK = 8  # pairs per task sent to a worker process


@dataclass(frozen=True)
class _Bad:
    key: str
    reason: str
    message: str


def _inspect_chunk(pairs: Sequence[Pair], labels: LabelConfig) -> list[PairData | _Bad]:
    """Worker task: inspect consecutive pairs; problems come back as values, in order."""
    out: list[PairData | _Bad] = []
    for pair in pairs:
        try:
            out.append(inspect_pair(pair, labels))
        except BadPairError as exc:
            out.append(_Bad(pair.key, exc.reason, str(exc)))
    return out


class _Inspector:
    """Inspected pairs in listing order from any start index.

    With workers > 1 decoding runs ahead in a process pool, at most ``2 * workers`` chunks
    in flight, so memory stays bounded whatever the split size.
    """

    def __init__(self, pairs: Sequence[Pair], labels: LabelConfig, workers: int) -> None:
        self._pairs = pairs
        self._labels = labels
        # spawn: the parent holds pyarrow's thread pools, which fork would copy mid-state
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
        self._window = 2 * workers
        self._futures: deque[Future[list[PairData | _Bad]]] = deque()
        self._ready: deque[PairData | _Bad] = deque()
        self._submitted = 0  # pairs before this index are ready or in flight
        self.position = 0  # index of the pair peek() returns

    def seek(self, index: int) -> None:
        if index == self.position:
            return
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        self._ready.clear()
        self.position = self._submitted = index

    def peek(self) -> PairData | _Bad | None:
        if self.position >= len(self._pairs):
            return None
        if not self._ready:
            self._fill()
        return self._ready[0]

    def pop(self) -> PairData | _Bad:
        self.position += 1
        return self._ready.popleft()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self) -> None:
        if self._pool is None:
            self._ready.extend(_inspect_chunk(self._pairs[self.position : self.position + 1], self._labels))
            self._submitted = self.position + 1
            return
        self._submit()
        self._ready.extend(self._futures.popleft().result())
        self._submit()  # keep the workers busy while the caller consumes

    def _submit(self) -> None:
        while len(self._futures) < self._window and self._submitted < len(self._pairs):
            end = min(self._submitted + _CHUNK, len(self._pairs))
            self._futures.append(self._pool.submit(_inspect_chunk, self._pairs[self._submitted : end], self._labels))  # type: ignore[union-attr]
            self._submitted = end
