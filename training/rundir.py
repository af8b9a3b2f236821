"""A run directory: what ``ddpg train`` and ``ddpg retrain`` write, and what ``ddpg train
--resume``, ``ddpg retrain --init``, ``ddpg export`` and continual mode read back.

``config.yaml`` (the TrainConfig), ``checkpoint.pt`` (networks, targets, optimisers, noise,
random streams and counters), ``replay.pt`` (with ``save_replay``) and ``actor.onnx`` (the
parity-checked export) are written and read here only, so every command accepts the same
directories. The metrics files (``train.csv``, ``eval.csv``, TensorBoard) are
:mod:`training.metrics`'s.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from control_node.config import ConfigError
from models.export import PARITY_PROBES, ExportReport, export_actor
from models.networks import Actor, StandardizedActor
from models.pixel_networks import PixelActor
from models.spec import RobotSpec
from sim_bridge.envs import env_spec, make_env, make_vector_env
from sim_bridge.pixels import make_pixel_env
from training.agent import DDPGAgent, build_networks
from training.config import TrainConfig, load_config, make_config, save_config
from training.noise import GaussianNoise, OUNoise
from training.obs_norm import standardize_from_state

CONFIG, CHECKPOINT, REPLAY, ACTOR = "config.yaml", "checkpoint.pt", "replay.pt", "actor.onnx"
CHECKPOINT_FORMAT = 1
EVAL_SEED_OFFSET = 10_000  # evaluation episodes never share seeds with training episodes


def eval_seed(cfg: TrainConfig) -> int:
    return cfg.seed + EVAL_SEED_OFFSET


def make_run_env(cfg: TrainConfig) -> gym.Env:
    """The environment ``cfg`` trains and evaluates on: the state env, or its pixel pipeline
    (the same one the bridge serves through)."""
    spec = cfg.pixel_spec()
    if spec is None:
        return make_env(cfg.env)
    return make_pixel_env(cfg.env, spec)


def make_run_vector_env(cfg: TrainConfig) -> gym.vector.VectorEnv:
    """``cfg.num_envs`` copies of :func:`make_run_env`'s environment stepped as one (same-step
    autoreset: :func:`sim_bridge.envs.make_vector_env`), in worker processes with
    ``async_envs``."""
    spec = cfg.pixel_spec()
    make_one = (
        functools.partial(make_env, cfg.env)
        if spec is None
        else functools.partial(make_pixel_env, cfg.env, spec)
    )
    return make_vector_env(make_one, cfg.num_envs, cfg.async_envs)


def not_a_run_dir(run_dir: Path, names: tuple[str, ...] = (CONFIG, CHECKPOINT)) -> str | None:
    """Why ``run_dir`` is not a run directory (the first of ``names`` it lacks), or None."""
    for name in names:
        if not (run_dir / name).exists():
            return f"{run_dir} is not a run directory: {name} is missing"
    return None


# -- config.yaml ----------------------------------------------------------------------------------


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    save_config(cfg, run_dir / CONFIG)


def read_config(run_dir: Path) -> TrainConfig:
    """The run's saved config; ConfigError naming the file when it is missing or malformed."""
    why = not_a_run_dir(run_dir, (CONFIG,))
    if why:
        raise ConfigError(why)
    return load_config(run_dir / CONFIG)


def resume_config(run_dir: Path, **overrides: Any) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. more ``steps``) applied."""
    path = run_dir / CONFIG
    if not path.exists():
        raise ConfigError(f"cannot resume: {path} does not exist")
    saved = load_config(path)
    values = {**saved.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    values["out"] = str(run_dir)
    preset = values.pop("preset")
    return make_config(preset, **values)


def check_new_or_resumed(run_dir: Path, resume: bool) -> None:
    """A new run never overwrites one; a resumed run needs its checkpoint."""
    path = run_dir / CHECKPOINT
    if not resume and path.exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run; resume it with "
            f"--resume {run_dir} or choose another --out"
        )
    if resume and not path.exists():
        raise ConfigError(f"cannot resume: {path} does not exist")


# -- checkpoint.pt and replay.pt ------------------------------------------------------------------


@dataclass
class Counters:
    """A run's progress, kept in its checkpoint."""

    step: int = 0  # agent steps (a retrain adds its logged transitions)
    env_steps: int = 0  # physics steps: step times action_repeat, less at episode ends
    episode: int = 0
    wall_s: float = 0.0  # training wall time over all sessions of this run

    @classmethod
    def of(cls, state: dict[str, Any]) -> Counters:
        step = int(state["step"])
        return cls(
            step, int(state.get("env_steps", step)), int(state["episode"]), float(state["wall_s"])
        )


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    cfg: TrainConfig,
    agent: DDPGAgent,
    noise: GaussianNoise | OUNoise,
    rng: np.random.Generator,
    counters: Counters,
    replay: Any = None,
) -> Path:
    """Write ``checkpoint.pt`` (and, with ``cfg.save_replay``, ``replay.pt`` first), each by an
    atomic rename: a crash leaves the previous checkpoint whole. The global torch random state
    goes in too, so a resumed run draws what the uninterrupted one would have."""
    path = run_dir / CHECKPOINT
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "agent": agent.state_dict(),
        "noise": noise.state_dict(),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if agent.device.type == "cuda" else [],
        "step": counters.step,
        "env_steps": counters.env_steps,
        "episode": counters.episode,
        "wall_s": counters.wall_s,
        "has_replay": cfg.save_replay,
    }
    if cfg.save_replay:
        _atomic_save(replay.state_dict(), run_dir / REPLAY)
    _atomic_save(state, path)
    return path


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's ``checkpoint.pt``, checked for this format; resume, ``ddpg retrain --init`` and
    export all read it here, so they accept the same files."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read checkpoint: {reason}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: checkpoint format {found!r} is not {CHECKPOINT_FORMAT}")
    return state


def restore_agent(
    agent: DDPGAgent, state: dict[str, Any], path: Path, config_rates: bool = False
) -> None:
    """Networks, targets, optimiser state and update counter from a checkpoint ``state`` read
    from ``path``. With ``config_rates`` the agent's config then sets the optimisers' learning
    rates and weight decay (a retrain may override them; what config.yaml says is what runs)."""
    try:
        agent.load_state_dict(state["agent"])
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{path} does not fit its config: {e}") from None
    if config_rates:
        agent.use_config_rates()


def restore_streams(
    state: dict[str, Any],
    noise: GaussianNoise | OUNoise,
    rng: np.random.Generator,
    device: torch.device,
) -> None:
    """The exploration noise and the random streams, where the checkpointed run left them."""
    noise.load_state_dict(state["noise"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


def read_replay(
    run_dir: Path, state: dict[str, Any], warn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The run's ``replay.pt`` as saved (a ReplayBuffer's or, from pixels, a FrameReplay's state
    dict); empty if there is none or it is older than the checkpoint (which says it was saved
    without replay: ``warn`` hears of it)."""
    path = run_dir / REPLAY
    if not path.exists():
        return {}
    if not state.get("has_replay", True):
        if warn is not None:
            warn(f"{path} is older than the checkpoint (saved without replay); not merged")
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        int(saved["size"])
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read the saved replay: {reason}") from None
    return saved


def checkpoint_robot(cfg: TrainConfig, state: dict[str, Any], path: Path) -> RobotSpec:
    """The robot a run's networks were built for, from its config (env, pixels) and the actor
    weights in its checkpoint ``state`` (input width, action bounds): what logs are checked
    against, with no environment to ask."""
    pixels = cfg.pixel_spec()
    try:
        actor = state["agent"]["actor"]
        scale, bias = actor["action_scale"].cpu().numpy(), actor["action_bias"].cpu().numpy()
        # the state actor's first layer takes the observation
        obs_shape = pixels.obs_shape if pixels else (int(actor["body.0.weight"].shape[1]),)
    except KeyError as e:
        raise ConfigError(f"{path} does not fit its config: no actor weights {e}") from None
    low, high = bias - scale, bias + scale
    if pixels is not None:
        return RobotSpec(cfg.env, obs_shape, low, high, "uint8", pixels)
    return RobotSpec(cfg.env, obs_shape, low, high)


# -- actor.onnx -----------------------------------------------------------------------------------


def export_run(
    run_dir: Path,
    out: Path | None = None,
    probes: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Export the actor in ``run_dir/checkpoint.pt`` to ``out`` (default ``run_dir/actor.onnx``);
    logs one line with the model id and parity and returns the path. Raises ConfigError (not a
    run dir), EnvError, or ExportError (parity or checks failed; nothing written)."""
    report = export_run_report(run_dir, out, probes)
    if log is not None:
        log(describe_export(report))
    return report.path


def describe_export(report: ExportReport) -> str:
    return (
        f"exported {report.path} (model id {report.model_id}, {report.size_bytes} bytes); "
        f"parity max |onnx - torch| = {report.max_abs_diff:.2e} on {report.probes} probes "
        f"(bound {report.tolerance:.2e})"
    )


def export_run_report(
    run_dir: Path, out: Path | None = None, probes: int | None = None
) -> ExportReport:
    """:func:`export_run`, returning the export report."""
    run_dir = Path(run_dir)
    why = not_a_run_dir(run_dir)
    if why:
        raise ConfigError(why)
    cfg = load_config(run_dir / CONFIG)
    ckpt_path = run_dir / CHECKPOINT
    state = read_checkpoint(ckpt_path)
    env = make_env(cfg.env)  # the spaces only: a pixel run's frames need no rendering here
    try:
        spec = env_spec(cfg.env, env)
        space = env.observation_space
    finally:
        env.close()
    pixel_spec = cfg.pixel_spec()
    obs_shape = pixel_spec.obs_shape if pixel_spec is not None else spec.obs_shape
    actor, _ = build_networks(cfg, obs_shape, spec.act_low, spec.act_high)
    try:
        actor.load_state_dict(state["agent"]["actor"])
        policy: Actor | StandardizedActor | PixelActor = actor
        if cfg.obs_norm:  # the graph takes raw observations: the statistics go in front
            assert isinstance(actor, Actor)
            policy = StandardizedActor(actor, standardize_from_state(state["agent"]["obs_norm"]))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{ckpt_path}: actor weights do not fit the run's config: {e}") from None
    if pixel_spec is not None:
        bounds = {"obs_low": [0.0], "obs_high": [255.0], "pixels": json.dumps(pixel_spec.to_dict())}
    else:
        bounds = {"obs_low": space.low.reshape(-1), "obs_high": space.high.reshape(-1)}
    path = Path(out) if out is not None else run_dir / ACTOR
    return export_actor(
        policy,
        path,
        probes=probes or PARITY_PROBES,
        env_id=cfg.env,
        act_low=spec.act_low,
        act_high=spec.act_high,
        preset=cfg.preset,
        run_name=run_dir.resolve().name,
        train_steps=int(state["step"]),
        seed=cfg.seed,
        eval_seed=eval_seed(cfg),
        **bounds,
    )
