"""Duration histograms cheap enough to feed from the hot path (the node's latency figures)."""

from __future__ import annotations

import array
import math

import numpy as np


class Samples:
    """Durations (ns) in logarithmic buckets 1% wide: adding is an array append on the hot path
    (the buckets are counted in bulk, with numpy, every ``FOLD`` adds or when a summary is
    asked for) and a summary costs microseconds, so ``ddpg status --watch`` never disturbs the
    clock."""

    RATIO = 1.01
    BUCKETS = 2400  # 1.01 ** 2400 ns is far beyond any duration we time
    FOLD = 1024
    """Adds between two countings: one every second at 1 kHz, ~20 µs each."""

    def __init__(self) -> None:
        self.counts = array.array("q", bytes(8 * self.BUCKETS))
        self.count = 0
        self.total = 0
        self.total_sq = 0.0
        self.max = 0
        self._scale = 1.0 / math.log(self.RATIO)
        self._new = array.array("q")

    def add(self, value: int) -> None:
        new = self._new
        new.append(value)
        if len(new) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        """Count the values added since the last fold into the buckets and the totals."""
        if not self._new:
            return
        v = np.array(self._new, dtype=np.int64)  # a copy: the array can then be emptied
        del self._new[:]
        # the bucket of a value is floor(log(value) / log(RATIO)); values <= 1 go in the first
        i = (np.log(np.maximum(v, 1)) * self._scale).astype(np.int64)
        np.minimum(i, self.BUCKETS - 1, out=i)
        counts = np.frombuffer(self.counts, dtype=np.int64)
        counts += np.bincount(i, minlength=self.BUCKETS)
        self.count += len(v)
        self.total += int(v.sum())
        f = v.astype(np.float64)
        self.total_sq += float(f @ f)
        self.max = max(self.max, int(v.max()))

    def summary_us(self) -> dict[str, float]:
        self._fold()
        n = self.count
        if n == 0:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "std": 0.0, "n": 0}
        cumulative = np.cumsum(np.frombuffer(self.counts, dtype=np.int64))
        p50, p99 = (
            self.RATIO ** (int(np.searchsorted(cumulative, q * n)) + 0.5) / 1e3 for q in (0.5, 0.99)
        )
        mean = self.total / n
        std = math.sqrt(max(self.total_sq / n - mean * mean, 0.0))
        return {
            "p50": round(min(p50, self.max / 1e3), 1),
            "p99": round(min(p99, self.max / 1e3), 1),
            "max": round(self.max / 1e3, 1),
            "std": round(std / 1e3, 1),
            "n": n,
        }
