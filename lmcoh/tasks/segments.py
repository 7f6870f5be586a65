"""Reductions over consecutive segments of a flat array (the actions of each state, the
transitions of each action). Regular layouts (every segment the same length, as in trees and
gridworlds) take a reshape fast path; ragged ones use ``reduceat``."""

from __future__ import annotations

from functools import cached_property

import numpy as np


class Segments:
    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        widths = np.unique(self.counts)
        self.width = int(widths[0]) if len(widths) == 1 and widths[0] > 0 else 0

    def __len__(self) -> int:
        return len(self.counts)

    @cached_property
    def ids(self) -> np.ndarray:
        """The segment of every element."""
        return np.repeat(np.arange(len(self.counts)), self.counts)

    def repeat(self, per_segment: np.ndarray) -> np.ndarray:
        if self.width:
            return np.repeat(per_segment, self.width)
        return np.repeat(per_segment, self.counts)

    def _reduce(self, ufunc: np.ufunc, x: np.ndarray) -> np.ndarray:
        if self.width:
            # column by column: far faster than an axis-1 reduction over a short axis
            cols = x.reshape(-1, self.width)
            out = cols[:, 0].copy()
            for j in range(1, self.width):
                ufunc(out, cols[:, j], out=out)
            return out
        return ufunc.reduceat(x, self.start[:-1]) if len(x) else np.zeros(len(self))

    def sum(self, x: np.ndarray) -> np.ndarray:
        return self._reduce(np.add, x)

    def max(self, x: np.ndarray) -> np.ndarray:
        return self._reduce(np.maximum, x)

    def _shift(self, x: np.ndarray) -> np.ndarray:
        m = self.max(x)
        return np.where(np.isfinite(m), m, 0.0)

    def logsumexp(self, x: np.ndarray) -> np.ndarray:
        """log(sum(exp(x))) per segment; -inf where all of a segment is -inf."""
        m = self._shift(x)
        with np.errstate(divide="ignore"):
            return np.log(self.sum(np.exp(x - self.repeat(m)))) + m

    def softmax(self, logits: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Per-segment softmax; a segment whose logits are all -inf gets ``fallback``'s values."""
        w = np.exp(logits - self.repeat(self._shift(logits)))
        z = self.repeat(self.sum(w))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(z > 0, w / z, fallback)
