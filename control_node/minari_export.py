"""A transition log as a Minari dataset (``ddpg logs DIR --to-minari DATASET_ID --out ROOT``), so
the tools offline-RL users already have open what the node logged.

Written with Minari's own API (:func:`minari.create_dataset_from_buffers`, its ``arrow`` data
format, images stored raw, not JPEG) under ``ROOT/DATASET_ID`` as ``MINARI_DATASETS_PATH=ROOT``
expects. One Minari episode per run of consecutive logged steps: a logged episode is split
where it ends (terminated, truncated) and at every gap (a step missing, or a next observation
that is not the next row's observation), so each Minari episode is one exact chain of
observations. The spaces are the log's spec: observations ``Box`` of its shape and dtype (pixel
logs: the stacked uint8 frames, rebuilt bit for bit), actions ``Box`` of its bounds. Each step's
info holds the ``model_id`` that chose its action and ``safe_action``; each episode's metadata
the bridge id and session, the logged episode number and first step, the model ids, and why it
ends. ``total_steps`` is the number of transitions exported: every logged one, unless a pixel
chunk holding a segment's first stack is missing (warned).

minari (and gymnasium, for its spaces) is an optional extra, imported only here, when an export
runs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from control_node.translog.reader import (
    LogContents,
    action_array,
    obs_array,
    pixel_segments,
    read_logs,
)
from control_node.translog.schema import LogError, LogSpec

ENDS = ("terminated", "truncated", "gap")
"""Why a Minari episode ends: the logged episode's end, or a gap in the log (the robot went on)."""


ROBOT_KEY = "ddpg_robot"
"""Dataset metadata key of the log's robot spec (:func:`robot_metadata`): what ``ddpg retrain
--minari`` builds its networks for, pixel spec included."""


def robot_metadata(spec: LogSpec) -> dict[str, Any]:
    """The log's spec as plain JSON: env_id, obs_shape, obs_dtype, act_low, act_high, pixels
    (the pixel spec, or None)."""
    return {
        "env_id": spec.env_id,
        "obs_shape": list(spec.obs_shape),
        "obs_dtype": spec.obs_dtype,
        "act_low": list(spec.act_low),
        "act_high": list(spec.act_high),
        "pixels": spec.pixel_spec,
    }


class ExportError(ValueError):
    """The export cannot be done as asked (no transitions, the dataset exists, a bad id)."""


@dataclass
class Run:
    """One Minari episode: a run of consecutive logged steps of one bridge session's episode."""

    bridge_id: str
    session: str
    episode: int
    first_step: int
    observations: np.ndarray  # (T + 1, *obs_shape)
    actions: np.ndarray  # (T, act_dim) float32
    rewards: np.ndarray  # (T,) float64
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    model_id: np.ndarray  # (T,) str
    safe: np.ndarray  # (T,) bool

    @property
    def end(self) -> str:
        return "terminated" if self.terminated[-1] else "truncated" if self.truncated[-1] else "gap"


def state_runs(contents: LogContents) -> Iterator[Run]:
    """The runs of a state log: rows sorted by bridge session (first seen first), episode and
    step, cut where the episode ends, a step is missing or the observations do not chain."""
    spec, t = contents.spec, contents.table
    assert spec is not None
    codes = [
        pc.dictionary_encode(t.column(c).combine_chunks()) for c in ("bridge_id", "bridge_session")
    ]
    bridge, session = (np.asarray(c.indices, dtype=np.int64) for c in codes)
    names = [c.dictionary.to_pylist() for c in codes]
    episode, step = t.column("episode").to_numpy(), t.column("step").to_numpy()
    order = np.lexsort((step, episode, session, bridge))
    obs, next_obs = obs_array(t, "obs", spec)[order], obs_array(t, "next_obs", spec)[order]
    action = action_array(t, "action", spec)[order]
    reward = t.column("reward").to_numpy()[order]
    terminated = t.column("terminated").to_numpy(zero_copy_only=False)[order]
    truncated = t.column("truncated").to_numpy(zero_copy_only=False)[order]
    model_id = t.column("model_id").to_numpy(zero_copy_only=False)[order]
    safe = t.column("safe_action").to_numpy(zero_copy_only=False)[order]
    b, s, e, st = bridge[order], session[order], episode[order], step[order]
    n = len(order)
    flat_obs, flat_next = obs.reshape(n, -1), next_obs.reshape(n, -1)
    follows = np.zeros(n, dtype=bool)
    follows[1:] = (b[1:] == b[:-1]) & (s[1:] == s[:-1]) & (e[1:] == e[:-1])
    follows[1:] &= (st[1:] == st[:-1] + 1) & ~(terminated[:-1] | truncated[:-1])
    # the same bytes (NaN included): a chain the node logged, not values that merely compare
    if n > 1:
        follows[1:] &= (flat_obs[1:].view(np.uint8) == flat_next[:-1].view(np.uint8)).all(axis=1)
    bounds = [*np.flatnonzero(~follows).tolist(), n]
    for lo, hi in itertools.pairwise(bounds):
        yield Run(
            bridge_id=names[0][b[lo]],
            session=names[1][s[lo]],
            episode=int(e[lo]),
            first_step=int(st[lo]),
            observations=np.concatenate([obs[lo : lo + 1], next_obs[lo:hi]]),
            actions=action[lo:hi],
            rewards=reward[lo:hi],
            terminated=terminated[lo:hi],
            truncated=truncated[lo:hi],
            model_id=model_id[lo:hi],
            safe=safe[lo:hi],
        )


def pixel_runs(contents: LogContents, warn: Callable[[str], None] | None = None) -> Iterator[Run]:
    """The runs of a pixel log: its segments (:func:`pixel_segments`), stacks rebuilt."""
    for seg in pixel_segments(contents, warn):
        yield Run(
            bridge_id=seg.bridge_id,
            session=seg.session,
            episode=seg.episode,
            first_step=seg.first_step,
            observations=seg.observations(),
            actions=seg.action,
            rewards=seg.reward.astype(np.float64),
            terminated=seg.terminated,
            truncated=seg.truncated,
            model_id=seg.model_id,
            safe=seg.safe,
        )


def spaces(spec: LogSpec) -> tuple[Any, Any]:
    """(observation space, action space) of the log's robot, as Gymnasium spaces."""
    from gymnasium import spaces as gs

    dtype = np.dtype(spec.obs_dtype)
    if dtype == np.uint8:
        obs_space = gs.Box(0, 255, spec.obs_shape, np.uint8)
    else:
        obs_space = gs.Box(-np.inf, np.inf, spec.obs_shape, dtype)
    act_space = gs.Box(
        np.asarray(spec.act_low, np.float32),
        np.asarray(spec.act_high, np.float32),
        dtype=np.float32,
    )
    return obs_space, act_space


def to_minari(
    dirs: Sequence[Path],
    dataset_id: str,
    root: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export the committed chunks of ``dirs`` as the Minari dataset ``dataset_id`` under
    ``root`` (default: ``MINARI_DATASETS_PATH``, else Minari's own ``~/.minari/datasets``).
    Returns what was written. ExportError (a ValueError) before anything is written when the
    log holds no transitions or the dataset exists; a failed write removes the partial
    dataset (and only it)."""
    import minari  # the optional extra: `ddpg` names it in one line when it is missing
    from minari.data_collector import EpisodeBuffer

    try:
        contents = read_logs(dirs, warn)
    except LogError as e:
        raise ExportError(str(e)) from None
    spec = contents.spec
    if spec is None or contents.table.num_rows == 0:
        raise ExportError(f"{', '.join(map(str, dirs))}: no committed transitions to export")
    root = Path(root or os.environ.get("MINARI_DATASETS_PATH") or minari_default_root())
    path = root / dataset_id
    if path.exists():
        raise ExportError(
            f"{path} exists: a Minari dataset is never overwritten; choose another id"
        )
    runs = list(pixel_runs(contents, warn) if spec.pixels else state_runs(contents))
    obs_space, act_space = spaces(spec)
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=run.observations,
            actions=run.actions,
            rewards=run.rewards,
            terminations=run.terminated,
            truncations=run.truncated,
            infos={  # lists: Minari reads 1-D numpy infos back wrongly (an empty shape)
                "model_id": ["", *run.model_id.tolist()],
                "safe_action": [False, *run.safe.tolist()],
            },
        )
        for i, run in enumerate(runs)
    ]
    created = False
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        with warnings.catch_warnings():  # author, e-mail, permalink: a log has none to give
            warnings.simplefilter("ignore", UserWarning)
            created = True
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                observation_space=obs_space,
                action_space=act_space,
                algorithm_name="ddpg-control transition log (deployed actors)",
                description=_description(spec, dirs),
                data_format="arrow",
                jpeg_encoding=False,
            )
        dataset.storage.update_episode_metadata([_episode_metadata(run) for run in runs])
        dataset.storage.update_metadata({ROBOT_KEY: robot_metadata(spec)})
    except BaseException:
        if created and path.exists():
            shutil.rmtree(path)
        raise
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    exported = sum(len(run.actions) for run in runs)
    ends = {end: sum(run.end == end for run in runs) for end in ENDS}
    return {
        "dataset_id": dataset_id,
        "root": str(root),
        "path": str(path),
        "env_id": spec.env_id,
        "obs_shape": list(spec.obs_shape),
        "obs_dtype": spec.obs_dtype,
        "pixels": spec.pixel_spec,
        "transitions_logged": contents.table.num_rows,
        "total_steps": exported,
        "total_episodes": len(runs),
        "episode_ends": ends,
    }


def minari_default_root() -> Path:
    """Where Minari keeps datasets when MINARI_DATASETS_PATH is unset."""
    return Path.home() / ".minari" / "datasets"


def _episode_metadata(run: Run) -> dict[str, Any]:
    return {
        "bridge_id": run.bridge_id,
        "bridge_session": run.session,
        "log_episode": run.episode,
        "first_step": run.first_step,
        "model_ids": sorted({m for m in run.model_id.tolist() if m}),
        "end": run.end,
    }


def _description(spec: LogSpec, dirs: Sequence[Path]) -> str:
    pixels = f", pixels {spec.pixels}" if spec.pixels else ""
    return (
        f"Transitions a ddpg-control node logged while serving {spec.env_id} (obs "
        f"{list(spec.obs_shape)} {spec.obs_dtype}{pixels}), from {', '.join(map(str, dirs))}. "
        "One episode per run of consecutive logged steps: split at terminated, truncated and "
        "gaps. infos: model_id (the actor that chose the step's action; '' at the reset and for "
        "the robot's own safe action) and safe_action; episode metadata: bridge_id, "
        "bridge_session, log_episode, first_step, model_ids, end."
    )
