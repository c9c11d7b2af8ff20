"""One source's sample order in one epoch, fixed by (seed, epoch) alone: a seeded shard order cut
into windows of ``shuffle_window`` shards, and a seeded permutation of each window's samples (see
``trainer.data.loader``'s docstring). Nothing here depends on the rank or the world size."""

from __future__ import annotations

import numpy as np


def _rng(seed: int, epoch: int, tag: int, index: int) -> np.random.Generator:
    # Always four words: SeedSequence treats [a, b] and [a, b, 0] alike, so lengths must not vary.
    return np.random.default_rng([seed % (1 << 63), epoch, tag, index])


class EpochPlan:
    """One epoch's windows: which shards in which order, and where each window starts."""

    def __init__(self, counts: np.ndarray, epoch: int, seed: int, window: int, shuffle: bool):
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        order = _rng(seed, epoch, 0, 0).permutation(len(counts)) if shuffle else np.arange(len(counts))
        self.windows = [order[i : i + window] for i in range(0, len(order), window)]
        self.starts = np.cumsum([0] + [int(counts[w].sum()) for w in self.windows])

    def window_of(self, offset: int) -> int:
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def permutation(self, w: int) -> np.ndarray:
        size = int(self.starts[w + 1] - self.starts[w])
        return _rng(self.seed, self.epoch, 1, w).permutation(size) if self.shuffle else np.arange(size)
