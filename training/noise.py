"""Exploration noise, in units of the action half-range (the trainer scales it).

Both processes draw from their own numpy Generator and expose their full state, so a checkpoint
restores the exact noise sequence. With ``num_envs`` a draw is one row per environment
(``[num_envs, act_dim]``, the same numbers as ``num_envs`` draws of ``act_dim`` in a row), and an
episode end resets only its own environment's row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from training.config import TrainConfig


class GaussianNoise:
    """Independent N(0, sigma^2) per step (TD3's exploration)."""

    def __init__(
        self, act_dim: int, sigma: float, seed: int | None = None, num_envs: int | None = None
    ) -> None:
        self.act_dim = act_dim
        self.shape = (act_dim,) if num_envs is None else (num_envs, act_dim)
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Nothing carries over between episodes."""

    def __call__(self) -> np.ndarray:
        return (self.sigma * self.rng.standard_normal(self.shape)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class OUNoise:
    """Ornstein-Uhlenbeck process x <- x + theta (mu - x) dt + sigma sqrt(dt) N(0, 1).

    The paper's temporally correlated exploration (theta 0.15, sigma 0.2, dt 1); the state
    returns to ``mu`` at each episode start (per environment, ``mask`` says whose).
    """

    def __init__(
        self,
        act_dim: int,
        sigma: float = 0.2,
        theta: float = 0.15,
        dt: float = 1.0,
        mu: float = 0.0,
        seed: int | None = None,
        num_envs: int | None = None,
    ) -> None:
        self.act_dim = act_dim
        self.shape = (act_dim,) if num_envs is None else (num_envs, act_dim)
        self.sigma, self.theta, self.dt, self.mu = sigma, theta, dt, mu
        self.rng = np.random.default_rng(seed)
        self.x = np.full(self.shape, mu, dtype=np.float64)

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Back to ``mu``: every row, or the rows (environments) ``mask`` marks."""
        if mask is None:
            self.x[...] = self.mu
        else:
            self.x[np.asarray(mask, dtype=bool)] = self.mu

    def __call__(self) -> np.ndarray:
        self.x += self.theta * (self.mu - self.x) * self.dt + self.sigma * np.sqrt(
            self.dt
        ) * self.rng.standard_normal(self.shape)
        return self.x.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        # flat: the same checkpoint whatever the number of environments' row layout
        return {"rng": self.rng.bit_generator.state, "x": self.x.reshape(-1).tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        x = np.asarray(state["x"], dtype=np.float64)
        # A checkpoint from a run with another number of environments: its state is of no
        # use to these (a resumed run starts fresh episodes anyway).
        self.x = x.reshape(self.shape) if x.size == self.x.size else np.full(self.shape, self.mu)


def make_noise(
    kind: str, act_dim: int, sigma: float, theta: float, seed: int, num_envs: int | None = None
) -> GaussianNoise | OUNoise:
    if kind == "gaussian":
        return GaussianNoise(act_dim, sigma, seed, num_envs)
    if kind == "ou":
        return OUNoise(act_dim, sigma=sigma, theta=theta, seed=seed, num_envs=num_envs)
    raise ValueError(f"unknown noise kind {kind!r}; choose 'gaussian' or 'ou'")


def exploration(
    cfg: TrainConfig, act_dim: int
) -> tuple[GaussianNoise | OUNoise, np.random.Generator]:
    """A run's exploration streams, seeded from its seed: the action noise (seed + 1) and the
    uniform actions before learning starts (seed + 2). A retrain checkpoints them as a new run
    has them, so ``ddpg train --resume`` of a retrain run explores as a fresh run would. The
    noise draws a row per environment (``cfg.num_envs``)."""
    noise = make_noise(
        cfg.noise, act_dim, cfg.noise_sigma, cfg.noise_theta, cfg.seed + 1, cfg.num_envs
    )
    return noise, np.random.default_rng(cfg.seed + 2)
