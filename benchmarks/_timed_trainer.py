"""Our trainer timed from its first update to the end of its loop: the throughput benchmarks'
one way of measuring ``training.trainer.Trainer`` (train_throughput.py, num_envs.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from training.config import make_config
from training.replay import Batch
from training.trainer import Trainer


class Clock:
    """Wall and CPU time of the timed phase; steps per CPU-second is what a shared machine's
    load disturbs least, steps per wall-second is what the user waits for. Started once, by
    the first ``start``; ``stop`` after that ends it."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.running = False

    def start(self) -> None:
        if not self.running and not self.wall:
            self.wall, self.cpu, self.running = time.perf_counter(), time.process_time(), True

    def stop(self) -> None:
        if self.running:
            self.wall = time.perf_counter() - self.wall
            self.cpu = time.process_time() - self.cpu
            self.running = False

    def rates(self, steps: int) -> dict[str, float]:
        return {"steps_per_s": steps / self.wall, "steps_per_cpu_s": steps / self.cpu}


def trainer_rates(
    preset: str, env: str, seed: int, warmup: int, steps: int, **overrides: Any
) -> dict[str, float]:
    """Steps per wall-second and per CPU-second of this process over the ``steps`` that follow
    ``warmup`` random ones, with evaluation, periodic checkpoints and export off.

    The clock starts at the first update and stops at the final checkpoint, the first thing
    ``Trainer.run`` does after its loop. ``warmup`` 0 times a rollout instead: no update at all,
    the clock running from the loop's first step. ``overrides`` are config keys (threads,
    num_envs, ...). CPU time leaves out async environment workers' own."""
    with tempfile.TemporaryDirectory(prefix="timed_trainer_") as tmp:
        cfg = make_config(
            preset,
            env=env,
            seed=seed,
            out=tmp,
            device="cpu",
            steps=warmup + steps,
            learning_starts=warmup if warmup else steps + 1,
            eval_every=0,
            eval_episodes=0,
            checkpoint_every=0,
            log_every=warmup + steps,
            export=False,
            **overrides,
        )
        trainer = Trainer(cfg, progress=False)
        clock = Clock()
        first_step = 0
        update, save = trainer.agent.update, trainer.save_checkpoint

        def timed_update(batch: Batch) -> dict[str, torch.Tensor]:
            nonlocal first_step
            if not clock.running:
                first_step = trainer.step
            clock.start()
            return update(batch)

        def timed_save() -> Path:
            clock.stop()
            return save()

        trainer.agent.update = timed_update  # type: ignore[method-assign]
        trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
        try:
            if not warmup:
                clock.start()
            trainer.run()
        finally:
            trainer.close()
    return clock.rates(cfg.steps - first_step)
