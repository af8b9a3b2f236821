"""Retrain from logged transitions: ``ddpg retrain --logs DIR ... [--init RUN] --out RUN2``.

The control node logs every transition the robot lived (:mod:`control_node.translog`). This
module puts those logs into a replay buffer (after the init run's own saved replay, when it has
one; :mod:`training.logged_data`), runs DDPG updates on it, starting from the init run's
checkpoint or from fresh networks, and writes a run directory exactly like ``ddpg train`` does
(:mod:`training.rundir`), so ``ddpg train --resume``, ``ddpg export`` and another ``ddpg retrain
--init`` all accept it.

Loading the data is kept apart from learning: the updates are the trainer's own
(:meth:`DDPGAgent.update` on the replay :func:`~training.learner.sample` draws from), on the
agent and replay :func:`~training.learner.make_learner` builds for the robot the logs name.
There are no environment steps here, only updates; an environment is made only for the final
evaluation (and the export's observation bounds). :mod:`training.offline_metrics` measures the
critic before and after, because a retrained actor has not been run yet when it is written.

Observation normalisation (``obs_norm``) is fixed during a retrain: with ``init`` it is the init
run's statistics, carried on unchanged (and so through every round of continual mode); without
one it is fitted once to the logged observations before the first update. Not updated from the
logs as ``ddpg train`` updates it from its rollouts: the init weights were fitted to the init
run's standardisation, and moving it would change every input the networks see at once,
before any update, so the candidate would no longer start from the deployed actor it
fine-tunes (the offline metrics' "before" and the continual gate's comparison assume it does).
``ddpg train --resume`` of a retrain run updates them again from its own rollouts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from control_node.config import ConfigError
from control_node.translog.schema import LogSpec
from models.export import ExportError
from models.spec import RobotSpec
from training import rundir
from training.agent import DDPGAgent
from training.config import ENV_VIEW, TrainConfig, load_config, make_config
from training.evaluation import EvalResult, eval_metrics, evaluate
from training.learner import Learner, Replay, make_learner, sample
from training.logged_data import (
    LoggedTransitions,
    PixelLog,
    RetrainError,
    check_logs_fit,
    fill_replay,
    load_logs,
    state_replay_rows,
)
from training.metrics import MetricsWriter, finite_or_none
from training.noise import exploration
from training.offline_metrics import OfflineMetrics, describe
from training.replay import ReplayBuffer
from training.threads import ThreadPolicy

Loader = Callable[[Callable[[str], None]], LoggedTransitions | PixelLog]
"""Reads the training data, warnings to its argument (``load_logs`` of the log directories)."""

# Config keys the init checkpoint fixes: its weights only fit these, so changing one is refused.
FIXED_BY_INIT = (
    "env",
    "preset",
    "actor_hidden",
    "critic_hidden",
    "critic_action_layer",
    "batch_norm",
    "obs_norm",
    "final_init",
    "twin_q",
    "pixels",
    "pixel_size",
    "frame_stack",
    "action_repeat",
    "camera",
    "view",
    "conv_strides",
    "pixel_features",
    "shared_encoder",
)


@dataclass
class _Inputs:
    """What a retrain learns from, every refusal passed, nothing written yet."""

    cfg: TrainConfig
    data: LoggedTransitions | PixelLog
    robot: RobotSpec  # what the logs' robot observes and does: the networks are built for it
    init: Path | None
    state: dict[str, Any] | None  # the init run's checkpoint
    init_rows: dict[str, Any]  # the init run's saved replay, as the replay takes it
    t_read: float


def retrain(
    logs: Sequence[Path],
    out: Path,
    init: Path | None = None,
    updates: int = 5000,
    eval_episodes: int = 10,
    seed: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    load: Loader | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Retrain from the transitions logged in ``logs`` and write the run directory ``out``.

    ``load`` reads the data from another source than log directories (a Minari dataset:
    :func:`training.minari_data.load_minari`); ``logs`` then names that source in the report.

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
    if init is not None and (why := rundir.not_a_run_dir(init, (rundir.CHECKPOINT,))):
        raise RetrainError(f"--init {why}")

    # 1. Data, and every refusal, before the run directory exists.
    inputs = _read_inputs(logs, out, init, seed, eval_episodes, overrides, log, t_start, load)

    # 2. The run directory, networks and replay, for the robot the logs name.
    frames = None
    if isinstance(inputs.data, PixelLog):  # room for every frame: short runs cost a stack each
        saved_frames = len(inputs.init_rows.get("frames", []))
        frames = inputs.data.frames_needed + saved_frames + inputs.cfg.frame_stack + 1
    learner = make_learner(inputs.cfg, inputs.robot, frames)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, inputs.cfg)
    metrics = MetricsWriter(out)
    try:
        return _run(inputs, learner, metrics, logs, out, updates, progress, log, t_start)
    finally:
        metrics.close()


def _read_inputs(
    logs: list[Path],
    out: Path,
    init: Path | None,
    seed: int | None,
    eval_episodes: int,
    overrides: dict[str, Any],
    log: Callable[[str], None],
    t_start: float,
    load: Loader | None = None,
) -> _Inputs:
    """The logs, the config and the init run, each checked against the others."""

    def warn(line: str) -> None:
        log(f"warning: {line}")

    data = load_logs(logs, warn=warn) if load is None else load(warn)
    t_read = time.perf_counter() - t_start
    cfg = _config(init, data.spec, out, seed, eval_episodes, overrides)
    state = None
    if init is not None:
        path = init / rundir.CHECKPOINT
        state = rundir.read_checkpoint(path)
        robot = rundir.checkpoint_robot(cfg, state, path)
        check_logs_fit(data.spec, robot, f"the init run's env ({init})")
    n_log = data.kept if isinstance(data, PixelLog) else int(data.valid.sum())
    if n_log == 0:
        raise RetrainError(f"all {len(data)} logged transitions have non-finite values")
    init_rows: dict[str, Any] = {}
    if init is not None and state:
        saved = rundir.read_replay(init, state, warn)
        init_rows = saved if cfg.pixels else state_replay_rows(saved, init / rundir.REPLAY)
    n_init = int(init_rows["size"] if "size" in init_rows else len(init_rows.get("reward", [])))
    n_total = n_init + n_log
    steps = (int(state["step"]) if state else 0) + n_log
    # The buffer holds everything, and `ddpg train --resume` rebuilds one that fits it again.
    values = cfg.to_dict()
    values.update(steps=max(steps, n_total, 1), buffer_size=max(cfg.buffer_size, n_total))
    cfg = make_config(values.pop("preset"), **values)
    return _Inputs(cfg, data, data.spec.robot, init, state, init_rows, t_read)


def _run(
    inputs: _Inputs,
    learner: Learner,
    metrics: MetricsWriter,
    logs: list[Path],
    out: Path,
    updates: int,
    progress: bool,
    log: Callable[[str], None],
    t_start: float,
) -> dict[str, Any]:
    cfg, data, init = inputs.cfg, inputs.data, inputs.init
    agent, replay = learner.agent, learner.replay
    counters = rundir.Counters()
    if inputs.state is not None:
        assert init is not None
        counters = _continue_from(agent, inputs.state, init)
        log(f"init: {init} (step {counters.step}, {agent.updates} updates)")
    noise, rng = exploration(cfg, inputs.robot.act_dim)  # checkpointed fresh, as a new run's
    t0 = time.perf_counter()
    n_log, episode_ends = fill_replay(replay, data, inputs.init_rows)
    t_fill = time.perf_counter() - t0
    n_init = len(replay) - n_log
    if agent.normalizer is not None and inputs.state is None:
        # a fresh retrain: the statistics of the observations it learns from, then fixed
        agent.normalizer.update(replay_observations(replay))
    counters.step += n_log
    counters.episode += episode_ends
    log(
        f"logs: {len(data)} transitions from {data.chunks} chunk(s) of {data.spec.env_id}; "
        f"dropped {data.dropped} with non-finite values; replay {len(replay)} "
        f"({n_init} from the init run's replay, {n_log} from the logs)"
    )

    # 3. Offline metrics before, the updates, and the metrics after.
    offline = OfflineMetrics(agent, replay, data, cfg)
    update_s = _update(agent, replay, metrics, cfg, updates, progress, learner.threads)
    counters.wall_s += update_s
    rundir.save_checkpoint(out, cfg, agent, noise, rng, counters, replay)
    loss, q_report = offline.after()
    report = _report(inputs, logs, len(replay), n_init, updates, agent.updates)
    updates_per_s = updates / update_s if update_s > 0 else None
    report.update(
        updates_per_s=round(updates_per_s, 2) if updates_per_s else None,
        critic_loss=loss,
        q_vs_logged_returns=q_report,
        read_s=round(inputs.t_read, 3),
        fill_s=round(t_fill, 3),
        update_s=round(update_s, 3),
    )
    (out / "retrain.json").write_text(json.dumps(report, indent=2) + "\n")
    for line in describe(report):
        log(line)

    # 4. Evaluation, export, eval.json.
    final = _evaluate(agent, cfg, metrics, counters) if cfg.eval_episodes else None
    summary = _summary(cfg, counters, report, final, learner.device, out, n_log)
    summary.update(_export(out, log) if cfg.export else {"model": None})
    summary["retrain_wall_s"] = round(time.perf_counter() - t_start, 3)
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _report(
    inputs: _Inputs, logs: list[Path], replayed: int, n_init: int, updates: int, total: int
) -> dict[str, Any]:
    """retrain.json up to its measurements: what went into the replay, and how many updates."""
    cfg, data = inputs.cfg, inputs.data
    return {
        "logs": [str(d) for d in logs],
        "init": str(inputs.init) if inputs.init else None,
        "env": cfg.env,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "transitions": {
            "log_rows": len(data),
            "dropped_non_finite": data.dropped,
            "from_logs": replayed - n_init,
            "from_init_replay": n_init,
            "replay": replayed,
            "chunks": data.chunks,
            "leftovers_skipped": data.leftovers,
            "unreadable_skipped": data.unreadable,
        },
        "updates": updates,
        "updates_total": total,
        "batch_size": cfg.batch_size,
    }


def _continue_from(agent: DDPGAgent, state: dict[str, Any], init: Path) -> rundir.Counters:
    """The init run's networks, optimisers (at this config's learning rates) and counters."""
    try:
        rundir.restore_agent(agent, state, init / rundir.CHECKPOINT, config_rates=True)
    except ConfigError as e:
        raise RetrainError(str(e)) from None
    done = rundir.Counters.of(state)
    # A retrain takes no physics steps: its env_steps count starts at 0, as it always has.
    return rundir.Counters(step=done.step, episode=done.episode, wall_s=done.wall_s)


def _evaluate(
    agent: DDPGAgent, cfg: TrainConfig, metrics: MetricsWriter, counters: rundir.Counters
) -> EvalResult:
    """The trainer's deterministic evaluation, on a fresh environment of the run's config."""
    env = rundir.make_run_env(cfg)
    try:
        result = evaluate(agent.act, env, cfg.eval_episodes, rundir.eval_seed(cfg))
    finally:
        env.close()
    metrics.log("eval", counters.step, eval_metrics(result, counters.env_steps))
    return result


def _summary(
    cfg: TrainConfig,
    counters: rundir.Counters,
    report: dict[str, Any],
    final: EvalResult | None,
    device: torch.device,
    out: Path,
    n_log: int,
) -> dict[str, Any]:
    """eval.json: the trainer's keys, and what this retrain learnt from."""
    return {
        "env": cfg.env,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "steps": counters.step,
        "updates": report["updates"],
        "updates_total": report["updates_total"],
        "episodes": cfg.eval_episodes,
        "eval_seed": rundir.eval_seed(cfg),
        "eval_return_mean": finite_or_none(final.mean) if final else None,
        "eval_return_std": finite_or_none(final.std) if final else None,
        "eval_returns": final.returns if final else [],
        "wall_s": round(counters.wall_s, 3),
        "steps_per_s": None,  # no environment steps in a retrain
        "updates_per_s": report["updates_per_s"],
        "device": str(device),
        "run_dir": str(out),
        "source": "retrain",
        "logs": report["logs"],
        "transitions": n_log,
        "init": report["init"],
        "retrain_wall_s": None,
    }


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
                view=pixels.get("view") or ENV_VIEW,
            )
    else:
        path = init / rundir.CONFIG
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


def _update(
    agent: DDPGAgent,
    replay: Replay,
    metrics: MetricsWriter,
    cfg: TrainConfig,
    updates: int,
    progress: bool,
    threads: ThreadPolicy,
) -> float:
    """``updates`` agent updates on replay samples; metrics every ``log_every`` updates (and a
    look at the CPUs, ``threads.check``).
    Sampling has its own seeded generator and the global torch seed (target policy smoothing)
    is reset, so the same inputs give the same weights. Returns the seconds spent."""
    generator = torch.Generator(device=replay.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 5)
    if agent.device.type == "cuda":
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
            values = agent.update(sample(replay, cfg, generator=generator))
            if i % cfg.log_every == 0 or i == updates:
                threads.check()
                now = time.perf_counter()
                row = {k: float(v) for k, v in values.items()}
                row["updates_per_s"] = (i - done_log) / (now - t_log)
                row["updates"] = float(agent.updates)
                metrics.log("train", agent.updates, row)
                t_log, done_log = now, i
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return time.perf_counter() - t0


def _export(out: Path, log: Callable[[str], None]) -> dict[str, str | None]:
    """actor.onnx, parity-checked; a failed export is reported and the run stays intact."""
    try:
        return {"model": str(rundir.export_run(out, log=log))}
    except ExportError as e:
        log(f"export failed: {e}; the run is intact, retry with `ddpg export {out}`")
        return {"model": None, "export_error": str(e)}


def replay_observations(replay: Replay) -> np.ndarray:
    """The ``obs`` column of a state replay's filled rows, on the host."""
    assert isinstance(replay, ReplayBuffer), "observation normalisation is for state replays"
    return replay.data["obs"][: len(replay)].cpu().numpy()
