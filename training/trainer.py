"""The online trainer: roll out in the environment, store transitions, update, evaluate, save.

The run directory holds everything needed to resume: ``config.yaml``, ``checkpoint.pt`` (and
``replay.pt`` when asked), ``train.csv``/``episodes.csv``/``eval.csv``, TensorBoard events, and at
the end ``eval.json`` and ``learning_curve.png``; :mod:`training.rundir` reads and writes its
config, checkpoint and export, :mod:`training.learner` builds the replay and the agent.

One loop for any number of environments: it steps ``num_envs`` of them as one vector env
(same-step autoreset, :func:`sim_bridge.envs.make_vector_env`) and handles rows. Per
environment, a transition that ends an episode stores the episode's own last observation
(``final_obs``) and its ``terminated``, so a time limit bootstraps and a termination does not;
the next action starts from the new episode's first observation. ``step`` counts environment
steps over all environments; the update, log, evaluation and checkpoint schedules count
multiples of their period passed, so with one environment they fire at the steps they always
have, and a run with one environment is the single-environment trainer it replaced, transition
for transition.
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
from training.replay import Batch, Transitions


class Trainer:
    """One training run in ``cfg.run_dir()``; ``resume=True`` continues from its checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.run_dir = cfg.run_dir()
        self.progress = progress
        rundir.check_new_or_resumed(self.run_dir, resume)
        self.cfg = cfg
        self.pixel_spec = cfg.pixel_spec()
        self.eval_env = rundir.make_run_env(cfg)  # first: it names a bad env id in one line
        self.spec = env_spec(cfg.env, self.eval_env)
        if not cfg.pixels and len(self.spec.obs_shape) != 1:
            raise ConfigError(
                f"environment {cfg.env!r} has {self.spec.obs_shape}-shaped observations; "
                "the state trainer needs a flat vector"
            )
        self.env = rundir.make_run_vector_env(cfg)
        learner = make_learner(cfg, self.spec)
        self.device, self.replay, self.agent = learner.device, learner.replay, learner.agent
        self.replay_bytes = learner.replay_bytes
        self.threads = learner.threads
        # the action noise, and the uniform actions before learning starts
        self.noise, self.rng = exploration(cfg, self.spec.act_dim)
        self.step = 0
        self.env_steps = 0  # physics steps: step times action_repeat, less at episode ends
        self.episode = 0
        self.wall_s = 0.0  # training wall time over all sessions of this run
        self.last_eval: EvalResult | None = None
        self.stop_requested = False  # set from a signal handler; the loop ends after its step
        self.stopped_at_return = False  # an evaluation reached cfg.stop_at_return
        self._evaluated_at = -1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()
        rundir.write_config(self.run_dir, cfg)
        self.metrics = MetricsWriter(self.run_dir)

    def _begin_episode(self, info: dict[str, Any]) -> None:
        """A new episode in environment 0 (pixels have one): the reset frame starts its stack."""
        if isinstance(self.replay, FrameReplay):
            self.replay.start_episode(info["frame"][0])  # the stack is implicit: frames once

    def _store(self, rows: Transitions, info: dict[str, Any]) -> None:
        """Rows of transitions (one per environment kept) into the replay."""
        if isinstance(self.replay, FrameReplay):  # one environment
            ended = bool(rows.terminated[0] or rows.truncated[0])
            frame = _step_info(info, "frame", 0, ended)
            self.replay.add(
                rows.action[0], float(rows.reward[0]), frame, rows.terminated[0], rows.truncated[0]
            )
        else:
            self.replay.extend(rows)
        if self.agent.normalizer is not None:  # the statistics of what the replay holds
            self.agent.normalizer.update(rows.obs)

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
        n_envs, act_dim = cfg.num_envs, self.spec.act_dim
        low, high = self.spec.act_low, self.spec.act_high
        half_range = (high - low) / 2.0
        # A resumed run starts fresh episodes: the simulator state is not in the checkpoint.
        obs, info = env.reset(seed=cfg.seed + self.step)
        self._begin_episode(info)
        self.noise.reset()
        ep_return, ep_len = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
        nan = torch.tensor(float("nan"))
        metrics: dict[str, torch.Tensor] = {"critic_loss": nan, "actor_loss": nan, "q": nan}
        start_step, t0 = self.step, time.perf_counter()
        t_log, step_log = t0, self.step
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps and not self.stop_requested:
                if self.step < cfg.learning_starts:
                    action = self.rng.uniform(low, high, (n_envs, act_dim)).astype(np.float32)
                else:
                    self.noise.sigma = self._noise_sigma()
                    action = np.clip(agent.act(obs) + half_range * self.noise(), low, high)
                next_obs, reward, terminated, truncated, info = env.step(action)
                done = terminated | truncated
                last_obs = _last_observations(next_obs, info, done)
                # The last iteration keeps only the steps still wanted.
                keep = min(n_envs, cfg.steps - self.step)
                rows = slice(0, keep)
                self._store(
                    Transitions(
                        obs[rows], action[rows], reward[rows], last_obs[rows],
                        terminated[rows], truncated[rows],
                    ),
                    info,
                )  # fmt: skip
                before = self.step
                ep_return += reward
                ep_len += 1
                for i in range(keep):
                    self.env_steps += int(_step_info(info, "repeats", i, bool(done[i]), 1))
                    if done[i]:
                        self.episode += 1
                        row = {"return": float(ep_return[i]), "length": int(ep_len[i])}
                        self.metrics.log("episodes", before + i + 1, row)
                self.step += keep
                if done.any():
                    self.noise.reset(done)
                    ep_return[done], ep_len[done] = 0.0, 0
                    if done[0]:
                        self._begin_episode(info)
                obs = next_obs  # after an episode's end: the next one's first observation
                for _ in range(self._updates_due(before) * cfg.updates_per_step):
                    metrics = agent.update(self.sample())
                if _passed(before, self.step, cfg.log_every):
                    self.threads.check()
                    now = time.perf_counter()
                    values = {k: float(v) for k, v in metrics.items()}
                    values["steps_per_s"] = (self.step - step_log) / (now - t_log)
                    values["updates"] = float(agent.updates)
                    self.metrics.log("train", self.step, values)
                    t_log, step_log = now, self.step
                if _passed(before, self.step, cfg.eval_every) and cfg.eval_episodes:
                    self.stopped_at_return = self.evaluate().mean >= cfg.stop_at_return
                if _passed(before, self.step, cfg.checkpoint_every):
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(keep)
                    if _passed(before, self.step, 250) and self.last_eval is not None:
                        bar.set_postfix(eval=f"{self.last_eval.mean:.1f}", refresh=False)
                if self.stopped_at_return:
                    assert self.last_eval is not None
                    self._log(
                        f"ddpg train: evaluation at step {self.step:,} returned "
                        f"{self.last_eval.mean:.1f} >= stop_at_return {cfg.stop_at_return:g}; "
                        "stopping"
                    )
                    break
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
            "stopped_at_return": self.stopped_at_return,
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

    def _updates_due(self, before: int) -> int:
        """Update times passed since step ``before``: the multiples of ``update_every`` in
        ``(before, step]`` from ``learning_starts`` on (one environment: one at each such step,
        as it always was; N environments: N steps' worth per iteration)."""
        every = self.cfg.update_every
        first = max(before, self.cfg.learning_starts - 1)
        return max(0, self.step // every - first // every)

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


def _passed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]`` (never, with ``every`` 0):
    a schedule that fires at every multiple also when a step advances by N."""
    return every > 0 and after // every > before // every


def _last_observations(obs: np.ndarray, info: dict[str, Any], done: np.ndarray) -> np.ndarray:
    """Each environment's observation after its step: the vector env's own, or where the step
    ended an episode (and the env already reset), the ended episode's last one."""
    if not done.any():
        return obs
    last = obs.copy()
    for i in np.flatnonzero(info["_final_obs"]):
        last[i] = info["final_obs"][i]
    return last


def _step_info(info: dict[str, Any], key: str, i: int, done: bool, default: Any = None) -> Any:
    """Environment ``i``'s ``info[key]`` from its step; where the step ended an episode that is
    in ``final_info`` (``info`` itself then holds the new episode's reset info)."""
    source = info["final_info"] if done else info
    if key not in source or not source[f"_{key}"][i]:
        if default is None:
            raise KeyError(f"environment {i} returned no {key!r} in its step info")
        return default
    return source[key][i]
