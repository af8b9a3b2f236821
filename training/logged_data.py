"""Logged transitions as training data: the control node's logs read into arrays (state) or runs
of frames (pixels), checked against the run that will learn from them, and put into its replay.

Every committed chunk is read (:mod:`control_node.translog.reader`); rows with non-finite values
are dropped (state) or cut a run where they stand (pixels), so only what the robot really lived
reaches the replay. ``ddpg retrain`` and continual mode learn from what these functions return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from control_node.config import ConfigError
from control_node.translog.reader import (
    LogContents,
    PixelSegment,
    action_array,
    obs_array,
    pixel_segments,
    read_logs,
)
from control_node.translog.schema import LogError, LogSpec
from models.spec import RobotSpec, pixels_dict
from training.frame_replay import FrameReplay
from training.learner import Replay
from training.replay import Transitions

REPLAY_COLUMNS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")


class RetrainError(ConfigError):
    """The logs, the init run or the output directory cannot be used; the message says why."""


@dataclass
class LoggedTransitions:
    """Every committed row of the logs, in log order, as arrays (float32 unless noted).

    ``valid`` marks rows whose obs, action, reward and next_obs are all finite; only those go to
    the replay. ``episode`` keys each (bridge_id, bridge_session, episode) group.
    """

    spec: LogSpec
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray  # float64, as logged
    next_obs: np.ndarray
    terminated: np.ndarray  # bool
    truncated: np.ndarray  # bool
    episode: np.ndarray  # int64, equal for the rows of one episode (not numbered densely)
    step: np.ndarray  # int64, index in its episode
    valid: np.ndarray  # bool
    chunks: int = 0
    leftovers: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def dropped(self) -> int:
        return int(len(self.valid) - self.valid.sum())

    def replay_columns(self) -> dict[str, np.ndarray]:
        """The valid rows, as :meth:`ReplayBuffer.add_batch` columns."""
        v = self.valid
        return {
            "obs": self.obs[v],
            "action": self.action[v],
            "reward": self.reward[v],
            "next_obs": self.next_obs[v],
            "terminated": self.terminated[v],
            "truncated": self.truncated[v],
        }


@dataclass
class PixelLog:
    """A pixel log as runs of consecutive steps, each frame once (the frame replay's input)."""

    spec: LogSpec
    segments: list[PixelSegment]
    rows: int  # logged transitions, kept or not
    dropped: int  # rows of runs cut at a non-finite action or reward
    chunks: int = 0
    leftovers: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.rows

    @property
    def kept(self) -> int:
        return sum(len(seg) for seg in self.segments)

    @property
    def frames_needed(self) -> int:
        """Frames the replay writes for these runs: each run's first stack, then a frame a
        step."""
        return sum(len(seg) + seg.stack for seg in self.segments)

    @property
    def episode_ends(self) -> int:
        return sum(
            int(seg.terminated[-1] or seg.truncated[-1]) for seg in self.segments if len(seg)
        )


def load_logs(
    dirs: Sequence[Path], warn: Callable[[str], None] | None = None
) -> LoggedTransitions | PixelLog:
    """Read every committed chunk of ``dirs`` (a crashed writer's temp files and unreadable
    chunks are passed to ``warn`` and skipped): state logs as rows, pixel logs as runs. An empty
    log or logs of different robots raise :class:`RetrainError`."""
    try:
        contents = read_logs(dirs, warn=warn)
    except LogError as e:
        raise RetrainError(str(e)) from None
    spec, table = contents.spec, contents.table
    where = ", ".join(str(d) for d in dirs)
    if spec is None or table.num_rows == 0:
        skipped = len(contents.leftovers) + len(contents.unreadable)
        extra = f" ({skipped} temp or unreadable file(s) skipped)" if skipped else ""
        raise RetrainError(f"no committed transitions in {where}{extra}: nothing to retrain from")
    if spec.pixels:
        try:
            runs = pixel_segments(contents, warn)
        except LogError as e:
            raise RetrainError(str(e)) from None
        return pixel_log(
            spec,
            runs,
            table.num_rows,
            chunks=len(contents.chunks),
            leftovers=[str(p) for p in contents.leftovers],
            unreadable=[f"{p}: {why}" for p, why in contents.unreadable],
        )
    return _state_transitions(contents, spec, where)


def pixel_log(spec: LogSpec, runs: Sequence[PixelSegment], rows: int, **found: Any) -> PixelLog:
    """Runs of frames as training data: a non-finite action or reward ends a run where it
    stands. ``rows``: the transitions the runs came from; ``found``: PixelLog's file counts."""
    segments: list[PixelSegment] = []
    for seg in runs:
        ok = np.isfinite(seg.action).all(axis=1) & np.isfinite(seg.reward)
        bad = np.flatnonzero(~ok)
        segments.append(seg if not len(bad) else _cut(seg, int(bad[0])))
    return PixelLog(
        spec=spec,
        segments=[seg for seg in segments if len(seg)],
        rows=rows,
        dropped=rows - sum(len(seg) for seg in segments),
        **found,
    )


def _cut(seg: PixelSegment, steps: int) -> PixelSegment:
    """The first ``steps`` steps of ``seg``."""
    return dataclasses.replace(
        seg,
        frames=seg.frames[:steps],
        action=seg.action[:steps],
        reward=seg.reward[:steps],
        terminated=seg.terminated[:steps],
        truncated=seg.truncated[:steps],
        model_id=seg.model_id[:steps],
        safe=seg.safe[:steps],
    )


def load_transitions(
    dirs: Sequence[Path], warn: Callable[[str], None] | None = None
) -> LoggedTransitions:
    """:func:`load_logs` for state logs; a pixel log raises :class:`RetrainError`."""
    data = load_logs(dirs, warn)
    if isinstance(data, PixelLog):
        raise RetrainError(
            f"{', '.join(map(str, dirs))}: a pixel log; read it with load_logs (frames once)"
        )
    return data


def _state_transitions(contents: LogContents, spec: LogSpec, where: str) -> LoggedTransitions:
    table = contents.table
    if len(spec.obs_shape) != 1 or np.dtype(spec.obs_dtype).kind != "f":
        raise RetrainError(
            f"{where}: observations are {spec.obs_dtype} {spec.obs_shape}; retrain learns from "
            "flat float state vectors or from pixel logs"
        )
    obs = obs_array(table, "obs", spec).astype(np.float32, copy=False)
    next_obs = obs_array(table, "next_obs", spec).astype(np.float32, copy=False)
    action = action_array(table, "action", spec)
    reward = table.column("reward").to_numpy()
    # One integer per (bridge_id, bridge_session, episode), from the strings' dictionary codes:
    # a plain int64 key, so grouping is one integer sort rather than a sort of row tuples.
    bridge, session = (
        pc.dictionary_encode(table.column(c)).combine_chunks()
        for c in ("bridge_id", "bridge_session")
    )
    pair = np.asarray(bridge.indices, np.int64) * len(session.dictionary) + np.asarray(
        session.indices, np.int64
    )
    number = table.column("episode").to_numpy()
    span = int(number.max()) - int(number.min()) + 1
    if (int(pair.max()) + 1) <= 2**62 // span:
        episode = pair * span + (number - number.min())
    else:  # absurd episode numbers: fall back to numbering the distinct keys
        _, episode = np.unique(np.stack([pair, number], 1), axis=0, return_inverse=True)
    rows = Transitions(
        obs,
        action,
        reward,
        next_obs,
        table.column("terminated").to_numpy(zero_copy_only=False),
        table.column("truncated").to_numpy(zero_copy_only=False),
    )
    return state_transitions(
        spec,
        rows,
        episode.reshape(-1).astype(np.int64),
        table.column("step").to_numpy(),
        chunks=len(contents.chunks),
        leftovers=[str(p) for p in contents.leftovers],
        unreadable=[f"{p}: {why}" for p, why in contents.unreadable],
    )


def state_transitions(
    spec: LogSpec, rows: Transitions, episode: np.ndarray, step: np.ndarray, **found: Any
) -> LoggedTransitions:
    """Rows as training data; only rows whose obs, action, reward and next_obs are all finite
    are ``valid``. ``found``: LoggedTransitions' file counts."""
    valid = (
        np.isfinite(rows.obs).all(axis=1)
        & np.isfinite(rows.next_obs).all(axis=1)
        & np.isfinite(rows.action).all(axis=1)
        & np.isfinite(rows.reward)
    )
    return LoggedTransitions(spec, *rows, episode, step, valid, **found)


def check_logs_fit(log: LogSpec, robot: RobotSpec, against: str) -> None:
    """Refuse logs of another robot than ``robot`` (what the run's networks were built for):
    env id, observation shape (or the pixel spec the run sees through), action bounds."""
    diff = []
    if log.env_id != robot.env_id:
        diff.append(f"env {log.env_id!r} != {robot.env_id!r}")
    pixels = pixels_dict(robot.pixels)
    if pixels is not None or log.pixel_spec is not None:
        if log.pixel_spec != pixels:
            diff.append(f"pixels {log.pixel_spec} != {pixels}")
    elif tuple(log.obs_shape) != tuple(robot.obs_shape):
        diff.append(f"obs shape {tuple(log.obs_shape)} != {tuple(robot.obs_shape)}")
    low, high = np.asarray(log.act_low), np.asarray(log.act_high)
    if low.shape != robot.act_low.shape or not (
        np.allclose(low, robot.act_low, rtol=1e-6, atol=1e-6)
        and np.allclose(high, robot.act_high, rtol=1e-6, atol=1e-6)
    ):
        diff.append(
            f"action bounds {list(log.act_low)}..{list(log.act_high)} != "
            f"{robot.act_low.tolist()}..{robot.act_high.tolist()}"
        )
    if diff:
        raise RetrainError(f"the logs do not match {against}: {'; '.join(diff)}")


def state_replay_rows(saved: dict[str, Any], path: Path) -> dict[str, Any]:
    """A saved state replay (``replay.pt``) as add_batch columns, oldest row first (empty if
    none)."""
    if not saved:
        return {}
    try:
        size, pos = int(saved["size"]), int(saved["pos"])
        columns = {k: saved[k][:size] for k in REPLAY_COLUMNS}
    except KeyError as e:
        raise RetrainError(f"{path}: not a state replay (no {e})") from None
    if 0 < pos < size:  # a full ring: the oldest row sits at pos
        columns = {k: torch.cat([v[pos:], v[:pos]]) for k, v in columns.items()}
    return columns


def fill_replay(
    replay: Replay, data: LoggedTransitions | PixelLog, init_rows: dict[str, Any]
) -> tuple[int, int]:
    """The init run's saved replay (``init_rows``, if any), then the logs; returns the rows
    added from the logs and the episode ends among them."""
    if isinstance(replay, FrameReplay):
        assert isinstance(data, PixelLog)
        if init_rows:
            replay.load_state_dict(init_rows)
        for seg in data.segments:
            replay.add_segment(
                seg.obs0, seg.frames, seg.action, seg.reward, seg.terminated, seg.truncated
            )
        return data.kept, data.episode_ends
    assert isinstance(data, LoggedTransitions)
    if init_rows:
        replay.add_batch(**init_rows)
    replay.add_batch(**data.replay_columns())
    return int(data.valid.sum()), int((data.terminated | data.truncated)[data.valid].sum())
