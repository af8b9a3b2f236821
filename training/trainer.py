"""The online trainer: roll out in the environment, store transitions, update, evaluate, save.

The run directory holds everything needed to resume: ``config.yaml``, ``checkpoint.pt`` (and
``replay.pt`` when asked), ``train.csv``/``episodes.csv``/``eval.csv``, TensorBoard events, and at
the end ``eval.json`` and ``learning_curve.png``; :mod:`training.rundir` reads and writes its
config, checkpoint and export, :mod:`training.learner` builds the replay and the agent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from control_node.config import ConfigError
from models.export import ExportError
from sim_bridge.envs import EnvError, env_spec
from training import rundir
from training.config import TrainConfig
from training.evaluation import EvalResult, eval_metrics, evaluate
from training.frame_replay import FrameReplay
from training.learner import make_learner, sample
from training.metrics import MetricsWriter, finite_or_none, plot_learning_curve
from training.noise import exploration
from training.replay import Batch


class Trainer:
    """One training run in ``cfg.run_dir()``; ``resume=True`` continues from its checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.run_dir = cfg.run_dir()
        self.progress = progress
        rundir.check_new_or_resumed(self.run_dir, resume)
        self.cfg = cfg
        self.pixel_spec = cfg.pixel_spec()
        self.env = rundir.make_run_env(cfg)
        self.eval_env = rundir.make_run_env(cfg)
        self.spec = env_spec(cfg.env, self.env)
        if not cfg.pixels and len(self.spec.obs_shape) != 1:
            raise ConfigError(
                f"environment {cfg.env!r} has {self.spec.obs_shape}-shaped observations; "
                "the state trainer needs a flat vector"
            )
        learner = make_learner(cfg, self.spec)
        self.device, self.replay, self.agent = learner.device, learner.replay, learner.agent
        self.replay_bytes = learner.replay_bytes
        # the action noise, and the uniform actions before learning starts
        self.noise, self.rng = exploration(cfg, self.spec.act_dim)
        self.step = 0
        self.env_steps = 0  # physics steps: step times action_repeat, less at episode ends
        self.episode = 0
        self.wall_s = 0.0  # training wall time over all sessions of this run
        self.last_eval: EvalResult | None = None
        self.stop_requested = False  # set from a signal handler; the loop ends after its step
        self._evaluated_at = -1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()
        rundir.write_config(self.run_dir, cfg)
        self.metrics = MetricsWriter(self.run_dir)

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
        return sample(self.replay, self.cfg, batch_size, generator)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        counters = rundir.Counters(self.step, self.env_steps, self.episode, self.wall_s)
        return rundir.save_checkpoint(
            self.run_dir, self.cfg, self.agent, self.noise, self.rng, counters, self.replay
        )

    def _load_checkpoint(self) -> None:
        path = self.run_dir / rundir.CHECKPOINT
        state = rundir.read_checkpoint(path, self.device)
        rundir.restore_agent(self.agent, state, path)
        rundir.restore_streams(state, self.noise, self.rng, self.device)
        counters = rundir.Counters.of(state)
        self.step, self.env_steps = counters.step, counters.env_steps
        self.episode, self.wall_s = counters.episode, counters.wall_s
        saved = rundir.read_replay(self.run_dir, state)
        if saved:
            self.replay.load_state_dict(saved)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        seed = rundir.eval_seed(self.cfg)
        result = evaluate(self.agent.act, self.eval_env, self.cfg.eval_episodes, seed)
        self.metrics.log("eval", self.step, eval_metrics(result, self.env_steps))
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
            "eval_seed": rundir.eval_seed(cfg),
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
        try:
            return {"model": str(rundir.export_run(self.run_dir, log=self._log))}
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
