"""Retrain throughput: how fast ``ddpg retrain`` reads a transition log and updates from it.

A log of ``--rows`` synthetic HalfCheetah-v5-shaped transitions (obs 17, action 6 in [-1, 1],
1,000-step episodes ending in a time limit) is written once with the control node's
``TransitionLog``. Then, timed separately:

- reading it (``read_logs`` and the conversion to arrays) and filling the replay buffer, in
  rows/s, and the discounted returns-to-go of every logged episode (the offline Q metric);
- ``retrain`` at each preset for ``--updates`` updates, fresh networks: only the update loop is
  timed (wall and CPU), not the offline metrics, the evaluation (skipped) or the export.

    .venv/bin/python benchmarks/retrain_throughput.py [--rows 20000] [--updates 2000]
        [--presets td3,paper] [--repeats 1] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.retrain as rt
from benchmarks._machine import write_result
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog
from training.logged_data import load_transitions
from training.offline_metrics import discounted_returns
from training.replay import ReplayBuffer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "retrain_throughput.json"
ENV = "HalfCheetah-v5"
OBS_DIM, ACT_DIM, EPISODE = 17, 6, 1000


def write_log(directory: Path, rows: int, seed: int) -> float:
    """``rows`` synthetic transitions in whole 1,000-step episodes; returns seconds to commit."""
    rng = np.random.default_rng(seed)
    spec = LogSpec(ENV, (OBS_DIM,), "float32", (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM)
    obs = rng.standard_normal((rows + 1, OBS_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, (rows, ACT_DIM)).astype(np.float32)
    rewards = rng.standard_normal(rows)
    t0 = time.perf_counter()
    with TransitionLog(directory, spec, chunk_rows=5000, fsync=False) as log:
        for i in range(rows):
            step = i % EPISODE
            log.append(
                Transition(
                    "bench",
                    "s0",
                    i // EPISODE,
                    step,
                    obs[i],
                    actions[i],
                    float(rewards[i]),
                    obs[i + 1],
                    False,
                    step == EPISODE - 1,
                    "m",
                    False,
                    i,
                    i,
                    i,
                    i,
                )
            )
        assert log.flush()
    return time.perf_counter() - t0


def read_and_fill(directory: Path) -> dict[str, float]:
    """Seconds to read the log into arrays, to fill a replay buffer, and for the returns."""
    t0 = time.perf_counter()
    data = load_transitions([directory])
    t1 = time.perf_counter()
    buffer = ReplayBuffer(len(data), OBS_DIM, ACT_DIM)
    buffer.add_batch(**data.replay_columns())
    t2 = time.perf_counter()
    returns = discounted_returns(data, 0.99)
    t3 = time.perf_counter()
    assert len(returns.rows) == len(data)
    n = len(data)
    return {
        "rows": n,
        "read_s": t1 - t0,
        "read_rows_per_s": n / (t1 - t0),
        "fill_s": t2 - t1,
        "fill_rows_per_s": n / (t2 - t1),
        "returns_s": t3 - t2,
        "returns_rows_per_s": n / (t3 - t2),
    }


def time_retrain(
    log_dir: Path, preset: str, updates: int, seed: int, threads: int
) -> dict[str, float]:
    """Updates per second (wall and CPU) of ``retrain``'s update loop alone."""
    timed: dict[str, float] = {}
    update = rt._update

    def timed_update(*args: Any, **kwargs: Any) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        seconds = update(*args, **kwargs)
        timed["wall"] = time.perf_counter() - wall
        timed["cpu"] = time.process_time() - cpu
        return seconds

    rt._update = timed_update  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory(prefix="retrain_throughput_") as tmp:
            summary = rt.retrain(
                [log_dir],
                Path(tmp) / "run",
                updates=updates,
                eval_episodes=0,
                seed=seed,
                log=lambda _: None,
                preset=preset,
                device="cpu",
                export=False,
                log_every=updates,
                threads=threads,
            )
            report = json.loads((Path(tmp) / "run" / "retrain.json").read_text())
    finally:
        rt._update = update  # type: ignore[assignment]
    assert summary["updates_total"] == updates
    return {
        "updates_per_s": updates / timed["wall"],
        "updates_per_cpu_s": updates / timed["cpu"],
        "retrain_read_s": report["read_s"],
        "retrain_fill_s": report["fill_s"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="logged transitions")
    parser.add_argument("--updates", type=int, default=2000, help="timed updates per preset")
    parser.add_argument("--presets", default="td3,paper", help="comma-separated presets")
    parser.add_argument("--repeats", type=int, default=1, help="runs per preset (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="retrain_log_") as tmp:
        log_dir = Path(tmp) / "log"
        write_s = write_log(log_dir, args.rows, args.seed)
        print(f"wrote {args.rows} transitions in {write_s:.2f} s", flush=True)
        read_and_fill(log_dir)  # warm-up: pyarrow's first read costs about 0.4 s more
        loading = [read_and_fill(log_dir) for _ in range(args.repeats)]
        load = {k: statistics.median(r[k] for r in loading) for k in loading[0]}
        print(
            f"read {load['read_rows_per_s']:,.0f} rows/s, fill {load['fill_rows_per_s']:,.0f} "
            f"rows/s, returns {load['returns_rows_per_s']:,.0f} rows/s",
            flush=True,
        )
        rows: list[dict[str, Any]] = []
        for preset in presets:
            runs = []
            for _ in range(args.repeats):
                r = time_retrain(log_dir, preset, args.updates, args.seed, args.threads)
                runs.append(r)
                print(
                    f"  {preset:6} {r['updates_per_s']:8.1f} updates/s "
                    f"{r['updates_per_cpu_s']:8.1f} updates/cpu-s",
                    flush=True,
                )
            row: dict[str, Any] = {"preset": preset}
            for k in ("updates_per_s", "updates_per_cpu_s"):
                row[k] = round(statistics.median(r[k] for r in runs), 1)
                row[f"{k}_runs"] = [round(r[k], 1) for r in runs]
            rows.append(row)

    print(f"\n{'phase':28} {'rate':>14}")
    print(f"{'log read (read_logs+arrays)':28} {load['read_rows_per_s']:>10,.0f} rows/s")
    print(f"{'replay fill (add_batch)':28} {load['fill_rows_per_s']:>10,.0f} rows/s")
    print(f"{'returns-to-go':28} {load['returns_rows_per_s']:>10,.0f} rows/s")
    for r in rows:
        print(
            f"{'updates, ' + r['preset']:28} {r['updates_per_s']:>10.1f} upd/s "
            f"({r['updates_per_cpu_s']:.1f} per CPU-s)"
        )
    result = {
        "benchmark": "retrain_throughput",
        "env_shape": ENV,
        "rows": args.rows,
        "updates": args.updates,
        "repeats": args.repeats,
        "log_write_s": round(write_s, 3),
        "load": {
            k: round(v, 4) if k.endswith("_s") and "_per_" not in k else round(v)
            for k, v in load.items()
        },
        "results": rows,
        "threads": args.threads,
    }
    write_result(args.out, result, torch=torch.__version__)
    return result


if __name__ == "__main__":
    main()
