"""Deterministic evaluation of a policy: no noise, fixed seeds, a fresh environment.

Torch-free on purpose: the trainer passes its torch actor wrapped as a numpy function, and
``ddpg eval`` passes an onnxruntime policy, so both give the same returns on the same seeds.
Episode ``i`` starts from ``env.reset(seed=seed + i)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalResult:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns)) if self.returns else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.returns)) if self.returns else float("nan")


def evaluate(policy: Policy, env: gym.Env, episodes: int, seed: int) -> EvalResult:
    """Run ``episodes`` full episodes with ``policy(obs) -> action``; actions are clipped to the
    action space (the trainer's actor never leaves it; a foreign policy might)."""
    low, high = env.action_space.low, env.action_space.high
    result = EvalResult()
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, length, done = 0.0, 0, False
        while not done:
            obs = np.asarray(obs)  # pixel frames stay uint8; states go in as float32
            if obs.dtype != np.uint8:
                obs = obs.astype(np.float32, copy=False)
            action = np.clip(policy(obs), low, high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            length += 1
            done = terminated or truncated
        result.returns.append(total)
        result.lengths.append(length)
    return result


def eval_metrics(result: EvalResult, env_steps: int) -> dict[str, float]:
    """An evaluation as its ``eval.csv`` row (train and retrain write the same columns)."""
    return {
        "return_mean": result.mean,
        "return_std": result.std,
        "length_mean": float(np.mean(result.lengths)),
        "env_steps": float(env_steps),  # physics steps (pixels: repeat each)
    }
