"""Duration histograms cheap enough to feed from the hot path (the node's latency figures)."""

from __future__ import annotations

import array
import math

import numpy as np


class Samples:
    """Durations (ns) in logarithmic buckets 1% wide: adding is O(1) on the hot path and a
    summary costs microseconds, so ``ddpg status --watch`` never disturbs the clock."""

    RATIO = 1.01
    BUCKETS = 2400  # 1.01 ** 2400 ns is far beyond any duration we time

    def __init__(self) -> None:
        self.counts = array.array("q", bytes(8 * self.BUCKETS))
        self.count = 0
        self.total = 0
        self.total_sq = 0
        self.max = 0
        self._scale = 1.0 / math.log(self.RATIO)

    def add(self, value: int) -> None:
        i = int(math.log(value) * self._scale) if value > 1 else 0
        self.counts[min(i, self.BUCKETS - 1)] += 1
        self.count += 1
        self.total += value
        self.total_sq += value * value
        if value > self.max:
            self.max = value

    def summary_us(self) -> dict[str, float]:
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
