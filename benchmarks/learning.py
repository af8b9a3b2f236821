"""Learning benchmark: evaluation return at 100k / 300k / 1M steps against published figures.

Trains each (env, seed) with ``ddpg train``'s trainer (each in its own run directory, resumable:
an interrupted benchmark picks up where its runs stopped), reads each run's ``eval.csv`` and
compares the mean over seeds at each milestone with the TD3 paper's curves
(``../shared/reference/td3_paper_learning_curves.csv``, Gym v1 tasks: compare orders of magnitude,
not decimals) and the published 1M-step figures. Prints a table and writes JSON.

    python benchmarks/learning.py --envs HalfCheetah-v5 --seeds 0 1 2 --steps 300000
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import PIXEL_ONLY_PRESETS, PRESETS, make_config
from training.metrics import read_csv
from training.rundir import resume_config
from training.trainer import train

MILESTONES = (100_000, 300_000, 1_000_000)
# Published figures at 1M steps (TD3 paper, Table 1): TD3 and the paper's re-tuned "Our DDPG".
PUBLISHED_1M = {
    "HalfCheetah": {"TD3": 9636.95, "Our DDPG": 8577.29},
    "Hopper": {"TD3": 3564.07, "Our DDPG": 1860.02},
    "Walker2d": {"TD3": 4682.82, "Our DDPG": 3098.11},
}
REFERENCE_CSV = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "td3_paper_learning_curves.csv"
)


def reference_curve(env: str) -> dict[int, float]:
    """TD3 paper mean return by step for the v1 task of the same name, if the file is there."""
    if not REFERENCE_CSV.exists():
        return {}
    name = env.split("-")[0] + "-v1"
    with REFERENCE_CSV.open() as f:
        return {
            int(r["step"]): float(r["eval_return_mean"])
            for r in csv.DictReader(f)
            if r["env"] == name
        }


def at_step(evals: list[dict[str, float]], step: int) -> float | None:
    """The evaluation at ``step`` (or the last one before it, within 5k steps)."""
    best = [r for r in evals if step - 5_000 < r["step"] <= step]
    return best[-1]["return_mean"] if best else None


def run_one(
    env: str,
    seed: int,
    steps: int,
    preset: str,
    root: Path,
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Train (or resume to ``steps``) ``preset`` with ``overrides`` in ``root / name`` (by
    default ``{env}-{preset}-s{seed}``); returns the run directory."""
    out = root / (name or f"{env}-{preset}-s{seed}")
    if (out / "checkpoint.pt").exists():
        done = (
            json.loads((out / "eval.json").read_text())["steps"]
            if (out / "eval.json").exists()
            else 0
        )
        if done < steps:
            train(resume_config(out, steps=steps), resume=True)
    else:
        cfg = make_config(
            preset,
            env=env,
            seed=seed,
            steps=steps,
            out=str(out),
            eval_every=5_000,
            checkpoint_every=10_000,
            save_replay=True,
            **(overrides or {}),
        )
        train(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1_000_000, help="steps per run (default 1M)")
    p.add_argument("--preset", default="td3", choices=sorted(set(PRESETS) - PIXEL_ONLY_PRESETS))
    p.add_argument("--runs", type=Path, default=Path("runs/learning"), help="where the runs live")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/learning.json"))
    p.add_argument("--report-only", action="store_true", help="only read existing runs")
    args = p.parse_args()

    t0 = time.perf_counter()
    rows = []
    for env in args.envs:
        per_seed: dict[int, list[dict[str, float]]] = {}
        for seed in args.seeds:
            out = args.runs / f"{env}-{args.preset}-s{seed}"
            if not args.report_only:
                out = run_one(env, seed, args.steps, args.preset, args.runs)
            per_seed[seed] = read_csv(out / "eval.csv")
        ref = reference_curve(env)
        for m in MILESTONES:
            values = [v for ev in per_seed.values() if (v := at_step(ev, m)) is not None]
            rows.append(
                {
                    "env": env,
                    "preset": args.preset,
                    "step": m,
                    "seeds": len(values),
                    "mean": float(np.mean(values)) if values else None,
                    "std": float(np.std(values)) if values else None,
                    "td3_paper_curve": ref.get(m),
                    "published_1m": PUBLISHED_1M.get(env.split("-")[0]) if m == 1_000_000 else None,
                }
            )

    print(
        f"{'env':<16}{'step':>9}{'seeds':>6}{'ours mean±std':>20}{'TD3 paper (v1)':>16}  published 1M"
    )
    for r in rows:
        ours = "-" if r["mean"] is None else f"{r['mean']:.0f} ± {r['std']:.0f}"
        ref = "-" if r["td3_paper_curve"] is None else f"{r['td3_paper_curve']:.0f}"
        pub = (
            ""
            if not r["published_1m"]
            else ", ".join(f"{k} {v:.0f}" for k, v in r["published_1m"].items())
        )
        print(f"{r['env']:<16}{r['step']:>9}{r['seeds']:>6}{ours:>20}{ref:>16}  {pub}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "steps": args.steps,
                "seeds": args.seeds,
                "preset": args.preset,
                "wall_s": time.perf_counter() - t0,
                "machine": platform.processor() or platform.machine(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
