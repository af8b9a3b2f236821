"""Single-observation latency and batch-64 throughput of the 400-300 HalfCheetah actor.

Three ways to run the same actor, measured side by side in one process: onnxruntime with default
session options, onnxruntime as :class:`models.policy.OnnxPolicy` serves it (one intra-op
thread, no spinning, IOBinding to preallocated buffers), and torch eager. The calls are split
into rounds that rotate through the backends, so load from other processes on a shared machine
spreads over all three instead of landing on one. Writes JSON (default
benchmarks/results/policy_latency.json) and prints a table.

    .venv/bin/python benchmarks/policy_latency.py [--calls 20000] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.export import export_actor
from models.networks import Actor
from models.policy import OnnxPolicy

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah-v5
Fn = Callable[[np.ndarray], np.ndarray]


def build_actor(seed: int) -> Actor:
    """The paper preset's HalfCheetah actor (400-300, batch-norm input) with fitted BN stats."""
    torch.manual_seed(seed)
    actor = Actor(OBS_DIM, [-1.0] * ACT_DIM, [1.0] * ACT_DIM, (400, 300), obs_norm=True)
    actor.train()
    with torch.no_grad():
        for _ in range(20):
            actor(torch.randn(256, OBS_DIM) * 3.0 + 0.5)
    return actor.eval()


def backends(actor: Actor, path: Path) -> dict[str, tuple[Fn, int]]:
    """name -> (one call, torch intra-op threads to set before its rounds)."""
    default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tuned = OnnxPolicy(path)

    def ort_default(obs: np.ndarray) -> np.ndarray:
        return default.run(None, {"obs": obs.reshape(1, -1) if obs.ndim == 1 else obs})[0]

    def torch_eager(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(obs)
            return actor(x.unsqueeze(0) if x.ndim == 1 else x).numpy()

    n = torch.get_num_threads()
    return {
        "onnxruntime default": (ort_default, n),
        "onnxruntime tuned": (tuned, n),
        f"torch eager ({n} thr)": (torch_eager, n),
        "torch eager (1 thr)": (torch_eager, 1),
    }


def latency(
    fns: dict[str, tuple[Fn, int]], obs: np.ndarray, calls: int, warmup: int, rounds: int
) -> dict:
    """Per-call wall time in µs; ``calls`` timed calls per backend, rotated in ``rounds``."""
    times: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for fn, threads in fns.values():
        torch.set_num_threads(threads)
        for i in range(warmup):
            fn(obs[i % len(obs)])
    per_round = calls // rounds
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = list(fns.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for name, (fn, threads) in order:
            torch.set_num_threads(threads)
            t = np.empty(per_round, dtype=np.int64)
            gc.disable()
            for i in range(per_round):
                o = obs[i % len(obs)]
                t0 = clock()
                fn(o)
                t[i] = clock() - t0
            gc.enable()
            times[name].append(t)
    out = {}
    for name, chunks in times.items():
        us = np.concatenate(chunks) / 1000.0
        out[name] = {
            "calls": int(us.size),
            "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)),
            "p99.9_us": float(np.percentile(us, 99.9)),
            "max_us": float(us.max()),
            "mean_us": float(us.mean()),
        }
    return out


def throughput(fns: dict[str, tuple[Fn, int]], obs: np.ndarray, batch: int, calls: int) -> dict:
    """Observations per second at batch size ``batch`` (median call time over ``calls``)."""
    out = {}
    x = np.ascontiguousarray(obs[:batch])
    for name, (fn, threads) in fns.items():
        torch.set_num_threads(threads)
        for _ in range(50):
            fn(x)
        t = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter_ns()
            fn(x)
            t[i] = time.perf_counter_ns() - t0
        med_us = float(np.median(t)) / 1000.0
        out[name] = {"batch": batch, "median_us": med_us, "obs_per_s": batch / med_us * 1e6}
    return out


def table(lat: dict, thr: dict) -> str:
    head = f"{'backend':<21}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}{'max µs':>10}"
    head += f"{'b64 µs':>10}{'b64 obs/s':>12}"
    lines = [head, "-" * len(head)]
    for name, s in lat.items():
        b = thr[name]
        lines.append(
            f"{name:<21}{s['p50_us']:>9.1f}{s['p99_us']:>9.1f}{s['p99.9_us']:>10.1f}"
            f"{s['max_us']:>10.0f}{b['median_us']:>10.1f}{b['obs_per_s']:>12,.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per backend")
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed calls per backend")
    parser.add_argument("--rounds", type=int, default=10, help="rotations through the backends")
    parser.add_argument("--batch", type=int, default=64, help="batch size for throughput")
    parser.add_argument(
        "--batch-calls", type=int, default=500, help="timed batch calls per backend"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "policy_latency.json",
    )
    args = parser.parse_args()
    if args.calls < 20_000:
        print(f"note: --calls {args.calls} is below the 20,000 the targets are judged on")

    actor = build_actor(args.seed)
    obs = np.random.default_rng(args.seed).standard_normal((1024, OBS_DIM)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "halfcheetah_400_300.onnx"
        report = export_actor(
            actor,
            path,
            env_id="HalfCheetah-v5",
            preset="paper",
            run_name="benchmark",
            train_steps=0,
            seed=args.seed,
            eval_seed=args.seed + 10_000,
        )
        torch_threads = torch.get_num_threads()
        fns = backends(actor, path)
        load_before = os.getloadavg()
        lat = latency(fns, obs, args.calls, args.warmup, args.rounds)
        thr = throughput(fns, obs, args.batch, args.batch_calls)
        load_after = os.getloadavg()

    tuned = lat["onnxruntime tuned"]
    eager = lat[f"torch eager ({torch_threads} thr)"]
    speedup = eager["p50_us"] / tuned["p50_us"]
    targets = {
        "tuned_p50_le_10us": tuned["p50_us"] <= 10.0,
        "tuned_p99_le_20us": tuned["p99_us"] <= 20.0,
        "tuned_3x_faster_than_torch_p50": speedup >= 3.0,
    }
    result = {
        "actor": "HalfCheetah-v5 paper preset: BatchNorm(17) -> 400 -> 300 -> 6, tanh, scaled",
        "model_id": report.model_id,
        "parity_max_abs_diff": report.max_abs_diff,
        "latency": lat,
        "throughput": thr,
        "speedup_p50_tuned_vs_torch": speedup,
        "targets": targets,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "torch_default_threads": torch_threads,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(lat, thr))
    print(
        f"tuned vs torch eager at p50: {speedup:.1f}x; targets "
        + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items())
    )
    print(
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
        f"{os.cpu_count()} cores; JSON in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
