"""The online trainer: roll out in the environment, store transitions, update, evaluate, save.

The run directory holds everything needed to resume: ``config.yaml``, ``checkpoint.pt`` (and
``replay.pt`` when asked), ``train.csv``/``episodes.csv``/``eval.csv``, TensorBoard events, and at
the end ``eval.json`` and ``learning_curve.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from sim_bridge.envs import EnvError, env_spec, make_env
from training.agent import DDPGAgent
from training.config import ConfigError, TrainConfig, load_config, make_config, save_config
from training.evaluation import EvalResult, evaluate
from training.frame_replay import FrameReplay, ReplayMemoryError, check_fits, format_bytes
from training.metrics import MetricsWriter, finite_or_none, plot_learning_curve
from training.noise import make_noise
from training.replay import Batch, ReplayBuffer

CHECKPOINT_FORMAT = 1
EVAL_SEED_OFFSET = 10_000  # evaluation episodes never share seeds with training episodes


def make_train_env(cfg: TrainConfig) -> gym.Env:
    """The environment ``cfg`` trains and evaluates on: the state env, or its pixel pipeline
    (the same one the bridge serves through)."""
    spec = cfg.pixel_spec()
    if spec is None:
        return make_env(cfg.env)
    from sim_bridge.pixels import make_pixel_env

    return make_pixel_env(cfg.env, spec)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine")
    return device


def eval_seed(cfg: TrainConfig) -> int:
    return cfg.seed + EVAL_SEED_OFFSET


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's ``checkpoint.pt``, checked for this format; resume and ``ddpg retrain --init``
    both read it here, so they accept the same files."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read checkpoint: {reason}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: checkpoint format {found!r} is not {CHECKPOINT_FORMAT}")
    return state


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """One training run in ``cfg.run_dir()``; ``resume=True`` continues from its checkpoint."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        replay_frames: int | None = None,
    ) -> None:
        """``replay_frames``: a pixel replay's frame ring, when the default (capacity and an
        eighth) is not enough (``ddpg retrain`` fills it with runs of a few steps)."""
        self.run_dir = cfg.run_dir()
        self.progress = progress
        ckpt_path = self.run_dir / "checkpoint.pt"
        if not resume and ckpt_path.exists():
            raise ConfigError(
                f"run directory {self.run_dir} already holds a run; resume it with "
                f"--resume {self.run_dir} or choose another --out"
            )
        if resume and not ckpt_path.exists():
            raise ConfigError(f"cannot resume: {ckpt_path} does not exist")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.pixel_spec = cfg.pixel_spec()
        self.env = make_train_env(cfg)
        self.eval_env = make_train_env(cfg)
        self.spec = env_spec(cfg.env, self.env)
        if not cfg.pixels and len(self.spec.obs_shape) != 1:
            raise ConfigError(
                f"environment {cfg.env!r} has {self.spec.obs_shape}-shaped observations; "
                "the state trainer needs a flat vector"
            )
        self.replay = self._make_replay(replay_frames)
        self.agent = DDPGAgent(
            cfg, self.spec.obs_shape, self.spec.act_low, self.spec.act_high, self.device
        )
        self.noise = make_noise(
            cfg.noise, self.spec.act_dim, cfg.noise_sigma, cfg.noise_theta, cfg.seed + 1
        )
        self.rng = np.random.default_rng(cfg.seed + 2)  # uniform actions before learning starts
        self.step = 0
        self.env_steps = 0  # physics steps: step times action_repeat, less at episode ends
        self.episode = 0
        self.wall_s = 0.0  # training wall time over all sessions of this run
        self.last_eval: EvalResult | None = None
        self.stop_requested = False  # set from a signal handler; the loop ends after its step
        self._evaluated_at = -1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint(ckpt_path)
        save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir)

    def _make_replay(self, frames: int | None) -> ReplayBuffer | FrameReplay:
        """The replay buffer, its memory stated up front; refused when it cannot fit."""
        cfg, spec = self.cfg, self.spec
        capacity = min(cfg.buffer_size, cfg.steps)
        if self.pixel_spec is not None:
            frame_shape = self.pixel_spec.frame_shape
            args = (capacity, frame_shape, self.pixel_spec.stack)
            need = FrameReplay.memory_needed(*args, act_dim=spec.act_dim, frame_capacity=frames)
        else:
            need = ReplayBuffer.memory_needed(capacity, spec.obs_dim, spec.act_dim)
        try:
            check_fits(need, self.device)
        except ReplayMemoryError as e:
            raise ConfigError(f"buffer_size = {capacity}: {e}; lower --buffer-size") from None
        self.replay_bytes = need
        print(  # always, also without a progress bar: a user should know before it fills
            f"ddpg train: replay {capacity:,} transitions, {format_bytes(need)} on "
            f"{self.device} ({need / capacity:,.0f} bytes per transition)",
            file=sys.stderr,
        )
        if self.pixel_spec is not None:
            return FrameReplay(
                *args, act_dim=spec.act_dim, device=self.device, frame_capacity=frames
            )
        return ReplayBuffer(capacity, spec.obs_dim, spec.act_dim, self.device)

    def _begin_episode(self, info: dict[str, Any]) -> None:
        if isinstance(self.replay, FrameReplay):
            self.replay.start_episode(info["frame"])  # the stack is implicit: frames once

    def _store(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
        info: dict[str, Any],
    ) -> None:
        if isinstance(self.replay, FrameReplay):
            self.replay.add(action, reward, info["frame"], terminated, truncated)
        else:
            self.replay.add(obs, action, reward, next_obs, terminated, truncated)

    def _noise_sigma(self) -> float:
        """The exploration scale at this step: constant, or DrQ-v2's linear decay."""
        cfg = self.cfg
        if not cfg.noise_decay_steps:
            return cfg.noise_sigma
        frac = min(1.0, self.step / cfg.noise_decay_steps)
        return cfg.noise_sigma + frac * (cfg.noise_sigma_final - cfg.noise_sigma)

    def sample(
        self, batch_size: int | None = None, generator: torch.Generator | None = None
    ) -> Batch:
        """A learner's batch from the replay (n-step returns when the config asks)."""
        n = batch_size or self.cfg.batch_size
        if isinstance(self.replay, FrameReplay):
            return self.replay.sample(n, generator, n_step=self.cfg.n_step, gamma=self.cfg.gamma)
        return self.replay.sample(n, generator)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoint.pt"
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "agent": self.agent.state_dict(),
            "noise": self.noise.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "step": self.step,
            "env_steps": self.env_steps,
            "episode": self.episode,
            "wall_s": self.wall_s,
            "has_replay": self.cfg.save_replay,
        }
        if self.cfg.save_replay:
            _atomic_save(self.replay.state_dict(), self.run_dir / "replay.pt")
        _atomic_save(state, path)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, self.device)
        self.agent.load_state_dict(state["agent"])
        self.noise.load_state_dict(state["noise"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = int(state["step"])
        self.env_steps = int(state.get("env_steps", self.step))
        self.episode = int(state["episode"])
        self.wall_s = float(state["wall_s"])
        replay_path = self.run_dir / "replay.pt"
        if state["has_replay"] and replay_path.exists():
            self.replay.load_state_dict(
                torch.load(replay_path, map_location="cpu", weights_only=True)
            )

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        result = evaluate(
            self.agent.act, self.eval_env, self.cfg.eval_episodes, eval_seed(self.cfg)
        )
        self.metrics.log(
            "eval",
            self.step,
            {
                "return_mean": result.mean,
                "return_std": result.std,
                "length_mean": float(np.mean(result.lengths)),
                "env_steps": float(self.env_steps),  # physics steps (pixels: repeat each)
            },
        )
        self.last_eval = result
        self._evaluated_at = self.step
        return result

    # -- the loop -----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        """Finish the current step, checkpoint, and return (usable as a signal handler)."""
        self.stop_requested = True

    def run(self) -> dict[str, Any]:
        """Train up to ``cfg.steps``, then evaluate, checkpoint, and write eval.json and the PNG.
        After :meth:`request_stop` it checkpoints and returns ``{"interrupted": True, ...}``."""
        cfg, agent, env = self.cfg, self.agent, self.env
        low, high = self.spec.act_low, self.spec.act_high
        half_range = (high - low) / 2.0
        # A resumed run starts a fresh episode: the simulator state is not in the checkpoint.
        obs, info = env.reset(seed=cfg.seed + self.step)
        self._begin_episode(info)
        self.noise.reset()
        ep_return, ep_len = 0.0, 0
        nan = torch.tensor(float("nan"))
        metrics: dict[str, torch.Tensor] = {"critic_loss": nan, "actor_loss": nan, "q": nan}
        start_step, t0 = self.step, time.perf_counter()
        t_log, step_log = t0, self.step
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps and not self.stop_requested:
                if self.step < cfg.learning_starts:
                    action = self.rng.uniform(low, high).astype(np.float32)
                else:
                    self.noise.sigma = self._noise_sigma()
                    action = np.clip(agent.act(obs) + half_range * self.noise(), low, high)
                next_obs, reward, terminated, truncated, info = env.step(action)
                self._store(obs, action, float(reward), next_obs, terminated, truncated, info)
                ep_return += float(reward)
                ep_len += 1
                self.step += 1
                self.env_steps += int(info.get("repeats", 1))
                if terminated or truncated:
                    self.episode += 1
                    self.metrics.log("episodes", self.step, {"return": ep_return, "length": ep_len})
                    obs, info = env.reset()
                    self._begin_episode(info)
                    self.noise.reset()
                    ep_return, ep_len = 0.0, 0
                else:
                    obs = next_obs
                if self.step >= cfg.learning_starts and self.step % cfg.update_every == 0:
                    for _ in range(cfg.updates_per_step):
                        metrics = agent.update(self.sample())
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    values = {k: float(v) for k, v in metrics.items()}
                    values["steps_per_s"] = (self.step - step_log) / (now - t_log)
                    values["updates"] = float(agent.updates)
                    self.metrics.log("train", self.step, values)
                    t_log, step_log = now, self.step
                if cfg.eval_every and self.step % cfg.eval_every == 0 and cfg.eval_episodes:
                    self.evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    if self.step % 250 == 0 and self.last_eval is not None:
                        bar.set_postfix(eval=f"{self.last_eval.mean:.1f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        session_s = time.perf_counter() - t0
        self.wall_s += session_s
        if self.stop_requested:  # stopped between two steps: the checkpoint is consistent
            self.save_checkpoint()
            return {"interrupted": True, "steps": self.step, "run_dir": str(self.run_dir)}
        steps_per_s = (self.step - start_step) / session_s if session_s > 0 else float("nan")
        final = self.last_eval if self._evaluated_at == self.step else None
        if final is None and cfg.eval_episodes:
            final = self.evaluate()
        self.save_checkpoint()
        summary = {
            "env": cfg.env,
            "preset": cfg.preset,
            "seed": cfg.seed,
            "steps": self.step,
            "env_steps": self.env_steps,
            "pixels": self.pixel_spec.to_dict() if self.pixel_spec else None,
            "updates": agent.updates,
            "replay_bytes": self.replay_bytes,
            "episodes": cfg.eval_episodes,
            "eval_seed": eval_seed(cfg),
            "eval_return_mean": finite_or_none(final.mean) if final else None,
            "eval_return_std": finite_or_none(final.std) if final else None,
            "eval_returns": final.returns if final else [],
            "wall_s": round(self.wall_s, 3),
            "steps_per_s": round(steps_per_s, 2),
            "device": str(self.device),
            "run_dir": str(self.run_dir),
        }
        plot_learning_curve(self.run_dir, f"{cfg.env} · {cfg.preset} · seed {cfg.seed}")
        if cfg.export:
            summary.update(self._export())
        (self.run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _export(self) -> dict[str, str | None]:
        """Export actor.onnx; a failed export is reported, and the run stays intact."""
        from models.export import ExportError
        from training.export_cli import export_run

        try:
            return {"model": str(export_run(self.run_dir, log=self._log))}
        except (ExportError, ConfigError, EnvError) as e:
            print(
                f"ddpg train: export failed: {e}; the run is intact, retry with "
                f"`ddpg export {self.run_dir}`",
                file=sys.stderr,
            )
            return {"model": None, "export_error": str(e)}

    def _log(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr)

    def _progress_bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            desc=f"{self.cfg.env} {self.cfg.preset}",
            mininterval=0.5,
        )

    def close(self) -> None:
        """Release the environments and flush TensorBoard, also after an interrupted run."""
        self.metrics.close()
        self.env.close()
        self.eval_env.close()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training to ``cfg.steps``; returns the eval.json summary."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.close()


def resume_config(run_dir: Path, **overrides: Any) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. more ``steps``) applied."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"cannot resume: {path} does not exist")
    saved = load_config(path)
    values = {**saved.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    values["out"] = str(run_dir)
    preset = values.pop("preset")
    return make_config(preset, **values)
