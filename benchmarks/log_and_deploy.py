"""What the transition log and a hot-swap deploy cost the control node, measured on this machine.

The node's promise is that logging every transition and swapping the model while it serves
leave the 1 kHz loop alone: ``TransitionLog.append`` is a deque append and the writer thread
does the rest; a deploy is loaded in a thread and swapped in between two ticks. This benchmark
puts numbers on both halves of each promise, all in one run, one scenario after the other:

1. **writer** (no sockets, in this process): a ``TransitionLog`` in a temp dir with the
   HalfCheetah-v5 spec (obs 17 float32, action 6 in [-1, 1]), default chunking (1 s, 50k rows)
   and fsync on. ``--transitions`` (300k) transitions of random data are built first (their
   construction is timed apart: the node builds one per step too), then appended as fast as one
   thread can and the log closed. Reported: the append loop's cost per append (mean, and the
   worst batch of 1,024: the writer holds the GIL in slices, so the hot path waits on it), the
   committed transitions/s over the whole (first append to ``close()`` returned), MB/s on disk
   (``bytes_committed`` / that wall time), chunks, and the CPU used: the whole process and,
   apart, everything but the appending thread (the writer thread with any Arrow threads) as a
   share of the wall time. A second row widens obs to 376 floats (Humanoid-v5's observation
   size; the action stays 6 wide), so only the obs width changes. This is the writer's sustained
   throughput, far above what a node asks of it (1 kHz x bridges).
2. **tick**: ``ddpg serve`` at ``--rate-hz`` (1000) with the HalfCheetah actor (``--model``) and
   one realtime HalfCheetah-v5 ``ddpg bridge`` at the same rate for ``--seconds`` (20), twice
   back to back with the same process layout: ``--log-dir none``, then logging on. From the
   node's final status (its all-time histograms, start-up included): tick work p50/p99,
   latency p50/p99, tick period std/p99, miss ratio, transitions logged, the log hand-off
   (Transition construction + append) p50/p99, and the on/off ratios. The miss ratio is also
   given over the window in which the bridge was connected (two admin status requests).
3. **deploy**: a node at 1000 Hz, then one at 100 Hz (``--deploy-rates``), each serving a
   realtime bridge at its rate with logging on (as a node serves by default). ``--deploys``
   (10) times, ``--deploy-interval-s`` (1) apart, an admin ``deploy`` request alternates
   between a second HalfCheetah actor exported at start into a temp dir (the first swap) and the
   shipped one. From the node's final ``deploys`` list: request -> swap and request -> first
   action (p50/max; the node's own clock), ``misses_during_load`` summed, and next to them the
   round trip of the admin request as this script saw it. Each deploy run follows a no-deploy
   run of the same length and layout, and the node's deadline misses (whole run, and the
   connected window) are compared between the two (ratio).

The 1-minute load average before and after every run is printed with it, so a busy machine
shows; the JSON (default benchmarks/results/log_and_deploy.json) holds every process's final
JSON, the derived numbers, load averages, the CPU model, the file system the logs went to and
the exact command line. Every child process is stopped on exit, Ctrl-C included. A smoke run
(about a minute on two cores):

    .venv/bin/python benchmarks/log_and_deploy.py --transitions 30000 --seconds 3 \\
        --deploys 3 --deploy-interval-s 0.5
    .venv/bin/python benchmarks/log_and_deploy.py   # 2 x 300k appends, 2 x 20 s, 4 x 13 s
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import Children, serve, with_children
from benchmarks._machine import cpu_model, write_result
from control_node.admin import AdminError, request
from control_node.config import BridgeConfig, NodeConfig
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "zoo" / "halfcheetah" / "actor.onnx"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "log_and_deploy.json"
ENV_ID = "HalfCheetah-v5"
OBS_DIM, ACT_DIM = 17, 6
SCENARIOS = ("writer", "tick", "deploy")
POOL_BYTES = 64 * 2**20
"""Distinct random observation rows kept for the writer scenario (rows repeat beyond this)."""
BATCH = 1024
"""Appends per timed batch in the writer scenario."""
DEPLOY_LEAD_S = 1.0
"""Connected bridge, then this long before the first deploy."""
DEPLOY_TAIL_S = 2.0
"""After the last scheduled deploy, the bridge runs this much longer (its first action)."""


# -- small helpers ------------------------------------------------------------------------------
def filesystem_of(path: Path) -> dict[str, str]:
    """The mount (device, mount point, type) holding ``path``: fsync on tmpfs costs nothing."""
    best = {"device": "?", "mount": "/", "type": "?"}
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, kind = line.split()[:3]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best["mount"]):
                best = {"device": dev, "mount": mount, "type": kind}
    except (OSError, ValueError):
        pass
    return best


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# -- a served run -------------------------------------------------------------------------------
def served(
    children: Children,
    name: str,
    model: Path,
    rate_hz: float,
    log_dir: Path | None,
    bridge_s: float,
    seed: int,
    during: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """A node and one realtime HalfCheetah bridge at ``rate_hz`` for ``bridge_s``, running
    ``during(admin)`` once the bridge is connected (see ``_harness.serve``); both final JSONs
    and the miss ratio over the window in which the bridge was connected."""
    node = NodeConfig(
        model=str(model), rate_hz=rate_hz, log_dir=None if log_dir is None else str(log_dir)
    )
    bridge = BridgeConfig(env=ENV_ID, id="sim0", mode="realtime", rate_hz=rate_hz, seed=seed)
    run = serve(children, name, node, [bridge], bridge_s, during)
    first, last = run.first, run.last
    ticks = last["ticks"] - first["ticks"]
    misses = last["deadline_misses"] - first["deadline_misses"]
    return {
        "node": run.node,
        "bridge": run.bridges[0],
        "during": run.during,
        "window": {
            "seconds": round(last["uptime_s"] - first["uptime_s"], 3),
            "wall_s": round(run.window_s, 3),
            "ticks": ticks,
            "deadline_misses": misses,
            "miss_ratio": misses / (ticks + misses) if ticks + misses else 0.0,
        },
        "node_stderr_tail": run.node_stderr_tail,
    }


def node_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """The numbers the tables are about, from one served run."""
    s, w, b = run["node"], run["window"], run["bridge"]
    work, lat, per, hand = (
        s["tick_work_us"],
        s["latency_us"],
        s["tick_period_us"],
        s["log_handoff_us"],
    )
    log = s.get("log") or {}
    return {
        "uptime_s": s["uptime_s"],
        "ticks": s["ticks"],
        "deadline_misses": s["deadline_misses"],
        "miss_ratio": s["miss_ratio"],
        "achieved_rate_hz": s["achieved_rate_hz"],
        "window_s": w["seconds"],
        "window_ticks": w["ticks"],
        "window_deadline_misses": w["deadline_misses"],
        "window_miss_ratio": w["miss_ratio"],
        "tick_work_p50_us": work["p50"],
        "tick_work_p99_us": work["p99"],
        "latency_p50_us": lat["p50"],
        "latency_p99_us": lat["p99"],
        "tick_period_std_us": per["std"],
        "tick_period_p99_us": per["p99"],
        "tick_period_max_us": per["max"],
        "log_handoff_p50_us": hand["p50"] if hand["n"] else None,
        "log_handoff_p99_us": hand["p99"] if hand["n"] else None,
        "log_handoff_n": hand["n"],
        "transitions_seen": s["transitions_seen"],
        "transitions_logged": s["transitions_logged"],
        "transitions_sent": b.get("transitions_sent"),
        "log_chunks": log.get("chunks", 0),
        "log_bytes": log.get("bytes", 0),
        "log_write_errors": log.get("write_errors", 0),
        "bridge_steps_per_s": b.get("steps_per_s"),
        "model_ids": s.get("model_ids"),
    }


# -- 1. the log writer --------------------------------------------------------------------------
def build_transitions(n: int, obs_size: int, seed: int) -> tuple[list[Transition], float]:
    """``n`` transitions as a node logs them: episodes of 1,000 steps, next_obs the next row's
    obs (views into a pool of random rows), random actions in [-1, 1] and rewards; and the
    seconds the loop that built them took (random data made beforehand)."""
    rng = np.random.default_rng(seed)
    pool = min(n + 1, max(BATCH, POOL_BYTES // (4 * obs_size)))
    obs = rng.standard_normal((pool, obs_size), dtype=np.float32)
    acts = rng.uniform(-1.0, 1.0, (min(n, 65536), ACT_DIM)).astype(np.float32)
    rewards = rng.standard_normal(n).tolist()
    session = os.urandom(8).hex()
    t0 = time.monotonic_ns()
    out: list[Transition] = []
    c0 = time.perf_counter()
    for i in range(n):
        step = i % 1000
        t_obs = t0 + i * 1_000_000
        out.append(
            Transition(
                bridge_id="sim0",
                bridge_session=session,
                episode=i // 1000,
                step=step,
                obs=obs[i % pool],
                action=acts[i % len(acts)],
                reward=rewards[i],
                next_obs=obs[(i + 1) % pool],
                terminated=False,
                truncated=step == 999,
                model_id="bench",
                safe_action=False,
                action_seq=i + 1,
                t_obs_ns=t_obs,
                t_action_ns=t_obs + 200_000,
                t_next_obs_ns=t_obs + 1_000_000,
            )
        )
    return out, time.perf_counter() - c0


def writer_bench(n: int, obs_size: int, root: Path, seed: int) -> dict[str, Any]:
    """Append ``n`` prebuilt transitions to a fresh log as fast as this thread can; close."""
    spec = LogSpec(ENV_ID, (obs_size,), "float32", (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM)
    rows, build_s = build_transitions(n, obs_size, seed)
    gc.collect()
    directory = root / f"writer_obs{obs_size}"
    log = TransitionLog(directory, spec)  # defaults: 1 s chunks, 50k rows, fsync on
    append = log.append
    batches: list[int] = []
    wall0, cpu0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
    for start in range(0, n, BATCH):
        b0 = time.perf_counter_ns()
        for t in rows[start : start + BATCH]:
            append(t)
        batches.append(time.perf_counter_ns() - b0)
    wall_append = time.perf_counter() - wall0
    main_append = time.thread_time() - main0
    ok = log.close()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    main_cpu = time.thread_time() - main0
    del rows
    sizes = [min(BATCH, n - s) for s in range(0, n, BATCH)]
    per_append = [ns / k for ns, k in zip(batches, sizes, strict=True)]
    chunks = sorted(directory.glob("chunk-*.parquet"))
    return {
        "obs_size": obs_size,
        "act_dim": ACT_DIM,
        "transitions": n,
        "build_ns_per_transition": round(build_s / n * 1e9, 1),
        "append_loop_s": round(wall_append, 4),
        "append_ns_mean": round(wall_append / n * 1e9, 1),
        "append_ns_p50_batch": round(float(np.median(per_append)), 1),
        "append_ns_worst_batch": round(max(per_append), 1),
        "appends_per_s": round(n / wall_append, 0),
        "wall_s": round(wall, 4),
        "close_s": round(wall - wall_append, 4),
        "committed": log.transitions_committed,
        "dropped": log.transitions_dropped,
        "write_errors": log.write_errors,
        "last_error": log.last_error,
        "close_ok": ok,
        "committed_per_s": round(log.transitions_committed / wall, 0),
        "bytes_committed": log.bytes_committed,
        "bytes_per_transition": round(log.bytes_committed / max(1, n), 1),
        "mb_per_s": round(log.bytes_committed / wall / 1e6, 2),
        "chunks": log.chunks_committed,
        "chunk_files": len(chunks),
        "process_cpu_s": round(cpu, 3),
        "appending_thread_cpu_s": round(main_cpu, 3),
        "appending_thread_cpu_in_loop_s": round(main_append, 3),
        "process_cpu_share": round(cpu / wall, 3),
        "writer_cpu_share": round((cpu - main_cpu) / wall, 3),
        "fsync": log.fsync,
        "chunk_seconds": log.chunk_seconds,
        "chunk_rows": log.chunk_rows,
        "pool_rows": min(n + 1, max(BATCH, POOL_BYTES // (4 * obs_size))),
    }


# -- 3. deploys ---------------------------------------------------------------------------------
def export_second_actor(directory: Path) -> Path:
    """A second HalfCheetah-v5 actor (untrained, seed 1) for the deploys to alternate with."""
    import torch

    from models.export import export_actor
    from models.networks import Actor

    torch.set_num_threads(1)
    torch.manual_seed(1)
    path = directory / "actor_b.onnx"
    actor = Actor(OBS_DIM, [-1.0] * ACT_DIM, [1.0] * ACT_DIM, (256, 256))
    export_actor(
        actor,
        path,
        env_id=ENV_ID,
        preset="td3",
        run_name="bench",
        train_steps=0,
        seed=1,
        eval_seed=10001,
    )
    return path


def deploy_schedule(
    paths: Sequence[Path], k: int, interval_s: float, lead_s: float
) -> Callable[[str], list[dict[str, Any]]]:
    """``k`` deploy requests, one every ``interval_s`` after ``lead_s``, alternating ``paths``;
    each waits for the node's answer (sent when the model is swapped in)."""

    def run(admin: str) -> list[dict[str, Any]]:
        t0 = time.monotonic() + lead_s
        out: list[dict[str, Any]] = []
        for i in range(k):
            delay = t0 + i * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path = paths[i % len(paths)]
            c0 = time.perf_counter()
            try:
                reply = request(admin, "deploy", 60.0, path=str(path), shadow=False)
                rec: dict[str, Any] = {"ok": True, "deploy": reply["deploy"]}
            except AdminError as e:
                rec = {"ok": False, "error": str(e)}
            rec.update(i=i, path=str(path), client_ms=round((time.perf_counter() - c0) * 1e3, 3))
            out.append(rec)
        return out

    return run


def deploy_metrics(run: dict[str, Any], asked: int) -> dict[str, Any]:
    deploys = [d for d in run["node"]["deploys"] if not d.get("rollback")]
    good = [d for d in deploys if d.get("ok")]
    swap = [d["request_to_swap_ms"] for d in good]
    first = [d["request_to_first_action_ms"] for d in good if "request_to_first_action_ms" in d]
    client = [d["client_ms"] for d in run["during"] if d["ok"]]
    return {
        "deploys_asked": asked,
        "deploys_ok": len(good),
        "deploys_refused": len(deploys) - len(good),
        "client_errors": [d["error"] for d in run["during"] if not d["ok"]],
        "request_to_swap_p50_ms": pct(swap, 50),
        "request_to_swap_max_ms": max(swap) if swap else None,
        "request_to_first_action_p50_ms": pct(first, 50),
        "request_to_first_action_max_ms": max(first) if first else None,
        "first_actions_seen": len(first),
        "client_round_trip_p50_ms": pct(client, 50),
        "client_round_trip_max_ms": max(client) if client else None,
        "misses_during_load_total": sum(d.get("misses_during_load", 0) for d in good),
        "model_ids": sorted({d["model_id"] for d in good}),
    }


# -- the scenarios ------------------------------------------------------------------------------
def timed(load: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` with the 1-minute load average recorded before and after it."""
    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
    before = os.getloadavg()
    out = fn()
    after = os.getloadavg()
    load[key] = {"before": before, "after": after}
    out["loadavg_1min"] = [before[0], after[0]]
    return out


def run_all(
    args: argparse.Namespace, children: Children, tmp: Path, second_actor: Path | None
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    load: dict[str, Any] = {}
    if "writer" in args.scenarios:
        rows = {}
        for obs_size in args.writer_obs:
            key = f"writer_obs{obs_size}"
            rows[str(obs_size)] = timed(
                load, key, lambda o=obs_size: writer_bench(args.transitions, o, tmp, args.seed)
            )
        metrics["writer"] = rows
    if "tick" in args.scenarios:
        runs = {}
        for mode in ("off", "on"):
            key = f"tick_log_{mode}"
            log_dir = tmp / key if mode == "on" else None

            def one(key: str = key, log_dir: Path | None = log_dir) -> dict[str, Any]:
                run = served(
                    children,
                    key,
                    args.model,
                    args.rate_hz,
                    log_dir,
                    args.seconds,
                    args.seed,
                )
                raw[key] = run
                return node_metrics(run)

            runs[mode] = timed(load, key, one)
        runs["ratio_on_off"] = {
            k: ratio(runs["on"][k], runs["off"][k])
            for k, v in runs["off"].items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        metrics["tick"] = runs
    if "deploy" in args.scenarios:
        assert second_actor is not None
        bridge_s = DEPLOY_LEAD_S + args.deploys * args.deploy_interval_s + DEPLOY_TAIL_S
        per_rate: dict[str, Any] = {}
        for rate in args.deploy_rates:
            pair: dict[str, Any] = {"rate_hz": rate, "bridge_seconds": bridge_s}
            for mode in ("none", "deploys"):
                key = f"deploy_{rate:g}hz_{mode}"
                during = None
                if mode == "deploys":
                    during = deploy_schedule(
                        [second_actor, args.model],
                        args.deploys,
                        args.deploy_interval_s,
                        DEPLOY_LEAD_S,
                    )

                def one(
                    key: str = key, during: Callable[[str], Any] | None = during, rate: float = rate
                ) -> dict[str, Any]:
                    run = served(
                        children, key, args.model, rate, tmp / key, bridge_s, args.seed, during
                    )
                    raw[key] = run
                    out = node_metrics(run)
                    if during is not None:
                        out.update(deploy_metrics(run, args.deploys))
                    return out

                pair[mode] = timed(load, key, one)
            base, dep = pair["none"], pair["deploys"]
            pair["ratio_deploys_none"] = {
                k: ratio(dep[k], base[k])
                for k in (
                    "deadline_misses",
                    "miss_ratio",
                    "window_deadline_misses",
                    "window_miss_ratio",
                    "tick_work_p99_us",
                    "tick_period_p99_us",
                    "latency_p99_us",
                )
            }
            per_rate[f"{rate:g}"] = pair
        metrics["deploy"] = per_rate
    return {"metrics": metrics, "raw": raw, "loadavg_per_run": load}


# -- report -------------------------------------------------------------------------------------
Row = tuple[str, list[str]]


def render(title: str, head: list[str], rows: list[Row], width: int = 14) -> list[str]:
    label_w = max(34, *(len(r[0]) + 1 for r in rows))
    top = f"{title:<{label_w}}" + "".join(f"{h:>{width}}" for h in head)
    lines = [top, "-" * len(top)]
    lines += [
        f"{label:<{label_w}}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows
    ]
    return [*lines, ""]


def load_cell(s: dict[str, Any]) -> str:
    return f"{s['loadavg_1min'][0]:.2f}/{s['loadavg_1min'][1]:.2f}"


def writer_table(w: dict[str, Any]) -> list[str]:
    keys = list(w)
    cols = [w[k] for k in keys]
    two = len(cols) == 2
    head = [f"obs {k}" for k in keys] + ([f"{keys[1]}/{keys[0]}"] if two else [])

    def row(label: str, key: str, spec: str, show_ratio: bool = True) -> Row:
        cells = [format(c[key], spec) for c in cols]
        if two:
            cells.append(fmt_ratio(ratio(cols[1][key], cols[0][key])) if show_ratio else "")
        return label, cells

    rows = [
        row("transitions appended", "transitions", "d", False),
        row("make a Transition ns (apart)", "build_ns_per_transition", ".0f"),
        row("append ns, mean", "append_ns_mean", ".0f"),
        row("append ns, worst 1024-batch", "append_ns_worst_batch", ".0f"),
        row("appends/s (append loop)", "appends_per_s", ",.0f"),
        row("committed/s (incl. close)", "committed_per_s", ",.0f"),
        row("MB/s on disk", "mb_per_s", ".1f"),
        row("bytes per transition", "bytes_per_transition", ".0f"),
        row("chunks", "chunks", "d"),
        (
            "wall s (of which close() s)",
            [f"{c['wall_s']:.2f} ({c['close_s']:.2f})" for c in cols]
            + ([fmt_ratio(ratio(cols[1]["wall_s"], cols[0]["wall_s"]))] if two else []),
        ),
        row("process CPU / wall", "process_cpu_share", ".2f"),
        row("writer (+arrow) CPU / wall", "writer_cpu_share", ".2f"),
        ("committed / dropped", [f"{c['committed']}/{c['dropped']}" for c in cols] + [""] * two),
        ("load 1 min before/after", [load_cell(c) for c in cols] + [""] * two),
    ]
    return render("1. log writer, no sockets", head, rows)


def tick_table(t: dict[str, Any], rate_hz: float) -> list[str]:
    off, on, r = t["off"], t["on"], t["ratio_on_off"]

    def row(label: str, key: str, spec: str = ".1f", show_ratio: bool = True) -> Row:
        cells = [fmt(off[key], spec), fmt(on[key], spec)]
        return label, [*cells, fmt_ratio(r.get(key)) if show_ratio else ""]

    def share(label: str, key: str) -> Row:
        return label, [f"{100 * off[key]:.3f}%", f"{100 * on[key]:.3f}%", fmt_ratio(r.get(key))]

    rows = [
        row("tick work p50 µs", "tick_work_p50_us"),
        row("tick work p99 µs", "tick_work_p99_us"),
        row("latency p50 µs", "latency_p50_us"),
        row("latency p99 µs", "latency_p99_us"),
        row("tick period std µs", "tick_period_std_us"),
        row("tick period p99 µs", "tick_period_p99_us"),
        row("tick period max µs", "tick_period_max_us"),
        share("miss ratio, whole run", "miss_ratio"),
        share("miss ratio, bridge connected", "window_miss_ratio"),
        (
            "misses / ticks, whole run",
            [*(f"{s['deadline_misses']}/{s['ticks']}" for s in (off, on)), ""],
        ),
        row("transitions seen", "transitions_seen", "d", False),
        row("transitions logged", "transitions_logged", "d", False),
        row("log hand-off p50 µs", "log_handoff_p50_us"),
        row("log hand-off p99 µs", "log_handoff_p99_us"),
        row("log chunks", "log_chunks", "d", False),
        ("load 1 min before/after", [load_cell(off), load_cell(on), ""]),
    ]
    title = f"2. node {rate_hz:g} Hz + 1 bridge"
    return render(title, ["log off", "log on", "on/off"], rows)


def deploy_table(d: dict[str, Any]) -> list[str]:
    rates = list(d)
    head: list[str] = []
    for rate in rates:
        head += [f"{rate} Hz none", f"{rate} Hz deploy", "ratio"]

    def cells(fn: Callable[[dict[str, Any], bool], str], key: str | None = None) -> list[str]:
        out: list[str] = []
        for rate in rates:
            p = d[rate]
            rat = fmt_ratio(p["ratio_deploys_none"].get(key)) if key else ""
            out += [fn(p["none"], False), fn(p["deploys"], True), rat]
        return out

    def dep(key: str, spec: str = ".1f") -> Callable[[dict[str, Any], bool], str]:
        return lambda s, is_dep: fmt(s.get(key), spec) if is_dep else ""

    def both(key: str, spec: str = "d") -> Callable[[dict[str, Any], bool], str]:
        return lambda s, _d: fmt(s.get(key), spec)

    rows: list[Row] = [
        (
            "deploys ok / asked",
            cells(lambda s, is_dep: f"{s['deploys_ok']}/{s['deploys_asked']}" if is_dep else ""),
        ),
        ("request -> swap p50 ms", cells(dep("request_to_swap_p50_ms"))),
        ("request -> swap max ms", cells(dep("request_to_swap_max_ms"))),
        ("request -> 1st action p50 ms", cells(dep("request_to_first_action_p50_ms"))),
        ("request -> 1st action max ms", cells(dep("request_to_first_action_max_ms"))),
        ("admin round trip p50 ms (client)", cells(dep("client_round_trip_p50_ms"))),
        ("misses during load, total", cells(dep("misses_during_load_total", "d"))),
        ("deadline misses, whole run", cells(both("deadline_misses"), "deadline_misses")),
        (
            "deadline misses, connected",
            cells(both("window_deadline_misses"), "window_deadline_misses"),
        ),
        ("ticks, whole run", cells(both("ticks"))),
        (
            "miss ratio, whole run",
            cells(lambda s, _d: f"{100 * s['miss_ratio']:.3f}%", "miss_ratio"),
        ),
        ("tick work p99 µs", cells(both("tick_work_p99_us", ".1f"), "tick_work_p99_us")),
        ("tick period p99 µs", cells(both("tick_period_p99_us", ".1f"), "tick_period_p99_us")),
        ("latency p99 µs", cells(both("latency_p99_us", ".1f"), "latency_p99_us")),
        ("load 1 min before/after", cells(lambda s, _d: load_cell(s))),
    ]
    return render("3. deploys (logging on)", head, rows, width=15)


def table(m: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    if "writer" in m:
        lines += writer_table(m["writer"])
    if "tick" in m:
        lines += tick_table(m["tick"], args.rate_hz)
    if "deploy" in m:
        lines += deploy_table(m["deploy"])
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------
def _csv(kind: type) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX actor (17 -> 6)")
    parser.add_argument(
        "--transitions", type=int, default=300_000, help="appends per writer row (300k)"
    )
    parser.add_argument(
        "--writer-obs",
        type=_csv(int),
        default=[OBS_DIM, 376],
        metavar="N,N",
        help="observation widths of the writer rows (default 17,376)",
    )
    parser.add_argument("--rate-hz", type=float, default=1000.0, help="tick scenario node rate")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="bridge duration of each tick run"
    )
    parser.add_argument("--deploys", type=int, default=10, help="deploys per deploy run")
    parser.add_argument(
        "--deploy-interval-s", type=float, default=1.0, help="time between deploy requests"
    )
    parser.add_argument(
        "--deploy-rates",
        type=_csv(float),
        default=[1000.0, 100.0],
        metavar="HZ,HZ",
        help="node (and bridge) rates of the deploy runs (default 1000,100)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="where the logs and temp files go (default: the system's temp dir)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)

    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    if args.transitions < 1 or args.deploys < 1 or not args.writer_obs or not args.deploy_rates:
        parser.error("--transitions, --deploys, --writer-obs and --deploy-rates must be > 0")
    args.model = args.model.resolve()
    short = args.transitions < 300_000 or args.seconds < 20 or args.deploys < 10
    if short:
        print(
            "note: shortened run (defaults: --transitions 300000 --seconds 20 --deploys 10); "
            "fine for a smoke test, not for numbers to quote",
            file=sys.stderr,
        )

    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    load_before = os.getloadavg()
    t0 = time.monotonic()

    def body(children: Children, tmp: Path) -> dict[str, Any]:
        fs = filesystem_of(tmp)
        second = None
        if "deploy" in args.scenarios:
            print("exporting the second actor ...", file=sys.stderr, flush=True)
            second = export_second_actor(tmp)
        return {**run_all(args, children, tmp, second), "log_filesystem": fs}

    results = with_children("log_and_deploy", body, args.tmp_dir)
    if isinstance(results, int):
        return results
    fs = results["log_filesystem"]
    load_after = os.getloadavg()

    import onnxruntime
    import pyarrow

    metrics = results["metrics"]
    result = {
        "what": "transition log writer, logging's cost to the tick, hot-swap deploy latency",
        "command": shlex.join(command),
        "argv": command,
        "cwd": os.getcwd(),
        "short_run": short,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": round(time.monotonic() - t0, 1),
        "metrics": metrics,
        "runs": results["raw"],
    }
    write_result(
        args.out,
        result,
        loadavg_before=load_before,
        loadavg_after=load_after,
        loadavg_per_run=results["loadavg_per_run"],
        log_filesystem=fs,
        pyarrow=pyarrow.__version__,
        onnxruntime=onnxruntime.__version__,
    )
    print(table(metrics, args))
    print(
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
        f"{os.cpu_count()} cores ({cpu_model()}); logs on {fs['type']} ({fs['mount']}); "
        f"{result['elapsed_s']:.0f} s{'; SHORT RUN' if short else ''}; JSON in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
