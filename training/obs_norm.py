"""Observation normalisation (``--obs-norm``): running mean and variance of the observations
that go into the replay, and the fixed standardisation the networks see.

The replay keeps raw observations; a batch is standardised when the agent updates on it, with
the statistics as they are then (as Stable-Baselines3's ``VecNormalize`` does for off-policy
replay). So the replay and the statistics never disagree: a resumed run restores both exactly
(the statistics are part of the agent's checkpoint, float64 bit for bit) and a retrain can put
logged raw observations into the same replay.

The statistics are float64, merged batch by batch with Chan et al.'s parallel update of
Welford's algorithm (one row at a time is the same update), so a million steps lose nothing to
rounding. What the networks see is float32: ``clip((x - mean) * inv_std, -clip, clip)`` with
``mean`` and ``inv_std = 1 / sqrt(var + eps)`` rounded to float32 once per update of the
statistics; the exported graph (:class:`models.networks.Standardize`) does exactly these float32
operations, so the deployed actor on raw observations is the trained actor on normalised ones.
``eps`` and the clip at 10 are VecNormalize's: a dimension that never moved does not divide by
zero, and an observation far outside what training saw cannot push the networks further than
ten standard deviations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.networks import Standardize
from training.replay import Batch

EPS = 1e-8
CLIP = 10.0


class RunningMeanStd:
    """Count, mean and sum of squared deviations (``m2``) of every observation seen, float64."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    @property
    def var(self) -> np.ndarray:
        """The population variance; 1 before any data (the standardisation is then the
        identity)."""
        if self.count == 0:
            return np.ones_like(self.mean)
        return self.m2 / self.count

    def update(self, x: np.ndarray) -> None:
        """Merge the rows of ``x`` (``[n, dim]``) into the statistics."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.mean.size)
        n = len(x)
        if n == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("observation normalisation got a non-finite observation")
        batch_mean = x.mean(axis=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": torch.from_numpy(self.mean.copy()),
            "m2": torch.from_numpy(self.m2.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mean = state["mean"].cpu().numpy().astype(np.float64)
        if mean.shape != self.mean.shape:
            raise ValueError(
                f"saved observation statistics have {mean.size} dimensions, not {self.mean.size}"
            )
        self.count = int(state["count"])
        self.mean = mean.copy()
        self.m2 = state["m2"].cpu().numpy().astype(np.float64).copy()


class ObsNormalizer:
    """The running statistics and their float32 standardisation, for numpy observations
    (acting) and torch batches on the training device (updates)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.stats = RunningMeanStd(dim)
        self.device = torch.device(device)
        self.mean32 = np.zeros(dim, dtype=np.float32)
        self.inv_std32 = np.ones(dim, dtype=np.float32)
        self._mean_t = torch.zeros(dim, device=self.device)
        self._inv_std_t = torch.ones(dim, device=self.device)
        self._refresh()

    def _refresh(self) -> None:
        self.mean32[:] = self.stats.mean.astype(np.float32)
        self.inv_std32[:] = (1.0 / np.sqrt(self.stats.var + EPS)).astype(np.float32)
        self._mean_t.copy_(torch.from_numpy(self.mean32))
        self._inv_std_t.copy_(torch.from_numpy(self.inv_std32))

    def update(self, obs: np.ndarray) -> None:
        """Fold raw observations (``[n, dim]``, those just put into the replay) into the
        statistics."""
        self.stats.update(obs)
        self._refresh()

    def numpy(self, obs: np.ndarray) -> np.ndarray:
        """Raw observations (one or a batch) standardised, float32."""
        x = np.asarray(obs, dtype=np.float32)
        return np.clip((x - self.mean32) * self.inv_std32, -CLIP, CLIP)

    def torch(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp((obs - self._mean_t) * self._inv_std_t, -CLIP, CLIP)

    def batch(self, batch: Batch) -> Batch:
        """A replay batch with ``obs`` and ``next_obs`` standardised."""
        return batch._replace(obs=self.torch(batch.obs), next_obs=self.torch(batch.next_obs))

    def module(self) -> Standardize:
        """The standardisation as it is now, as the fixed layer an exported graph holds."""
        return Standardize(self.mean32.copy(), self.inv_std32.copy(), CLIP)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)
        self._refresh()


def standardize_from_state(state: dict[str, Any]) -> Standardize:
    """The exported graph's standardisation from a checkpoint's saved statistics."""
    dim = int(state["mean"].numel())
    norm = ObsNormalizer(dim)
    norm.load_state_dict(state)
    return norm.module()
