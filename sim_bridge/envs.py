"""Making Gymnasium environments the rest of the stack can drive.

One place checks what DDPG needs (Box observations, a bounded Box action space) and turns
Gymnasium's errors into one line that names the environment. The trainer, the evaluator and the
bridge all make their environments here.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np


class EnvError(ValueError):
    """The environment id is unknown or its spaces are not usable by DDPG."""


@dataclass(frozen=True)
class EnvSpec:
    """What a policy needs to know about an environment's spaces."""

    env_id: str
    obs_shape: tuple[int, ...]
    act_low: np.ndarray
    act_high: np.ndarray

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    @property
    def act_dim(self) -> int:
        return int(self.act_low.size)


def make_env(env_id: str, **kwargs: object) -> gym.Env:
    """``gym.make`` with a clear error for unknown ids and spaces DDPG cannot handle."""
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise EnvError(f"unknown environment {env_id!r}: {e}") from None
    except Exception as e:  # a registered env that fails to build (missing extra, bad kwargs)
        raise EnvError(f"environment {env_id!r} could not be created: {e}") from None
    try:
        env_spec(env_id, env)
    except EnvError:
        env.close()
        raise
    return env


def env_spec(env_id: str, env: gym.Env) -> EnvSpec:
    obs, act = env.observation_space, env.action_space
    if not isinstance(act, gym.spaces.Box):
        raise EnvError(
            f"environment {env_id!r} has a {type(act).__name__} action space; DDPG needs a "
            "continuous Box action space"
        )
    if not isinstance(obs, gym.spaces.Box):
        raise EnvError(
            f"environment {env_id!r} has a {type(obs).__name__} observation space; "
            "this trainer needs a Box"
        )
    if len(act.shape) != 1:
        raise EnvError(f"environment {env_id!r} has a {act.shape}-shaped action space; need 1-D")
    if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
        raise EnvError(f"environment {env_id!r} has an unbounded action space; DDPG needs bounds")
    return EnvSpec(
        env_id,
        tuple(int(d) for d in obs.shape),
        act.low.astype(np.float32),
        act.high.astype(np.float32),
    )
