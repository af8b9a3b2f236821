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
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import write_result
from models.export import export_actor
from models.networks import Actor
from models.policy import OnnxPolicy, session_options

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

    # Floors for reading the numbers on a given CPU: onnxruntime's fixed cost per call (a
    # one-Add graph through the same tuned, IOBound path) and the bare matmuls in numpy.
    trivial = _trivial_policy()
    params = {k: v.detach().numpy().copy() for k, v in actor.state_dict().items()}
    scale = params["obs_norm.weight"] / np.sqrt(params["obs_norm.running_var"] + 1e-5)
    shift = params["obs_norm.bias"] - params["obs_norm.running_mean"] * scale
    w = [params[f"{k}.weight"].T.copy() for k in ("body.0", "body.2", "head")]
    b = [params[f"{k}.bias"] for k in ("body.0", "body.2", "head")]

    def numpy_mlp(obs: np.ndarray) -> np.ndarray:
        h = np.maximum((obs * scale + shift) @ w[0] + b[0], 0.0)
        h = np.maximum(h @ w[1] + b[1], 0.0)
        return np.tanh(h @ w[2] + b[2]) * params["action_scale"] + params["action_bias"]

    n = torch.get_num_threads()
    return {
        "onnxruntime default": (ort_default, n),
        "onnxruntime tuned": (tuned, n),
        f"torch eager ({n} thr)": (torch_eager, n),
        "torch eager (1 thr)": (torch_eager, 1),
        "floor: ort 1-op graph": (trivial, n),
        "floor: numpy matmuls": (numpy_mlp, n),
    }


def _trivial_policy() -> Fn:
    """A one-node (Add) graph run the way OnnxPolicy runs the actor: its per-call overhead."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["obs", "b"], ["action"])],
        "trivial",
        [onnx.helper.make_tensor_value_info("obs", onnx.TensorProto.FLOAT, ["batch", OBS_DIM])],
        [onnx.helper.make_tensor_value_info("action", onnx.TensorProto.FLOAT, ["batch", OBS_DIM])],
        [onnx.numpy_helper.from_array(np.zeros(OBS_DIM, np.float32), "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    x, y = np.zeros((1, OBS_DIM), np.float32), np.zeros((1, OBS_DIM), np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("obs", x)
    binding.bind_output("action", "cpu", 0, np.float32, y.shape, y.ctypes.data)

    def fn(obs: np.ndarray) -> np.ndarray:
        if obs.ndim == 2:
            return session.run(None, {"obs": obs})[0]
        x[0] = obs
        session.run_with_iobinding(binding)
        return y[0].copy()

    return fn


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
    }
    write_result(
        args.out,
        result,
        loadavg_before=load_before,
        loadavg_after=load_after,
        onnxruntime=ort.__version__,
        torch=torch.__version__,
        torch_default_threads=torch_threads,
    )
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
