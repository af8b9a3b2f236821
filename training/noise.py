"""Exploration noise, in units of the action half-range (the trainer scales it).

Both processes draw from their own numpy Generator and expose their full state, so a checkpoint
restores the exact noise sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from training.config import TrainConfig


class GaussianNoise:
    """Independent N(0, sigma^2) per step (TD3's exploration)."""

    def __init__(self, act_dim: int, sigma: float, seed: int | None = None) -> None:
        self.act_dim = act_dim
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Nothing carries over between episodes."""

    def __call__(self) -> np.ndarray:
        return (self.sigma * self.rng.standard_normal(self.act_dim)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class OUNoise:
    """Ornstein-Uhlenbeck process x <- x + theta (mu - x) dt + sigma sqrt(dt) N(0, 1).

    The paper's temporally correlated exploration (theta 0.15, sigma 0.2, dt 1); the state
    returns to ``mu`` at each episode start.
    """

    def __init__(
        self,
        act_dim: int,
        sigma: float = 0.2,
        theta: float = 0.15,
        dt: float = 1.0,
        mu: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.act_dim = act_dim
        self.sigma, self.theta, self.dt, self.mu = sigma, theta, dt, mu
        self.rng = np.random.default_rng(seed)
        self.x = np.full(act_dim, mu, dtype=np.float64)

    def reset(self) -> None:
        self.x[:] = self.mu

    def __call__(self) -> np.ndarray:
        self.x += self.theta * (self.mu - self.x) * self.dt + self.sigma * np.sqrt(
            self.dt
        ) * self.rng.standard_normal(self.act_dim)
        return self.x.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "x": self.x.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.x = np.asarray(state["x"], dtype=np.float64)


def make_noise(
    kind: str, act_dim: int, sigma: float, theta: float, seed: int
) -> GaussianNoise | OUNoise:
    if kind == "gaussian":
        return GaussianNoise(act_dim, sigma, seed)
    if kind == "ou":
        return OUNoise(act_dim, sigma=sigma, theta=theta, seed=seed)
    raise ValueError(f"unknown noise kind {kind!r}; choose 'gaussian' or 'ou'")


def exploration(
    cfg: TrainConfig, act_dim: int
) -> tuple[GaussianNoise | OUNoise, np.random.Generator]:
    """A run's exploration streams, seeded from its seed: the action noise (seed + 1) and the
    uniform actions before learning starts (seed + 2). A retrain checkpoints them as a new run
    has them, so ``ddpg train --resume`` of a retrain run explores as a fresh run would."""
    noise = make_noise(cfg.noise, act_dim, cfg.noise_sigma, cfg.noise_theta, cfg.seed + 1)
    return noise, np.random.default_rng(cfg.seed + 2)
