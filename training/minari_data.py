"""A local Minari dataset as training data (``ddpg retrain --minari DATASET_ID``), so an offline-RL
user's dataset and the node's logs are interchangeable.

A dataset :mod:`control_node.minari_export` wrote names its robot in its metadata (pixel spec
included) and keeps the model ids in its infos; any other Minari dataset is taken as a state
robot: a 1-D float ``Box`` observation space, a bounded 1-D ``Box`` action space and an
environment id (its ``env_spec`` or ``eval_env_spec``) for the evaluation. Each Minari episode is
a run of consecutive steps: state rows for :class:`~training.logged_data.LoggedTransitions`,
frames once for the frame replay (:class:`~training.logged_data.PixelLog`). Found by
``MINARI_DATASETS_PATH`` (else ``~/.minari/datasets``); never downloaded.

minari is an optional extra, imported only when a dataset is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from control_node.minari_export import ROBOT_KEY
from control_node.translog.reader import PixelSegment
from control_node.translog.schema import LogError, LogSpec
from training.logged_data import (
    LoggedTransitions,
    PixelLog,
    RetrainError,
    pixel_log,
    state_transitions,
)
from training.replay import Transitions


def load_minari(
    dataset_id: str, warn: Callable[[str], None] | None = None
) -> LoggedTransitions | PixelLog:
    """Every episode of the local Minari dataset ``dataset_id``; RetrainError (naming why) for
    a dataset that is missing, empty, or not a continuous-control robot's."""
    import minari  # the optional extra: `ddpg` names it in one line when it is missing

    try:
        dataset = minari.load_dataset(dataset_id)
    except FileNotFoundError as e:
        raise RetrainError(f"--minari {dataset_id}: {e}") from None
    except ValueError as e:  # a malformed id
        raise RetrainError(f"--minari {dataset_id}: {e}") from None
    spec = dataset_spec(dataset, dataset_id)
    if dataset.total_steps == 0:
        raise RetrainError(f"--minari {dataset_id}: the dataset holds no steps")
    episodes = list(dataset.iterate_episodes())
    if spec.pixels:
        runs = [_segment(ep, spec, dataset_id) for ep in episodes]
        return pixel_log(spec, runs, sum(len(r) for r in runs))
    return _rows(episodes, spec)


def dataset_spec(dataset: Any, dataset_id: str) -> LogSpec:
    """The robot a dataset holds: the one our export recorded, else read off its spaces."""
    saved = dataset.storage.metadata.get(ROBOT_KEY)
    try:
        if saved is not None:
            pixels = saved.get("pixels")
            return LogSpec(
                saved["env_id"],
                tuple(saved["obs_shape"]),
                saved["obs_dtype"],
                tuple(saved["act_low"]),
                tuple(saved["act_high"]),
                json.dumps(pixels) if pixels else "",
            )
        return _foreign_spec(dataset, dataset_id)
    except (KeyError, TypeError, LogError) as e:
        raise RetrainError(f"--minari {dataset_id}: not a robot dataset: {e}") from None


def _foreign_spec(dataset: Any, dataset_id: str) -> LogSpec:
    from gymnasium import spaces

    obs, act = dataset.observation_space, dataset.action_space
    if not isinstance(obs, spaces.Box) or len(obs.shape) != 1 or obs.dtype.kind != "f":
        raise RetrainError(
            f"--minari {dataset_id}: observations are {obs}; retrain learns from flat float "
            "state vectors (or from a pixel log exported by ddpg logs --to-minari)"
        )
    if not isinstance(act, spaces.Box) or len(act.shape) != 1:
        raise RetrainError(f"--minari {dataset_id}: actions are {act}; DDPG needs a 1-D Box")
    env = dataset.env_spec
    if env is None:
        raw = dataset.storage.metadata.get("eval_env_spec")
        env_id = json.loads(raw).get("id") if raw else None
    else:
        env_id = env.id
    if not env_id:
        raise RetrainError(
            f"--minari {dataset_id}: names no environment (env_spec, eval_env_spec) to "
            "evaluate the retrained actor in"
        )
    return LogSpec(env_id, obs.shape, obs.dtype.name, tuple(act.low), tuple(act.high))


def _infos(ep: Any, key: str, fill: Any, n: int) -> np.ndarray:
    """Per-step info ``key`` (entry i + 1 belongs to step i; entry 0 is the reset's)."""
    values = ep.infos.get(key) if isinstance(ep.infos, dict) else None
    return np.full(n, fill) if values is None or len(values) != n + 1 else np.asarray(values[1:])


def _rows(episodes: list[Any], spec: LogSpec) -> LoggedTransitions:
    obs, next_obs, action, reward, term, trunc, key, step = ([] for _ in range(8))
    for i, ep in enumerate(episodes):
        n = len(ep.rewards)
        o = np.asarray(ep.observations, np.float32).reshape(n + 1, -1)
        obs.append(o[:-1])
        next_obs.append(o[1:])
        action.append(np.asarray(ep.actions, np.float32).reshape(n, -1))
        reward.append(np.asarray(ep.rewards, np.float64))
        term.append(np.asarray(ep.terminations, bool))
        trunc.append(np.asarray(ep.truncations, bool))
        key.append(np.full(n, i, np.int64))
        step.append(np.arange(n, dtype=np.int64))
    rows = Transitions(*(np.concatenate(c) for c in (obs, action, reward, next_obs, term, trunc)))
    return state_transitions(spec, rows, np.concatenate(key), np.concatenate(step))


def _segment(ep: Any, spec: LogSpec, dataset_id: str) -> PixelSegment:
    """A pixel episode as a run of frames: its first stack, then each step's newest frame (the
    stacks must shift by one frame a step, as the node's pixel logs do)."""
    stack, n = spec.stack, len(ep.rewards)
    observations = np.asarray(ep.observations)
    c = spec.frame_shape[0]
    if observations.dtype != np.uint8 or observations.shape != (n + 1, *spec.obs_shape):
        raise RetrainError(
            f"--minari {dataset_id}: episode {ep.id} observations are {observations.dtype} "
            f"{observations.shape}, not uint8 {(n + 1, *spec.obs_shape)}"
        )
    if not np.array_equal(observations[1:, :-c], observations[:-1, c:]):
        raise RetrainError(
            f"--minari {dataset_id}: episode {ep.id} is not a frame stack that shifts by one "
            "frame a step"
        )
    return PixelSegment(
        bridge_id="minari",
        session=dataset_id,
        episode=int(ep.id),
        first_step=0,
        obs0=observations[0],
        frames=observations[1:, -c:],
        action=np.asarray(ep.actions, np.float32).reshape(n, -1),
        reward=np.asarray(ep.rewards, np.float32),
        terminated=np.asarray(ep.terminations, bool),
        truncated=np.asarray(ep.truncations, bool),
        model_id=_infos(ep, "model_id", "", n).astype(object),
        safe=_infos(ep, "safe_action", False, n).astype(bool),
        stack=stack,
    )
