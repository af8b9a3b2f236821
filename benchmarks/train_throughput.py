"""Training throughput: environment steps per second with one gradient update per step.

Our trainer (``training.trainer.Trainer``, evaluation and progress off) and Stable-Baselines3
(DDPG for the ``paper`` preset, TD3 for ``td3``) run on the same environment with the same
network widths, batch size and update schedule (``train_freq=1``, ``gradient_steps=1``), side by
side in one process, so both see the same torch build, thread count and machine load. Only the
updating phase is timed: each system first collects ``--warmup`` steps of random actions, then
``--steps`` steps with one update each are timed. ``--repeats`` alternates the systems so load
from other processes on a shared machine spreads over all of them; the median is reported.

SB3 is not a dependency of the project: ``pip install -e .[bench]``.

    .venv/bin/python benchmarks/train_throughput.py [--steps 3000] [--warmup 1000]
        [--presets paper,td3] [--repeats 1] [--threads 1,default] [--out PATH]

Rows: each side at its own default (ours: threads auto, training/threads.py; SB3: torch's own
count), then like for like at each ``--threads`` count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import write_result
from benchmarks._timed_trainer import Clock, trainer_rates
from training.config import make_config

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_throughput.json"
SB3_ALGO = {"paper": "DDPG", "td3": "TD3"}
KEYS = ("steps_per_s", "steps_per_cpu_s")
TORCH_DEFAULT_THREADS = torch.get_num_threads()
"""torch's own count, read before anything sets it: what SB3 runs with by default."""


def ours(
    env: str,
    preset: str,
    warmup: int,
    steps: int,
    seed: int,
    threads: int | None,
    fast_update: bool = True,
) -> dict[str, float]:
    """Our trainer's rates over the ``steps`` updating steps that follow ``warmup`` random ones;
    ``threads`` None: our default (auto, training/threads.py); ``fast_update=False``: with
    autograd's backward passes instead of the hand-written ones.

    Timed as ``benchmarks._timed_trainer.trainer_rates`` times it: from the first update to
    the end of the loop.
    """
    return trainer_rates(
        preset, env, seed, warmup, steps, fast_update=fast_update, threads=threads or 0
    )


def sb3(
    env_id: str, preset: str, warmup: int, steps: int, seed: int, threads: int | None
) -> dict[str, float]:
    """SB3's DDPG/TD3 rates at the preset's widths, batch, noise and policy delay; ``threads``
    None: SB3's default, torch's own thread count (one per core, or OMP_NUM_THREADS)."""
    torch.set_num_threads(threads or TORCH_DEFAULT_THREADS)
    try:
        import stable_baselines3 as sb
        from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
    except ImportError:
        sys.exit("stable-baselines3 is missing: pip install -e .[bench]")
    import gymnasium as gym

    cfg = make_config(preset)
    env = gym.make(env_id)
    act_dim = env.action_space.shape[0]
    half_range = (env.action_space.high - env.action_space.low) / 2.0
    noise_cls = OrnsteinUhlenbeckActionNoise if cfg.noise == "ou" else NormalActionNoise
    kwargs: dict[str, Any] = {
        "learning_starts": warmup,
        "train_freq": 1,
        "gradient_steps": 1,
        "batch_size": cfg.batch_size,
        "buffer_size": warmup + steps,
        "gamma": cfg.gamma,
        "tau": cfg.tau,
        "action_noise": noise_cls(np.zeros(act_dim), cfg.noise_sigma * half_range),
        "policy_kwargs": {"net_arch": list(cfg.actor_hidden)},
        "device": "cpu",
        "seed": seed,
        "verbose": 0,
    }
    if preset == "td3":
        kwargs |= {
            "policy_delay": cfg.policy_delay,
            "target_policy_noise": cfg.policy_noise,
            "target_noise_clip": cfg.noise_clip,
        }
    model = getattr(sb, SB3_ALGO[preset])("MlpPolicy", env, **kwargs)
    model.learn(total_timesteps=warmup)
    clock = Clock()
    clock.start()
    model.learn(total_timesteps=steps, reset_num_timesteps=False)
    clock.stop()
    env.close()
    return clock.rates(steps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="timed updating steps")
    parser.add_argument("--warmup", type=int, default=1000, help="random steps before updates")
    parser.add_argument("--presets", default="paper,td3", help="comma-separated presets")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per system")
    parser.add_argument(
        "--threads",
        default="1,default",
        help="like-for-like thread counts besides each side's default (comma-separated; "
        f"'default': torch's own count, {TORCH_DEFAULT_THREADS} here)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    counts = [TORCH_DEFAULT_THREADS if t == "default" else int(t) for t in args.threads.split(",")]
    # (row, system, function, threads): None is each side's own default; pairs share a setting
    Fn = Callable[..., dict[str, float]]
    systems: list[tuple[str, str, Fn, int | None]] = [
        ("default", "ours", ours, None),
        ("default", "sb3", sb3, None),
    ]
    for n in dict.fromkeys(counts):
        systems += [(f"{n} thread(s)", "ours", ours, n), (f"{n} thread(s)", "sb3", sb3, n)]
    systems.append(
        (f"{counts[0]} thread(s)", "ours autograd", partial(ours, fast_update=False), counts[0])
    )

    rows: list[dict[str, Any]] = []
    for preset in presets:
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for setting, name, fn, threads in systems:
                r = fn(args.env, preset, args.warmup, args.steps, args.seed, threads)
                r["threads"] = torch.get_num_threads()
                runs.setdefault((setting, name), []).append(r)
                print(
                    f"  {preset:6} {setting:12} {name:13} {r['threads']} thr "
                    f"{r['steps_per_s']:8.1f} steps/s {r['steps_per_cpu_s']:8.1f} steps/cpu-s",
                    flush=True,
                )
        for (setting, name), values in runs.items():
            base_runs = runs[(setting, "sb3")]
            row: dict[str, Any] = {
                "setting": setting,
                "system": f"sb3 {SB3_ALGO[preset]}" if name == "sb3" else name,
                "preset": preset,
                "threads": [r["threads"] for r in values],
            }
            for k in KEYS:
                rate = statistics.median(r[k] for r in values)
                row[k] = round(rate, 1)
                row[f"{k}_runs"] = [round(r[k], 1) for r in values]
                row[f"{k}_vs_sb3"] = round(rate / statistics.median(r[k] for r in base_runs), 2)
            rows.append(row)

    print(
        f"\n{'setting':12} {'system':13} {'preset':7} {'threads':>7} {'steps/s':>9} {'vs SB3':>7} "
        f"{'steps/cpu-s':>12} {'vs SB3':>7}"
    )
    for r in rows:
        print(
            f"{r['setting']:12} {r['system']:13} {r['preset']:7} "
            f"{'/'.join(str(t) for t in sorted(set(r['threads']))):>7} {r['steps_per_s']:9.1f} "
            f"{r['steps_per_s_vs_sb3']:6.2f}x {r['steps_per_cpu_s']:12.1f} "
            f"{r['steps_per_cpu_s_vs_sb3']:6.2f}x"
        )
    result = {
        "benchmark": "train_throughput",
        "env": args.env,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "updates_per_step": 1,
        "results": rows,
    }
    try:
        import stable_baselines3

        sb3_version: str | None = stable_baselines3.__version__
    except ImportError:
        sb3_version = None
    write_result(
        args.out,
        result,
        torch=torch.__version__,
        torch_default_threads=TORCH_DEFAULT_THREADS,
        stable_baselines3=sb3_version,
    )
    return result


if __name__ == "__main__":
    main()
