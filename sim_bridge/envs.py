"""Making Gymnasium environments the rest of the stack can drive.

One place checks what DDPG needs (Box observations, a bounded Box action space) and turns
Gymnasium's errors into one line that names the environment. The trainer, the evaluator and the
bridge all make their environments here.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from models.spec import PixelSpec, RobotSpec


class EnvError(ValueError):
    """The environment id is unknown or its spaces are not usable by DDPG."""


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


def env_spec(env_id: str, env: gym.Env) -> RobotSpec:
    """The robot spec of ``env``: a pixel pipeline (``sim_bridge.pixels``, the outermost
    wrapper) sends uint8 frames and names its pixel spec; a state env sends float32."""
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
    pixels = getattr(env, "pixel_spec", None)
    return RobotSpec(
        env_id,
        tuple(int(d) for d in obs.shape),
        act.low.astype(np.float32),
        act.high.astype(np.float32),
        obs_dtype="float32" if pixels is None else "uint8",
        pixels=pixels if isinstance(pixels, PixelSpec) else None,
    )


def make_vector_env(
    make_one: Callable[[], gym.Env], n: int, asynchronous: bool = False
) -> VectorEnv:
    """``n`` environments from ``make_one`` stepped as one (``SyncVectorEnv``, or
    ``AsyncVectorEnv``: one worker process each, ``make_one`` must pickle), in same-step
    autoreset mode: a step that ends an episode resets that environment at once, returns the
    new episode's first observation, and puts the ended one's last in ``info["final_obs"]``
    (``info["_final_obs"]`` marks which), with its info in ``info["final_info"]``. That is a
    single environment reset after its episode ended, which the trainer has always done; the
    default next-step mode would spend a step with an ignored action on each reset.
    ``reset(seed=s)`` seeds environment ``i`` with ``s + i``."""
    if n < 1:
        raise ValueError(f"a vector environment needs at least one environment, got {n}")
    if asynchronous:
        # forkserver: a worker starts from a clean process, not a fork of a trainer that has
        # torch's threads running (and, from pixels, a GL context).
        fns = [functools.partial(_in_worker, make_one)] * n
        return AsyncVectorEnv(
            fns, autoreset_mode=AutoresetMode.SAME_STEP, context="forkserver", daemon=True
        )
    return SyncVectorEnv([make_one] * n, autoreset_mode=AutoresetMode.SAME_STEP)


def _in_worker(make_one: Callable[[], gym.Env]) -> gym.Env:
    """An async worker's environment. The worker ignores Ctrl-C: the terminal sends SIGINT to
    the whole process group, and the trainer's own handler checkpoints after the current step,
    which needs its workers alive (they exit with it: their pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return make_one()
