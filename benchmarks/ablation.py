"""Ablation of the modern preset: which published technique pays for itself here.

Each variant is a preset with some switches changed (``VARIANTS``); each trains on one task
and seed in its own run directory, resumable like ``benchmarks/learning.py`` (an interrupted
ablation picks up where its runs stopped). Reported per variant: the evaluation return at each
milestone and the mean of the last three evaluations up to it (one evaluation of 10 episodes
moves by hundreds on HalfCheetah), the wall time per 100k steps and the cost of one update.
Prints a table and writes JSON.

    python benchmarks/ablation.py --env HalfCheetah-v5 --seed 0 --steps 100000 \
        --variants crossq crossq+simba crossq+distributional crossq+n-step crossq-obs-norm

Variants run one after the other; on a machine with cores to spare, start several processes
with disjoint ``--variants`` (each run uses one torch thread) and report them together with
``--report-only``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import write_result
from benchmarks.learning import at_step, run_one, wall_per_100k
from training.metrics import read_csv

MODERN = "crossq"
SIMBA = {"simba": True, "actor_hidden": (128,), "critic_hidden": (128, 128)}
"""Simba's blocks (4x inner width) at about the plain networks' cost per layer: 128 wide."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "td3": ("td3", {}),
    "crossq": (MODERN, {}),  # the preset: CrossQ's critic and observation normalisation, 256-256
    "crossq+simba": (MODERN, SIMBA),
    "crossq+simba-wide": (MODERN, {**SIMBA, "critic_hidden": (256, 256)}),  # Simba's critic
    "crossq+distributional": (MODERN, {"distributional": True}),
    "crossq+n-step": (MODERN, {"n_step": 3}),
    "crossq-obs-norm": (MODERN, {"obs_norm": False}),
    "crossq+utd2-reset": (MODERN, {"updates_per_step": 2, "reset_every": 100_000}),
}
MILESTONES = (25_000, 50_000, 100_000, 300_000)


def last_mean(evals: list[dict[str, float]], step: int, n: int = 3) -> float | None:
    """Mean return of the last ``n`` evaluations up to ``step`` (None if the run has not
    reached it, or has fewer evaluations)."""
    if at_step(evals, step) is None:
        return None
    upto = [r["return_mean"] for r in evals if r["step"] <= step]
    return float(np.mean(upto[-n:])) if len(upto) >= n else None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", type=Path, default=Path("runs/ablation"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.json"))
    p.add_argument("--report-only", action="store_true", help="only read existing runs")
    args = p.parse_args()

    t0 = time.perf_counter()
    rows = []
    for name in args.variants:
        preset, overrides = VARIANTS[name]
        out = args.runs / f"{args.env}-{name}-s{args.seed}"
        if not args.report_only:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
            run_one(args.env, args.seed, args.steps, preset, args.runs, overrides, out.name)
        evals = read_csv(out / "eval.csv") if (out / "eval.csv").exists() else []
        rows.append(
            {
                "variant": name,
                "preset": preset,
                "overrides": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                },
                "steps_done": int(evals[-1]["step"]) if evals else 0,
                "return_at": {m: at_step(evals, m) for m in MILESTONES},
                "last3_mean_at": {m: last_mean(evals, m) for m in MILESTONES},
                "wall_s_per_100k": wall_per_100k(out),
            }
        )

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = "".join(f"{m // 1000:>7}k{'(3)':>6}" for m in MILESTONES)
    print(f"{args.env}, seed {args.seed}: return at each step (and mean of the last 3 evaluations)")
    print(f"{'variant':<24}{head}{'min/100k':>10}")
    for r in rows:
        cells = "".join(
            f"{f(r['return_at'][m]):>8}{f(r['last3_mean_at'][m]):>6}" for m in MILESTONES
        )
        wall = r["wall_s_per_100k"]
        print(f"{r['variant']:<24}{cells}{'-' if wall is None else f'{wall / 60:.1f}':>10}")
    write_result(
        args.out,
        {
            "env": args.env,
            "seed": args.seed,
            "steps": args.steps,
            "rows": rows,
            "wall_s": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
