"""Retrain from logged transitions: ``ddpg retrain --logs DIR ... [--init RUN] --out RUN2``.

The control node logs every transition the robot lived (:mod:`control_node.translog`). This
module turns those logs into a replay buffer (after the init run's own saved replay, when it has
one), runs DDPG updates on it, starting from the init run's checkpoint or from fresh networks, and
writes a run directory exactly like ``ddpg train`` does, so ``ddpg train --resume``, ``ddpg
export`` and another ``ddpg retrain --init`` all accept it.

Loading the data is kept apart from learning: the updates are the trainer's own
(:meth:`DDPGAgent.update` on :meth:`ReplayBuffer.sample`), and the run directory (config,
metrics, checkpoint, evaluation) is a :class:`~training.trainer.Trainer`'s, driven without its
environment loop. There are no environment steps here, only updates.

Offline metrics, because a retrained actor has not been run yet when it is written: the critic's
TD loss on a fixed sample of the replay before and after the updates, and its Q estimates against
the discounted returns the robot actually collected, over every episode the log holds whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from control_node.translog import (
    LogContents,
    LogError,
    LogSpec,
    PixelSegment,
    action_array,
    obs_array,
    pixel_segments,
    read_logs,
)
from sim_bridge.envs import EnvError, EnvSpec, env_spec, make_env
from training.agent import DDPGAgent
from training.config import ConfigError, TrainConfig, load_config, make_config
from training.frame_replay import FrameReplay
from training.metrics import finite_or_none
from training.replay import Batch
from training.trainer import Trainer, eval_seed, read_checkpoint

# Config keys the init checkpoint fixes: its weights only fit these, so changing one is refused.
FIXED_BY_INIT = (
    "env",
    "preset",
    "actor_hidden",
    "critic_hidden",
    "critic_action_layer",
    "batch_norm",
    "final_init",
    "twin_q",
    "pixels",
    "pixel_size",
    "frame_stack",
    "action_repeat",
    "camera",
    "conv_strides",
    "pixel_features",
)
CRITIC_LOSS_ROWS = 10_000  # fixed replay sample the start/end critic loss is measured on
PIXEL_LOSS_ROWS = 1_000  # the same from pixels: two 36 KB stacks a row
Q_CHUNK = 65_536  # rows per critic forward pass when scoring Q against returns
REPLAY_COLUMNS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")


class RetrainError(ConfigError):
    """The logs, the init run or the output directory cannot be used; the message says why."""


# -- the logs as arrays ---------------------------------------------------------------------------


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
        segments: list[PixelSegment] = []
        for seg in runs:  # a non-finite action or reward ends a run where it stands
            ok = np.isfinite(seg.action).all(axis=1) & np.isfinite(seg.reward)
            bad = np.flatnonzero(~ok)
            segments.append(seg if not len(bad) else _cut(seg, int(bad[0])))
        return PixelLog(
            spec=spec,
            segments=[seg for seg in segments if len(seg)],
            rows=table.num_rows,
            dropped=table.num_rows - sum(len(seg) for seg in segments),
            chunks=len(contents.chunks),
            leftovers=[str(p) for p in contents.leftovers],
            unreadable=[f"{p}: {why}" for p, why in contents.unreadable],
        )
    return _state_transitions(contents, spec, where)


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
    valid = (
        np.isfinite(obs).all(axis=1)
        & np.isfinite(next_obs).all(axis=1)
        & np.isfinite(action).all(axis=1)
        & np.isfinite(reward)
    )
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
    return LoggedTransitions(
        spec=spec,
        obs=obs,
        action=action,
        reward=reward,
        next_obs=next_obs,
        terminated=table.column("terminated").to_numpy(zero_copy_only=False),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        episode=episode.reshape(-1).astype(np.int64),
        step=table.column("step").to_numpy(),
        valid=valid,
        chunks=len(contents.chunks),
        leftovers=[str(p) for p in contents.leftovers],
        unreadable=[f"{p}: {why}" for p, why in contents.unreadable],
    )


def check_spec(
    log: LogSpec, env: EnvSpec, against: str, pixels: dict[str, Any] | None = None
) -> None:
    """Refuse logs of another robot than ``env``: env id, observation shape (or the pixel
    spec ``pixels`` the run sees through), action bounds."""
    diff = []
    if log.env_id != env.env_id:
        diff.append(f"env {log.env_id!r} != {env.env_id!r}")
    if pixels is not None or log.pixel_spec is not None:
        if log.pixel_spec != pixels:
            diff.append(f"pixels {log.pixel_spec} != {pixels}")
    elif tuple(log.obs_shape) != tuple(env.obs_shape):
        diff.append(f"obs shape {tuple(log.obs_shape)} != {tuple(env.obs_shape)}")
    low, high = np.asarray(log.act_low), np.asarray(log.act_high)
    if low.shape != env.act_low.shape or not (
        np.allclose(low, env.act_low, rtol=1e-6, atol=1e-6)
        and np.allclose(high, env.act_high, rtol=1e-6, atol=1e-6)
    ):
        diff.append(
            f"action bounds {list(log.act_low)}..{list(log.act_high)} != "
            f"{env.act_low.tolist()}..{env.act_high.tolist()}"
        )
    if diff:
        raise RetrainError(f"the logs do not match {against}: {'; '.join(diff)}")


# -- returns and Q --------------------------------------------------------------------------------


@dataclass
class LoggedReturns:
    """Discounted returns-to-go of the rows of every whole episode in a log."""

    rows: np.ndarray  # indices into the LoggedTransitions arrays
    returns: np.ndarray  # G_t, float64
    terminated: np.ndarray  # bool per row: its episode ended in a true terminal state
    episodes: int
    episodes_terminated: int
    episodes_skipped: int  # not whole in the log (no step 0, no end, gaps, a dropped row)


def discounted_returns(data: LoggedTransitions, gamma: float) -> LoggedReturns:
    """G_t = sum_k gamma^k r_{t+k} for every row of every episode that is whole in the log:
    its rows cover steps 0..end without a gap or repeat, only the last is terminal
    (terminated or truncated), and none was dropped as non-finite.

    Vectorised across episodes: one numpy step per position from the episode end, so the
    Python loop runs as many times as the longest episode is long, whatever the row count.
    """
    n = len(data)
    if n == 0:
        none = np.zeros(0, np.int64)
        return LoggedReturns(none, none.astype(np.float64), none.astype(bool), 0, 0, 0)
    order = np.lexsort((data.step, data.episode))
    ep, step = data.episode[order], data.step[order]
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    terminal = (data.terminated | data.truncated)[order]
    jump = np.r_[False, np.diff(step) != 1]
    jump[starts] = False
    whole = (
        (step[starts] == 0)
        & terminal[ends - 1]
        & (np.add.reduceat(terminal.astype(np.int64), starts) == 1)
        & (np.add.reduceat(jump.astype(np.int64), starts) == 0)
        & (np.add.reduceat((~data.valid[order]).astype(np.int64), starts) == 0)
    )
    lengths = (ends - starts)[whole]
    # Sorted positions of the kept rows, and each one's distance from its episode's last row.
    first_of = np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = np.repeat(starts[whole], lengths) + np.arange(lengths.sum()) - first_of
    from_end = np.repeat(ends[whole], lengths) - 1 - kept
    g = np.zeros(n, dtype=np.float64)
    if len(kept):
        reward = data.reward[order]
        by_dist = np.argsort(from_end, kind="stable")
        rows_by_dist = kept[by_dist]
        bounds = np.searchsorted(from_end[by_dist], np.arange(int(from_end.max()) + 2))
        last = rows_by_dist[bounds[0] : bounds[1]]
        g[last] = reward[last]
        for k in range(1, len(bounds) - 1):
            idx = rows_by_dist[bounds[k] : bounds[k + 1]]
            g[idx] = reward[idx] + gamma * g[idx + 1]
    term_ep = data.terminated[order][ends - 1] & whole
    return LoggedReturns(
        rows=order[kept],
        returns=g[kept],
        terminated=np.repeat(term_ep[whole], lengths),
        episodes=int(whole.sum()),
        episodes_terminated=int(term_ep.sum()),
        episodes_skipped=int((~whole).sum()),
    )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Batch norm uses its running statistics and updates nothing while metrics are read."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was, strict=True):
            m.train(training)


def q_values(agent: DDPGAgent, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The critic's estimate for logged (obs, action) pairs: the minimum over the twin critics
    (what the TD target bootstraps from), which is Q1 with a single critic."""
    out = np.empty(len(obs), dtype=np.float64)
    actor, device = agent.actor, agent.device
    with _eval_mode(agent.critic), torch.no_grad():
        for i in range(0, len(obs), Q_CHUNK):
            o = torch.as_tensor(obs[i : i + Q_CHUNK], device=device)
            a = torch.as_tensor(action[i : i + Q_CHUNK], device=device)
            a = (a - actor.action_bias) / actor.action_scale
            q = agent.critic(o, a).min(dim=0).values
            out[i : i + len(q)] = q.double().cpu().numpy()
    return out


def critic_loss(agent: DDPGAgent, batch: Batch, seed: int) -> float:
    """The update's own critic loss (as in train.csv: squared TD error, summed over the twin
    critics) on ``batch``, with no gradient step, batch norm in eval mode, and the target
    smoothing noise drawn from ``seed`` so that measuring changes no random stream."""
    devices = [agent.device] if agent.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        with _eval_mode(agent.critic):
            loss, _ = agent._critic_loss(batch)
    return float(loss)


def _q_stats(q: np.ndarray, g: np.ndarray) -> dict[str, float | None]:
    bias = q - g
    return {
        "q_mean": finite_or_none(float(q.mean())),
        "bias_mean": finite_or_none(float(bias.mean())),
        "bias_std": finite_or_none(float(bias.std())),
    }


def _q_group(
    returns: LoggedReturns, mask: np.ndarray, q_before: np.ndarray, q_after: np.ndarray
) -> dict[str, Any] | None:
    if not mask.any():
        return None
    g = returns.returns[mask]
    return {
        "rows": int(mask.sum()),
        "g_mean": float(g.mean()),
        "before": _q_stats(q_before[mask], g),
        "after": _q_stats(q_after[mask], g),
    }


# -- the run --------------------------------------------------------------------------------------


def _check_out(out: Path, init: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise RetrainError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        held = [n for n in ("checkpoint.pt", "config.yaml", "eval.json") if (out / n).exists()]
        if held:
            raise RetrainError(f"--out {out} already holds a run ({held[0]}); choose another --out")
        if any(out.iterdir()):
            raise RetrainError(f"--out {out} is not empty; choose another --out")
    if init is not None and out.resolve() == init.resolve():
        raise RetrainError("--out must differ from --init: the init run is never modified")


def _env_spec(env_id: str) -> EnvSpec:
    env = make_env(env_id)
    try:
        return env_spec(env_id, env)
    finally:
        env.close()


def _config(
    init: Path | None,
    spec: LogSpec,
    out: Path,
    seed: int | None,
    eval_episodes: int,
    overrides: dict[str, Any],
) -> TrainConfig:
    """The init run's config (or a preset's, for the logs' env) with ``overrides`` applied."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("out", "env"):
        if key in given:
            raise RetrainError(f"{key!r} cannot be overridden: it comes from --out and the logs")
    if init is None:
        preset = given.pop("preset", None)
        values: dict[str, Any] = {**given, "env": spec.env_id}
        pixels = spec.pixel_spec
        if pixels is not None:  # the networks see what the robot's camera saw
            camera = pixels.get("camera")
            values.update(
                pixels=True,
                pixel_size=pixels["size"],
                frame_stack=pixels["stack"],
                action_repeat=pixels["repeat"],
                camera="" if camera is None else str(camera),
            )
    else:
        path = init / "config.yaml"
        if not path.exists():
            raise RetrainError(f"--init {init} is not a run directory: config.yaml is missing")
        saved = load_config(path).to_dict()
        changed = [k for k in FIXED_BY_INIT if k in given and _plain(given[k]) != saved[k]]
        if changed:
            raise RetrainError(
                f"--init keeps the run's networks; cannot change {', '.join(changed)}"
            )
        values = {**saved, **given}
        preset = values.pop("preset")
    # The point of a retrain is the new actor: export unless told not to here, whatever the
    # init run's own config said.
    values.update(out=str(out), eval_episodes=eval_episodes, export=given.get("export", True))
    if seed is not None:
        values["seed"] = seed
    return make_config(preset, **values)


def _plain(value: Any) -> Any:
    """A value as ``TrainConfig.to_dict`` writes it (tuples as lists), for comparisons."""
    return list(value) if isinstance(value, tuple | list) else value


def _saved_replay(init: Path, state: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The init run's ``replay.pt`` as saved (a ReplayBuffer's or, from pixels, a FrameReplay's
    state dict); empty if there is none or it is older than the checkpoint."""
    path = init / "replay.pt"
    if not path.exists():
        return {}
    if not state.get("has_replay", True):
        log(f"warning: {path} is older than the checkpoint (saved without replay); not merged")
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        int(saved["size"])
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RetrainError(f"{path}: cannot read the init run's replay: {reason}") from None
    return saved


def _init_replay(init: Path, state: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The init run's saved replay as add_batch columns, oldest row first (empty if none)."""
    saved = _saved_replay(init, state, log)
    if not saved:
        return {}
    try:
        size, pos = int(saved["size"]), int(saved["pos"])
        columns = {k: saved[k][:size] for k in REPLAY_COLUMNS}
    except KeyError as e:
        raise RetrainError(f"{init / 'replay.pt'}: not a state replay (no {e})") from None
    if 0 < pos < size:  # a full ring: the oldest row sits at pos
        columns = {k: torch.cat([v[pos:], v[:pos]]) for k, v in columns.items()}
    return columns


def retrain(
    logs: Sequence[Path],
    out: Path,
    init: Path | None = None,
    updates: int = 5000,
    eval_episodes: int = 10,
    seed: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Retrain from the transitions logged in ``logs`` and write the run directory ``out``.

    With ``init`` (a ``ddpg train`` or ``ddpg retrain`` run directory) the networks, targets,
    optimisers and update counter continue from its checkpoint, on its config, and its saved
    replay (if any) comes first in the buffer; without it a fresh agent of
    ``overrides["preset"]`` (default td3) learns from the logs alone. ``overrides`` are
    TrainConfig fields (batch_size, actor_lr, device, threads, log_every, save_replay, ...);
    with ``init`` the fields its weights fix are refused. ``seed`` defaults to the config's.

    Writes ``config.yaml``, ``train.csv`` and TensorBoard events (the step axis counts updates),
    ``checkpoint.pt`` (the trainer's format: ``ddpg train --resume`` continues it),
    ``retrain.json`` (offline metrics), ``eval.csv``/``eval.json`` after ``eval_episodes``
    deterministic episodes (0 skips them) and the parity-checked ``actor.onnx`` (unless
    ``export=False``; the init run's own ``export`` setting does not count here). Returns the
    eval.json dict. Raises :class:`RetrainError` (a ConfigError) for unusable logs, options or
    output directory, before anything is written.
    """
    t_start = time.perf_counter()
    logs, out = [Path(d) for d in logs], Path(out)
    init = Path(init) if init is not None else None
    if updates < 0:
        raise RetrainError(f"updates = {updates} must be >= 0")
    if eval_episodes < 0:
        raise RetrainError(f"eval_episodes = {eval_episodes} must be >= 0")
    if not logs:
        raise RetrainError("no log directories given")
    _check_out(out, init)
    if init is not None and not (init / "checkpoint.pt").exists():
        raise RetrainError(f"--init {init} is not a run directory: checkpoint.pt is missing")

    # 1. Data, and every refusal, before the run directory exists.
    data = load_logs(logs, warn=lambda line: log(f"warning: {line}"))
    t_read = time.perf_counter() - t_start
    cfg = _config(init, data.spec, out, seed, eval_episodes, overrides)
    try:
        env = _env_spec(cfg.env)
    except EnvError as e:
        raise RetrainError(str(e)) from None
    pixel_spec = cfg.pixel_spec()
    check_spec(
        data.spec,
        env,
        f"the init run's env ({init})" if init else "the environment",
        pixel_spec.to_dict() if pixel_spec is not None else None,
    )
    n_log = data.kept if isinstance(data, PixelLog) else int(data.valid.sum())
    if n_log == 0:
        raise RetrainError(f"all {len(data)} logged transitions have non-finite values")
    state = read_checkpoint(init / "checkpoint.pt") if init is not None else None
    init_columns: dict[str, Any] = {}
    if init is not None and state:
        read_init = _saved_replay if pixel_spec is not None else _init_replay
        init_columns = read_init(init, state, log)
    n_init = int(
        init_columns["size"] if "size" in init_columns else len(init_columns.get("reward", []))
    )
    n_total = n_init + n_log
    steps = (int(state["step"]) if state else 0) + n_log
    # The buffer holds everything, and `ddpg train --resume` rebuilds one that fits it again.
    values = cfg.to_dict()
    values.update(steps=max(steps, n_total, 1), buffer_size=max(cfg.buffer_size, n_total))
    cfg = make_config(values.pop("preset"), **values)

    # 2. The run directory, networks and replay: a Trainer's, without its environment loop.
    frames = None
    if isinstance(data, PixelLog):  # room for every frame: short runs cost a stack each
        frames = data.frames_needed + len(init_columns.get("frames", [])) + cfg.frame_stack + 1
    trainer = Trainer(cfg, progress=False, replay_frames=frames)
    try:
        return _run(
            trainer,
            cfg,
            data,
            logs,
            init,
            state,
            init_columns,
            updates,
            progress,
            log,
            t_read,
            t_start,
        )
    finally:
        trainer.close()


def _run(
    trainer: Trainer,
    cfg: TrainConfig,
    data: LoggedTransitions | PixelLog,
    logs: list[Path],
    init: Path | None,
    state: dict[str, Any] | None,
    init_columns: dict[str, Any],
    updates: int,
    progress: bool,
    log: Callable[[str], None],
    t_read: float,
    t_start: float,
) -> dict[str, Any]:
    agent, replay, out = trainer.agent, trainer.replay, trainer.run_dir
    if state is not None:
        try:
            agent.load_state_dict(state["agent"])
        except (KeyError, RuntimeError) as e:
            raise RetrainError(f"{init}/checkpoint.pt does not fit its config: {e}") from None
        # The optimisers' saved learning rates give way to the config's (an override may
        # have changed them), so that what config.yaml says is what ran.
        for opt, lr, l2 in (
            (agent.actor_opt.opt, cfg.actor_lr, 0.0),
            (agent.critic_opt.opt, cfg.critic_lr, cfg.critic_l2),
        ):
            opt.param_groups[0].update(lr=lr, weight_decay=l2)
        trainer.step = int(state["step"])
        trainer.episode = int(state["episode"])
        trainer.wall_s = float(state["wall_s"])
        log(f"init: {init} (step {trainer.step}, {agent.updates} updates)")
    t0 = time.perf_counter()
    if isinstance(replay, FrameReplay):
        assert isinstance(data, PixelLog)
        if init_columns:
            replay.load_state_dict(init_columns)
        for seg in data.segments:
            replay.add_segment(
                seg.obs0, seg.frames, seg.action, seg.reward, seg.terminated, seg.truncated
            )
        n_log, episode_ends = data.kept, data.episode_ends
    else:
        assert isinstance(data, LoggedTransitions)
        if init_columns:
            replay.add_batch(**init_columns)
        replay.add_batch(**data.replay_columns())
        n_log = int(data.valid.sum())
        episode_ends = int((data.terminated | data.truncated)[data.valid].sum())
    t_fill = time.perf_counter() - t0
    n_init = len(replay) - n_log
    trainer.step += n_log
    trainer.episode += episode_ends
    log(
        f"logs: {len(data)} transitions from {data.chunks} chunk(s) of {data.spec.env_id}; "
        f"dropped {data.dropped} with non-finite values; replay {len(replay)} "
        f"({n_init} from the init run's replay, {n_log} from the logs)"
    )

    # 3. Offline metrics before, the updates, and the metrics after.
    probe = trainer.sample(
        min(len(replay), PIXEL_LOSS_ROWS if cfg.pixels else CRITIC_LOSS_ROWS),
        generator=torch.Generator(device=replay.device).manual_seed(cfg.seed + 3),
    )
    loss_before = critic_loss(agent, probe, cfg.seed + 4)
    q_report: dict[str, Any]
    if isinstance(data, LoggedTransitions):
        returns = discounted_returns(data, cfg.gamma)
        q_obs, q_act = data.obs[returns.rows], data.action[returns.rows]
        q_before = q_values(agent, q_obs, q_act)

    update_s = _update(trainer, cfg, updates, progress)
    trainer.wall_s += update_s
    trainer.save_checkpoint()

    loss_after = critic_loss(agent, probe, cfg.seed + 4)
    if isinstance(data, LoggedTransitions):
        q_after = q_values(agent, q_obs, q_act)
        q_report = _q_report(cfg, returns, q_before, q_after)
    else:
        q_report = {
            "skipped": "not computed for pixel logs: it would rebuild every stacked frame of "
            "every whole episode; the critic loss above is measured on replay samples"
        }
    updates_per_s = updates / update_s if update_s > 0 else None
    report: dict[str, Any] = {
        "logs": [str(d) for d in logs],
        "init": str(init) if init else None,
        "env": cfg.env,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "transitions": {
            "log_rows": len(data),
            "dropped_non_finite": data.dropped,
            "from_logs": n_log,
            "from_init_replay": n_init,
            "replay": len(replay),
            "chunks": data.chunks,
            "leftovers_skipped": data.leftovers,
            "unreadable_skipped": data.unreadable,
        },
        "updates": updates,
        "updates_total": agent.updates,
        "batch_size": cfg.batch_size,
        "updates_per_s": round(updates_per_s, 2) if updates_per_s else None,
        "critic_loss": {
            "rows": len(probe.reward),
            "start": finite_or_none(loss_before),
            "end": finite_or_none(loss_after),
        },
        "q_vs_logged_returns": q_report,
        "read_s": round(t_read, 3),
        "fill_s": round(t_fill, 3),
        "update_s": round(update_s, 3),
    }
    (out / "retrain.json").write_text(json.dumps(report, indent=2) + "\n")
    for line in _describe(report):
        log(line)

    # 4. Evaluation, export, eval.json.
    final = trainer.evaluate() if cfg.eval_episodes else None
    summary: dict[str, Any] = {
        "env": cfg.env,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "steps": trainer.step,
        "updates": updates,
        "updates_total": agent.updates,
        "episodes": cfg.eval_episodes,
        "eval_seed": eval_seed(cfg),
        "eval_return_mean": finite_or_none(final.mean) if final else None,
        "eval_return_std": finite_or_none(final.std) if final else None,
        "eval_returns": final.returns if final else [],
        "wall_s": round(trainer.wall_s, 3),
        "steps_per_s": None,  # no environment steps in a retrain
        "updates_per_s": report["updates_per_s"],
        "device": str(trainer.device),
        "run_dir": str(out),
        "source": "retrain",
        "logs": report["logs"],
        "transitions": n_log,
        "init": report["init"],
        "retrain_wall_s": None,
    }
    if cfg.export:
        summary.update(_export(out, log))
    else:
        summary["model"] = None
    summary["retrain_wall_s"] = round(time.perf_counter() - t_start, 3)
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _q_report(
    cfg: TrainConfig, returns: LoggedReturns, q_before: np.ndarray, q_after: np.ndarray
) -> dict[str, Any]:
    q_kind = (
        "min of the twin critics (the TD target's estimate)" if cfg.twin_q else "Q1 (one critic)"
    )
    return {
        "q": q_kind,
        "gamma": cfg.gamma,
        "note": (
            "G_t is the discounted return-to-go actually logged, over episodes whole in the "
            "log; Q includes the value beyond a time limit, which G of a truncated episode "
            "omits (G is then a lower bound when rewards are non-negative); 'terminated' "
            "holds only episodes that ended in a true terminal state"
        ),
        "episodes": returns.episodes,
        "episodes_terminated": returns.episodes_terminated,
        "episodes_skipped": returns.episodes_skipped,
        "all": _q_group(returns, np.ones(len(returns.rows), bool), q_before, q_after),
        "terminated": _q_group(returns, returns.terminated, q_before, q_after),
    }


def _update(trainer: Trainer, cfg: TrainConfig, updates: int, progress: bool) -> float:
    """``updates`` agent updates on replay samples; metrics every ``log_every`` updates.
    Sampling has its own seeded generator and the global torch seed (target policy smoothing)
    is reset, so the same inputs give the same weights. Returns the seconds spent."""
    agent, replay = trainer.agent, trainer.replay
    generator = torch.Generator(device=replay.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 5)
    if trainer.device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed + 5)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=updates,
            unit="update",
            dynamic_ncols=True,
            mininterval=0.5,
            desc=f"retrain {cfg.env} {cfg.preset}",
        )
    t0 = t_log = time.perf_counter()
    done_log = 0
    try:
        for i in range(1, updates + 1):
            metrics = agent.update(trainer.sample(generator=generator))
            if i % cfg.log_every == 0 or i == updates:
                now = time.perf_counter()
                values = {k: float(v) for k, v in metrics.items()}
                values["updates_per_s"] = (i - done_log) / (now - t_log)
                values["updates"] = float(agent.updates)
                trainer.metrics.log("train", agent.updates, values)
                t_log, done_log = now, i
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return time.perf_counter() - t0


def _export(out: Path, log: Callable[[str], None]) -> dict[str, str | None]:
    """actor.onnx, parity-checked; a failed export is reported and the run stays intact."""
    from models.export import ExportError
    from training.export_cli import export_run

    try:
        return {"model": str(export_run(out, log=log))}
    except ExportError as e:
        log(f"export failed: {e}; the run is intact, retry with `ddpg export {out}`")
        return {"model": None, "export_error": str(e)}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _describe(report: dict[str, Any]) -> list[str]:
    """The offline metrics as a few printable lines."""
    loss = report["critic_loss"]
    lines = [
        f"critic loss on {loss['rows']} replay rows: {_fmt(loss['start'])} before, "
        f"{_fmt(loss['end'])} after {report['updates']} updates "
        f"({_fmt(report['updates_per_s'])} updates/s)"
    ]
    qr = report["q_vs_logged_returns"]
    if "skipped" in qr:
        return [*lines, f"Q vs logged returns: {qr['skipped']}"]
    for name in ("all", "terminated"):
        group = qr[name]
        if group is None:
            continue
        b, a = group["before"], group["after"]
        which = "whole episodes" if name == "all" else "terminated episodes"
        lines.append(
            f"Q vs logged returns ({which}, {group['rows']} rows; Q = {qr['q']}): "
            f"G {group['g_mean']:.4g}; before Q {_fmt(b['q_mean'])}, bias {_fmt(b['bias_mean'])}"
            f" ± {_fmt(b['bias_std'])}; after Q {_fmt(a['q_mean'])}, bias {_fmt(a['bias_mean'])}"
            f" ± {_fmt(a['bias_std'])}"
        )
    if qr["all"] is None:
        lines.append("Q vs logged returns: no episode is whole in the logs")
    return lines
