"""Training throughput against the number of environments (``--num-envs N``), HalfCheetah-v5.

Each row is our trainer (``training.trainer.Trainer``, evaluation, export and progress off) with
N environments, stepped in this process (``sync``: gymnasium SyncVectorEnv) or in N worker
processes (``async``: AsyncVectorEnv), measured two ways in one run:

* ``rollout``: ``--rollout-steps`` steps of random actions and no updates (all before
  learning_starts): what stepping N environments, storing N transitions per iteration and the
  loop's bookkeeping cost per environment step;
* ``train``: ``--warmup`` random steps, then ``--steps`` steps with the preset's update-to-data
  ratio (td3: one update per environment step, so N updates per iteration), timed from the
  first update to the end of the loop: what a user waits for.

The machine's floor in the same run: one plain ``gymnasium.make`` HalfCheetah-v5 stepped with
random actions and nothing else (no trainer, no replay), the most any one-process rollout can
reach. ``--repeats`` alternates the configurations so load from other processes spreads over
all of them; the median is reported, and ratios are against N=1 in the same run. Steps count
environment steps over all environments.

    .venv/bin/python benchmarks/num_envs.py [--envs 1,2,4,8] [--rollout-steps 20000]
        [--warmup 1000] [--steps 1000] [--repeats 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import write_result
from benchmarks._timed_trainer import trainer_rates
from sim_bridge.envs import make_env

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "num_envs.json"


def floor_rate(env_id: str, steps: int, seed: int) -> float:
    """Steps/s of one plain environment with random actions: the machine's own floor."""
    env = make_env(env_id)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(low, high).astype(np.float32))
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="1,2,4,8", help="comma-separated N")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--preset", default="td3")
    parser.add_argument("--rollout-steps", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=1000, help="random steps before updates")
    parser.add_argument("--steps", type=int, default=1000, help="timed updating steps")
    parser.add_argument("--no-async", action="store_true", help="sync vector envs only")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.envs.split(",") if n]
    configs = [(n, False) for n in ns]
    if not args.no_async:
        configs += [(n, True) for n in ns if n > 1]
    configs.sort()

    runs: dict[tuple[int, bool], dict[str, list[float]]] = {
        c: {"rollout": [], "rollout_cpu": [], "train": [], "train_cpu": []} for c in configs
    }
    floors: list[float] = []
    for _ in range(args.repeats):
        floors.append(floor_rate(args.env, args.rollout_steps, args.seed))
        for n, asynchronous in configs:
            for phase, warmup, steps in (
                ("rollout", 0, args.rollout_steps),
                ("train", args.warmup, args.steps),
            ):
                rates = trainer_rates(
                    args.preset, args.env, args.seed, warmup, steps,
                    num_envs=n, async_envs=asynchronous,
                )  # fmt: skip
                runs[(n, asynchronous)][phase].append(rates["steps_per_s"])
                runs[(n, asynchronous)][f"{phase}_cpu"].append(rates["steps_per_cpu_s"])

    floor = statistics.median(floors)
    base = {k: statistics.median(v) for k, v in runs[(ns[0], False)].items()}
    rows = []
    for n, asynchronous in configs:
        med = {k: statistics.median(v) for k, v in runs[(n, asynchronous)].items()}
        rows.append(
            {
                "num_envs": n,
                "vector": "async" if asynchronous else "sync",
                "rollout_steps_per_s": round(med["rollout"], 1),
                "rollout_vs_n1": round(med["rollout"] / base["rollout"], 2),
                "rollout_vs_floor": round(med["rollout"] / floor, 2),
                "rollout_steps_per_cpu_s": round(med["rollout_cpu"], 1),
                "train_steps_per_s": round(med["train"], 1),
                "train_vs_n1": round(med["train"] / base["train"], 2),
                "train_steps_per_cpu_s": round(med["train_cpu"], 1),
                "train_cpu_vs_n1": round(med["train_cpu"] / base["train_cpu"], 2),
                "runs": runs[(n, asynchronous)],
            }
        )
    result = {
        "benchmark": "num_envs",
        "env": args.env,
        "preset": args.preset,
        "rollout_steps": args.rollout_steps,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "floor_plain_env_steps_per_s": round(floor, 1),
        "rows": rows,
    }
    print(
        f"{args.env}, {args.preset}: steps/s against the number of environments "
        f"(median of {args.repeats}; floor: one plain env, random actions, {floor:,.0f} steps/s)"
    )
    print(
        f"{'N':>4} {'vector':>6} | {'rollout/s':>9} {'vs N=1':>6} {'vs floor':>8} "
        f"{'per CPU-s':>9} | {'train/s':>7} {'vs N=1':>6} {'per CPU-s':>9} {'vs N=1':>6}"
    )
    for r in rows:
        print(
            f"{r['num_envs']:>4} {r['vector']:>6} | {r['rollout_steps_per_s']:>9,.0f} "
            f"{r['rollout_vs_n1']:>6.2f} {r['rollout_vs_floor']:>8.2f} "
            f"{r['rollout_steps_per_cpu_s']:>9,.0f} | {r['train_steps_per_s']:>7,.1f} "
            f"{r['train_vs_n1']:>6.2f} {r['train_steps_per_cpu_s']:>9,.1f} "
            f"{r['train_cpu_vs_n1']:>6.2f}"
        )
    write_result(args.out, result, torch=torch.__version__)
    return result


if __name__ == "__main__":
    main()
