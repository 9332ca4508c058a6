"""Epoch sampling: every row once per epoch, in a seeded random order."""

from __future__ import annotations

import numpy as np


class EpochSampler:
    """Batches of row indices of one split: a fresh seeded permutation each epoch, and a
    batch never spans two epochs (the tail of an epoch that cannot fill a batch is skipped;
    a split smaller than a batch is returned whole, reshuffled every time).

    Fine-tuning, multi-task training and surgery all draw their batches this way.
    """

    def __init__(self, size: int, batch_size: int, rng: np.random.Generator):
        if size < 1:
            raise ValueError("EpochSampler needs at least one row")
        self.size, self.batch_size, self.rng = size, batch_size, rng
        self.order, self.cursor = rng.permutation(size), 0

    def next(self) -> np.ndarray:
        """The next batch of row indices [min(batch_size, size)]."""
        if self.cursor + self.batch_size > self.size:
            self.order, self.cursor = self.rng.permutation(self.size), 0
        rows = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += len(rows)
        return rows
