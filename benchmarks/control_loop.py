"""The control loop end to end: ``ddpg serve`` and ``ddpg bridge`` as real processes over ZeroMQ.

The policy benchmark times the actor alone; this one times what a robot sees. Every scenario
runs its own fresh processes, one after the other, on this machine, with the HalfCheetah-v5 TD3
actor (``--model``) and MuJoCo HalfCheetah-v5 bridges:

0. **Clock floor**: what this machine's own clock allows, with no sockets and no work: a child
   process runs a bare absolute-deadline loop at ``--rate-hz`` for ``--seconds``
   (``next += period``, ``select`` with no file descriptors until the deadline, the node's
   timer slack, a passed deadline counted and skipped exactly as the node does). Miss ratio,
   tick lateness (tick start - deadline) and tick period, in the node's own histograms.
1. **1 kHz realtime**: the node at ``--rate-hz`` (1000) with transition logging on, one
   realtime bridge at the same rate for ``--seconds``. Achieved rate, deadline-miss ratio, tick
   lateness and period jitter, the share of observations answered fresh (by the first tick
   after they arrived), observation age when used, action delivery node -> bridge (both stamp
   CLOCK_MONOTONIC, shared by processes on one machine), node work per tick, transitions
   logged against those the bridge sent and the share logged on time.
2. **Lockstep round trip**: a node at ``--lockstep-node-rate-hz`` (100; lockstep answers go
   out as each observation arrives, not on ticks, so a faster tick only adds wake-ups) with
   logging on, one lockstep bridge (``--bridge-spin-us``: how long it busy-polls for each
   answer; default the bridge's own) for ``--lockstep-seconds``: observation sent -> its
   action received, in the bridge, and steps per second.
3. **Floor**: the same bytes over bare pyzmq between two processes (DEALER client, ROUTER
   server, TCP loopback as above): the client sends the frames a bridge sends for a HalfCheetah
   observation, the server answers with an action message's frames after batch-1 onnxruntime
   inference (``OnnxPolicy``); no validation, logging or clock. ``--round-trips`` timed in the
   client after ``--warmup-trips``.
4. **Naive baseline**: REQ/REP, one request per step, torch eager inference (1 thread) of the
   same MLP (weights read from the ONNX initializers), raw float32 bytes each way.
5. **Many bridges**: the node at ``--rate-hz`` with logging, ``--bridges`` (10) realtime bridges
   at ``--bridge-rate-hz`` (100) each for ``--seconds``.
6. **Flood**: scenario 1 while one hostile peer (``tests/flood_peer.py``: a valid realtime
   hello announcing 100 Hz, then consecutive valid observations as fast as one process sends
   them) floods the node from the moment the bridge is connected: the loop's misses, the well
   behaved bridge's freshness and delivery, and how much of the flood the node dropped.

Node-side counters are reported over a *window*: from the moment every bridge is connected (one
admin status request, taken once they all said they were connected) to the moment the first
bridge process exits (a second one), so bridge start-up (imports, MuJoCo) is not charged to the
steady loop; the whole run, start-up included, is kept next to it. Percentiles (tick lateness
and period, observation age, work) are the node's own all-time histograms (log buckets 1%
wide), so they cover its whole run. Targets are judged on the window: miss ratio <= 0.1% and
fresh >= 99% at 1 kHz and with many bridges (printed next to the bare clock loop's miss ratio:
what the machine itself allows); lockstep round trip p50 <= 1.5x the floor's p50; the naive
baseline's p99 >= 2x ours (the lockstep round trip's p99). The 1-minute load average before and
after each scenario is printed with it, so a noisy run shows.

Writes JSON (default benchmarks/results/control_loop.json: every process's final JSON, the
derived numbers, the targets, load average before and after, the CPU, the command line) and
prints a table. Every child process is stopped on exit, Ctrl-C included. A smoke run:

    .venv/bin/python benchmarks/control_loop.py --seconds 5 --lockstep-seconds 5 \\
        --round-trips 2000
    .venv/bin/python benchmarks/control_loop.py   # 60 s x 3 + 20 s + 2 x 20k trips
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (
    READY_TIMEOUT_S,
    BenchError,
    Children,
    result,
    serve,
    tail,
    with_children,
)
from benchmarks._machine import cpu_model, write_result
from control_node import protocol as P
from control_node import realtime
from control_node.admin import request
from control_node.config import BridgeConfig, NodeConfig, RealtimeConfig, free_tcp_endpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "zoo" / "halfcheetah" / "actor.onnx"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "control_loop.json"
ENV_ID = "HalfCheetah-v5"
SCENARIOS = (
    "clock", "clock_fifo", "realtime", "lockstep", "floor", "floor_placed", "naive", "bridges",
    "flood",
)  # fmt: skip
FLOOD_PEER = ROOT / "tests" / "flood_peer.py"
LOCKSTEP_RATE_NOTE = (
    "lockstep answers go out as each observation arrives, not on ticks: the node's tick rate "
    "only adds wake-ups in this scenario"
)


# -- served scenarios (node + bridges) --------------------------------------------------------
def served(
    children: Children,
    model: Path,
    rate_hz: float,
    bridges: list[BridgeConfig],
    seconds: float,
    log_root: Path,
    name: str,
    during: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """A node at ``rate_hz`` with logging on and ``bridges`` for ``seconds`` (see
    ``_harness.serve``, which runs ``during(admin)`` once they are connected); every final JSON
    and the counters over the window."""
    node = NodeConfig(model=str(model), rate_hz=rate_hz, log_dir=str(log_root / name))
    run = serve(children, name, node, bridges, seconds, during)
    return {
        "node": run.node,
        "bridges": run.bridges,
        "window": window(run.first, run.last, run.window_s, run.first_took_s),
        "node_stderr_tail": run.node_stderr_tail,
    }


def window(
    first: dict[str, Any], last: dict[str, Any], wall_s: float, status_s: float
) -> dict[str, Any]:
    """Counter deltas between two status snapshots (the steady period with every bridge)."""
    ticks = last["ticks"] - first["ticks"]
    misses = last["deadline_misses"] - first["deadline_misses"]
    before = {b["id"]: b for b in first["bridges"]}
    keys = ("observations", "fresh", "superseded", "transitions", "on_time")
    delta = dict.fromkeys(keys, 0)
    for b in last["bridges"]:
        a = before.get(b["id"], {})
        for k in keys:
            delta[k] += b[k] - a.get(k, 0)
    obs, fresh, superseded = delta["observations"], delta["fresh"], delta["superseded"]
    transitions, on_time = delta["transitions"], delta["on_time"]
    uptime = last["uptime_s"] - first["uptime_s"]
    return {
        "seconds": round(uptime, 3),
        "wall_s": round(wall_s, 3),
        "ticks": ticks,
        "deadline_misses": misses,
        "miss_ratio": misses / (ticks + misses) if ticks + misses else 0.0,
        "achieved_rate_hz": round(ticks / uptime, 2) if uptime > 0 else 0.0,
        "observations": obs,
        "fresh": fresh,
        "superseded": superseded,
        "fresh_ratio": fresh / obs if obs else 0.0,
        "transitions": transitions,
        "on_time": on_time,
        "on_time_ratio": on_time / transitions if transitions else 0.0,
        "first_status_request_s": round(status_s, 4),
    }


def bridge_config(bid: str, mode: str, rate_hz: float, seed: int) -> BridgeConfig:
    """A HalfCheetah bridge; a lockstep one keeps the default rate (it steps on each action)."""
    cfg = BridgeConfig(env=ENV_ID, id=bid, mode=mode, seed=seed)
    if mode == "realtime":
        cfg.rate_hz = rate_hz
    return cfg


def served_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report is about, from one served scenario's JSON."""
    node, win, bridges = run["node"], run["window"], run["bridges"]
    # counts: the window's (status deltas); percentiles: the node's all-time histograms
    period, age, work = node["tick_period_us"], node["obs_age_us"], node["tick_work_us"]
    late = node["tick_lateness_us"]
    delivery = [b["action_delivery_us"] for b in bridges]
    return {
        "achieved_rate_hz": win["achieved_rate_hz"],
        "achieved_rate_hz_whole": node["achieved_rate_hz"],
        "miss_ratio": win["miss_ratio"],
        "miss_ratio_whole": node["miss_ratio"],
        "deadline_misses": win["deadline_misses"],
        "ticks": win["ticks"],
        "tick_lateness_p50_us": late["p50"],
        "tick_lateness_p99_us": late["p99"],
        "tick_period_std_us": period["std"],
        "tick_period_p99_us": period["p99"],
        "tick_period_max_us": period["max"],
        "fresh_ratio": win["fresh_ratio"],
        "fresh_ratio_whole": node["fresh_ratio"],
        "obs_age_p50_us": age["p50"],
        "obs_age_p99_us": age["p99"],
        # one bridge: its own percentiles; several: the median p50 and the worst p99
        "delivery_p50_us": float(np.median([d["p50"] for d in delivery])),
        "delivery_p99_us": max(d["p99"] for d in delivery),
        "tick_work_p50_us": work["p50"],
        "tick_work_p99_us": work["p99"],
        # the share of transitions whose applied action answered their own observation
        "on_time_ratio": win["on_time_ratio"],
        "on_time_ratio_whole": node["on_time_ratio"],
        "model_ids": node["model_ids"],
        "transitions_logged": node["transitions_logged"],
        "transitions_sent": sum(b["transitions_sent"] for b in bridges),
        "bridge_steps_per_s": sum(b["steps_per_s"] for b in bridges),
        "bridge_deadline_misses": sum(b["deadline_misses"] for b in bridges),
        "bridge_safe_steps": sum(b["safe_steps"] for b in bridges),
        "stale_events": node["stale_events"],
        "rejected_messages": node["rejected_messages"],
    }


# -- clock floor (this script again, --role clock-loop) ----------------------------------------
def _timer_slack_ns() -> int | None:
    """This thread's timer slack (PR_GET_TIMERSLACK), to record that it was set."""
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(30, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def role_clock_loop(rate_hz: float, seconds: float, fifo: bool) -> dict[str, Any]:
    """The node's clock with nothing else: ``next += period``, ``select`` with no file
    descriptors until the deadline, the node's timer slack, and a passed deadline counted and
    skipped as ``ControlNode.run`` does. Lateness and period go into the node's histograms.
    ``fifo``: under SCHED_FIFO at the node's default priority, where permitted."""
    from control_node.node.stats import Samples

    policy = "SCHED_OTHER"
    if fifo:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RealtimeConfig().sched_priority))
            policy = f"SCHED_FIFO {os.sched_getparam(0).sched_priority}"
        except PermissionError:
            policy = "SCHED_OTHER (SCHED_FIFO not permitted)"
    P.set_timer_slack()
    period = round(1e9 / rate_hz)
    late, between = Samples(), Samples()
    ticks = misses = last = 0
    start = P.now_ns()
    end = start + round(seconds * 1e9)
    next_tick = start + period
    while True:
        remaining = next_tick - P.now_ns()
        while remaining > 0:
            select.select([], [], [], remaining / 1e9)
            remaining = next_tick - P.now_ns()
        t_tick = P.now_ns()
        late.add(t_tick - next_tick)
        if last:
            between.add(t_tick - last)
        last = t_tick
        ticks += 1
        next_tick += period
        now = P.now_ns()
        if now > next_tick:  # as the node: count the passed deadlines and skip them
            missed = (now - next_tick) // period + 1
            misses += missed
            next_tick += missed * period
        if now >= end:
            break
    uptime = (P.now_ns() - start) / 1e9
    return {
        "what": "bare absolute-deadline loop: select() sleeps, no sockets, no work",
        "policy": policy,
        "rate_hz": rate_hz,
        "uptime_s": round(uptime, 3),
        "ticks": ticks,
        "deadline_misses": misses,
        "miss_ratio": misses / (ticks + misses) if ticks + misses else 0.0,
        "achieved_rate_hz": round(ticks / uptime, 2) if uptime > 0 else 0.0,
        "timer_slack_ns": _timer_slack_ns(),
        "tick_lateness_us": late.summary_us(),
        "tick_period_us": between.summary_us(),
    }


def clock_floor(children: Children, args: argparse.Namespace, fifo: bool) -> dict[str, Any]:
    """The bare clock loop as its own process (as the node is); its JSON."""
    me = [sys.executable, str(Path(__file__).resolve())]
    child = children.start(
        "clock_loop_fifo" if fifo else "clock_loop",
        [
            *me,
            *(["--fifo"] if fifo else []),
            "--role",
            "clock-loop",
            "--rate-hz",
            f"{args.rate_hz:g}",
            "--seconds",
            f"{args.seconds:g}",
        ],
    )
    return result(child, args.seconds + READY_TIMEOUT_S)


def clock_metrics(run: dict[str, Any]) -> dict[str, Any]:
    late, period = run["tick_lateness_us"], run["tick_period_us"]
    return {
        "policy": run["policy"],
        "rate_hz": run["rate_hz"],
        "achieved_rate_hz": run["achieved_rate_hz"],
        "miss_ratio": run["miss_ratio"],
        "deadline_misses": run["deadline_misses"],
        "ticks": run["ticks"],
        "tick_lateness_p50_us": late["p50"],
        "tick_lateness_p99_us": late["p99"],
        "tick_lateness_max_us": late["max"],
        "tick_period_std_us": period["std"],
        "tick_period_p99_us": period["p99"],
        "tick_period_max_us": period["max"],
        "timer_slack_ns": run["timer_slack_ns"],
    }


# -- round-trip roles (this script again, with --role) -----------------------------------------
def _obs_messages(count: int, seed: int) -> list[list[bytes | memoryview]]:
    """The frames a bridge sends for HalfCheetah observations (step > 0: with the applied
    action), built by the protocol module once, before the clock starts."""
    rng = np.random.default_rng(seed)
    msgs = []
    for i in range(count):
        obs = rng.standard_normal(17).astype(np.float32)
        action = rng.uniform(-1, 1, 6).astype(np.float32)
        now = P.now_ns()
        fields = {
            "bridge_id": "sim0",
            "episode": 0,
            "step": i + 1,
            "reward": float(rng.normal()),
            "terminated": False,
            "truncated": False,
            "applied_seq": i,
            "applied_safe": False,
            "t_obs_ns": now,
            "t_send_ns": now,
        }
        msgs.append([bytes(f) for f in P.encode(P.OBS, fields, {"obs": obs, "action": action})])
    return msgs


def place(role: str) -> None:
    """Give this round-trip process the CPU, scheduling and memory locking that ``ddpg launch``
    gives the node (``role`` ``node``: the server) or a bridge (the client) by default, as the
    placed floor does: the like-for-like floor of the lockstep round trip, whose node and bridge
    run on separate CPUs at SCHED_FIFO. Called once the process's ZeroMQ context exists."""
    node, bridge = NodeConfig(model="").realtime, BridgeConfig().realtime
    realtime.assign_cpus(node, [bridge], os.sched_getaffinity(0))
    realtime.apply(
        node if role == "node" else bridge, role, lambda line: print(line, file=sys.stderr)
    )


def _serve_until_idle(sock: zmq.Socket, handle: Callable[[], None], idle_s: float = 60.0) -> None:
    """Answer until no request has come for ``idle_s`` (or SIGTERM): an orphaned server ends."""
    print("ready", file=sys.stderr, flush=True)
    while sock.poll(round(idle_s * 1000)):
        handle()


def role_floor_server(endpoint: str, model: Path, placed: bool) -> None:
    from models.policy import OnnxPolicy

    policy = OnnxPolicy(model)
    now = P.now_ns()
    fields = {
        "seq": 1,
        "episode": 0,
        "step": 1,
        "model_id": policy.model_id,
        "safe": False,
        "t_obs_ns": now,
        "t_recv_ns": now,
        "t_send_ns": now,
    }
    # an action message's header, built once (the floor has no clock to stamp); the action
    # frame is each inference's result
    header = bytes(P.encode(P.ACTION, fields, {"action": np.zeros(6, np.float32)})[0])
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    if placed:
        place("node")

    def handle() -> None:
        identity, _header, obs, *_ = sock.recv_multipart()
        action = policy(np.frombuffer(obs, dtype=np.float32))
        sock.send_multipart([identity, header, action])

    _serve_until_idle(sock, handle)


def torch_actor(model: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The actor as a torch eager MLP (17 -> 256 -> 256 -> 6, ReLU, tanh, scale and bias) with
    the ONNX file's weights; checked against onnxruntime on a few observations."""
    import onnx
    import onnx.numpy_helper
    import torch

    torch.set_num_threads(1)
    w = {
        t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
        for t in onnx.load(str(model)).graph.initializer
    }
    layers = [torch.nn.Linear(*reversed(w[f"{k}.weight"].shape)) for k in ("body.0", "body.2")]
    head = torch.nn.Linear(*reversed(w["head.weight"].shape))
    mlp = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), head)
    with torch.no_grad():
        for lin, k in zip([*layers, head], ("body.0", "body.2", "head"), strict=True):
            lin.weight.copy_(w[f"{k}.weight"])
            lin.bias.copy_(w[f"{k}.bias"])
    mlp.eval()
    scale, bias = w["action_scale"], w["action_bias"]

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(obs).unsqueeze(0)
            return (torch.tanh(mlp(x)) * scale + bias)[0].numpy()

    from models.policy import OnnxPolicy

    ref = OnnxPolicy(model)
    probe = np.random.default_rng(1).standard_normal((16, 17)).astype(np.float32)
    diff = max(float(np.abs(act(o) - ref(o)).max()) for o in probe)
    if diff > 1e-4:
        raise BenchError(f"torch MLP differs from the ONNX actor by {diff:.2e}")
    return act


def role_naive_server(endpoint: str, model: Path) -> None:
    act = torch_actor(model)
    sock = zmq.Context().socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)

    def handle() -> None:
        obs = np.frombuffer(sock.recv(), dtype=np.float32).copy()
        sock.send(act(obs).tobytes())

    _serve_until_idle(sock, handle)


def role_client(
    kind: str, endpoint: str, trips: int, warmup: int, seed: int, placed: bool
) -> dict[str, Any]:
    """``trips`` timed round trips after ``warmup`` untimed ones; percentiles in µs."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER if kind == "floor" else zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    if placed:
        place("bridge")
    if kind == "floor":
        msgs: list[Any] = _obs_messages(256, seed)

        def trip(i: int) -> None:
            sock.send_multipart(msgs[i & 255])
            sock.recv_multipart()
    else:
        rng = np.random.default_rng(seed)
        msgs = [rng.standard_normal(17).astype(np.float32).tobytes() for _ in range(256)]

        def trip(i: int) -> None:
            sock.send(msgs[i & 255])
            sock.recv()

    # the first answer waits for the server to load its model
    if kind == "floor":
        sock.send_multipart(msgs[0])
    else:
        sock.send(msgs[0])
    if not sock.poll(round(READY_TIMEOUT_S * 1000)):
        raise BenchError(f"{kind} server at {endpoint} did not answer in {READY_TIMEOUT_S:.0f} s")
    sock.recv_multipart()
    for i in range(warmup):
        trip(i)
    times = np.empty(trips, dtype=np.int64)
    clock = time.perf_counter_ns
    gc.disable()
    t_start = clock()
    for i in range(trips):
        t0 = clock()
        trip(i)
        times[i] = clock() - t0
    wall = (clock() - t_start) / 1e9
    gc.enable()
    sock.close(0)
    ctx.term()
    us = times / 1e3
    return {
        "kind": kind,
        "round_trips": trips,
        "warmup": warmup,
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "p99.9_us": round(float(np.percentile(us, 99.9)), 1),
        "max_us": round(float(us.max()), 1),
        "mean_us": round(float(us.mean()), 1),
        "trips_per_s": round(trips / wall, 1),
    }


def round_trips(
    children: Children, kind: str, args: argparse.Namespace, placed: bool = False
) -> dict[str, Any]:
    """A ``kind`` (floor or naive) server process and a client process; the client's JSON.
    ``placed``: both placed as the launcher places a node and its bridge (:func:`place`)."""
    endpoint = free_tcp_endpoint()
    me = [sys.executable, str(Path(__file__).resolve()), "--endpoint", endpoint]
    me += ["--placed"] if placed else []
    server = children.start(
        f"{kind}_server", [*me, "--role", f"{kind}-server", "--model", str(args.model)]
    )
    client = children.start(
        f"{kind}_client",
        [
            *me,
            "--role",
            f"{kind}-client",
            "--round-trips",
            str(args.round_trips),
            "--warmup-trips",
            str(args.warmup_trips),
            "--seed",
            str(args.seed),
        ],
    )
    try:
        limit = READY_TIMEOUT_S + (args.round_trips + args.warmup_trips) * 0.005 + 30
        out = result(client, limit)
    except BenchError as e:
        raise BenchError(f"{e}\n{tail(server)}") from None
    server.stop(5.0)
    return {**out, "placed": placed}


# -- report -----------------------------------------------------------------------------------
# issue 13's targets: (scenario, label, metric, bound, "le"/"ge")
TARGETS = (
    ("realtime", "1 kHz: miss ratio <= 0.1%", "miss_ratio", 0.001, "le"),
    ("realtime", "1 kHz: fresh >= 99.5%", "fresh_ratio", 0.995, "ge"),
    ("realtime", "1 kHz: actions on time >= 99%", "on_time_ratio", 0.99, "ge"),
    ("realtime", "1 kHz: obs age p99 <= 1 ms", "obs_age_p99_us", 1000.0, "le"),
    ("bridges", "many bridges: miss ratio <= 0.1%", "miss_ratio", 0.001, "le"),
    ("bridges", "many bridges: fresh >= 99%", "fresh_ratio", 0.99, "ge"),
    ("bridges", "many bridges: on time >= 99%", "on_time_ratio", 0.99, "ge"),
)


def targets(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: the measured value(s), the threshold and whether it was met (None: the
    scenarios it needs did not run). Miss ratios carry the bare loops' beside them: what the
    machine itself allows at the same rate, with and without SCHED_FIFO."""
    out: dict[str, dict[str, Any]] = {}
    bare = {k: m[k]["miss_ratio"] if k in m else None for k in ("clock", "clock_fifo")}
    for scenario, label, metric, bound, how in TARGETS:
        value = m[scenario][metric] if scenario in m else None
        met = None if value is None else (value <= bound if how == "le" else value >= bound)
        key = f"{scenario}_{metric}_{how}_{bound:g}"
        out[key] = {"label": label, "value": value, "bound": bound, "met": met}
        if metric == "miss_ratio":
            out[key]["bare_loop"], out[key]["bare_loop_fifo"] = bare["clock"], bare["clock_fifo"]
    # the lockstep targets are judged against the floor placed like the node and its bridge
    # (separate CPUs, SCHED_FIFO), where it ran; the unplaced floor's ratio is a reference row
    lock, naive = m.get("lockstep"), m.get("naive")
    placed = "floor_placed" in m
    floors = [("floor_placed", True), ("floor", not placed)] if placed else [("floor", True)]
    for name, judged in floors:
        floor = m.get(name)
        for q, bound in (("p50", 1.2), ("p99", 1.5)):
            ratio = lock[f"round_trip_{q}_us"] / floor[f"{q}_us"] if lock and floor else None
            key = f"lockstep_{q}_le_{bound:g}x_{name}"
            out[key if judged else key + "_reference"] = {
                "label": f"lockstep {q} <= {bound:g}x {name.replace('_', ' ')} {q}"
                + ("" if judged else " (reference)"),
                "value": ratio,
                "ours_us": lock and lock[f"round_trip_{q}_us"],
                "floor_us": floor and floor[f"{q}_us"],
                "met": None if ratio is None or not judged else ratio <= bound,
            }
    ratio = naive["p99_us"] / lock["round_trip_p99_us"] if lock and naive else None
    out["naive_p99_vs_ours"] = {  # a reference row: no target
        "label": "naive p99 / ours (reference)",
        "value": ratio,
        "naive_us": naive and naive["p99_us"],
        "ours_us": lock and lock["round_trip_p99_us"],
        "met": None,
    }
    return out


def _f(value: float | None, fmt: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def table(m: dict[str, Any], tgt: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines: list[str] = []
    cols = [k for k in ("realtime", "bridges", "flood", "clock", "clock_fifo") if k in m]
    if cols:
        titles = {
            k: f"bare loop, {m[k]['policy'].split(' (')[0]}"
            if k.startswith("clock")
            else f"{m[k]['n_bridges']} x {m[k]['bridge_rate_hz']:g} Hz realtime"
            + (" + flood" if k == "flood" else "")
            for k in cols
        }
        head = f"{'node at ' + format(args.rate_hz, 'g') + ' Hz, logging on':<34}"
        head += "".join(f"{titles[k]:>25}" for k in cols)
        lines += [head, "-" * len(head)]
        lines.append(
            "(counts: window = every bridge connected -> first bridge exits; percentiles: "
            "whole run;\n bare clock loop: no sockets, no work, its whole run, same rate and "
            "histograms)"
        )

        def row(
            label: str,
            fn: Callable[[dict[str, Any]], str],
            bare: Callable[[dict[str, Any]], str] | None = None,
        ) -> None:
            cells = [
                (bare or (lambda _s: "-"))(m[k]) if k.startswith("clock") else fn(m[k])
                for k in cols
            ]
            if any(c != "-" for c in cells):  # rows only a node has: not for the bare loop alone
                lines.append(f"{label:<34}" + "".join(f"{c:>25}" for c in cells))

        row(
            "load average 1 min before / after",
            lambda s: f"{s['loadavg_1min'][0]:.2f} / {s['loadavg_1min'][1]:.2f}",
            lambda s: f"{s['loadavg_1min'][0]:.2f} / {s['loadavg_1min'][1]:.2f}",
        )
        row(
            "achieved rate Hz (whole run)",
            lambda s: f"{s['achieved_rate_hz']:.1f} ({s['achieved_rate_hz_whole']:.1f})",
            lambda s: f"{s['achieved_rate_hz']:.1f}",
        )
        row(
            "deadline-miss ratio (whole run)",
            lambda s: f"{100 * s['miss_ratio']:.3f}% ({100 * s['miss_ratio_whole']:.3f}%)",
            lambda s: f"{100 * s['miss_ratio']:.3f}%",
        )
        row(
            "  misses / ticks in window",
            lambda s: f"{s['deadline_misses']} / {s['ticks']}",
            lambda s: f"{s['deadline_misses']} / {s['ticks']}",
        )
        row(
            "tick lateness p50 / p99 µs",
            lambda s: f"{s['tick_lateness_p50_us']:.0f} / {s['tick_lateness_p99_us']:.0f}",
            lambda s: f"{s['tick_lateness_p50_us']:.0f} / {s['tick_lateness_p99_us']:.0f}",
        )
        row(
            "tick period std / p99 µs",
            lambda s: f"{s['tick_period_std_us']:.0f} / {s['tick_period_p99_us']:.0f}",
            lambda s: f"{s['tick_period_std_us']:.0f} / {s['tick_period_p99_us']:.0f}",
        )
        row(
            "fresh ratio (whole run)",
            lambda s: f"{100 * s['fresh_ratio']:.2f}% ({100 * s['fresh_ratio_whole']:.2f}%)",
        )
        row(
            "obs age when used p50 / p99 µs",
            lambda s: f"{s['obs_age_p50_us']:.0f} / {s['obs_age_p99_us']:.0f}",
        )
        row(
            "action delivery p50 / p99 µs",
            lambda s: f"{s['delivery_p50_us']:.0f} / {s['delivery_p99_us']:.0f}",
        )
        row(
            "node work per tick p50 / p99 µs",
            lambda s: f"{s['tick_work_p50_us']:.0f} / {s['tick_work_p99_us']:.0f}",
        )
        row(
            "transitions on time (whole run)",
            lambda s: f"{100 * s['on_time_ratio']:.2f}% ({100 * s['on_time_ratio_whole']:.2f}%)",
        )
        row(
            "transitions logged / sent",
            lambda s: f"{s['transitions_logged']} / {s['transitions_sent']}",
        )
        row("bridge steps/s (sum)", lambda s: f"{s['bridge_steps_per_s']:.0f}")
        row(
            "bridge misses / safe steps",
            lambda s: f"{s['bridge_deadline_misses']} / {s['bridge_safe_steps']}",
        )
        row(
            "stale events / rejected msgs",
            lambda s: f"{s['stale_events']} / {s['rejected_messages']}",
        )
        row(
            "flood sent / dropped over rate",
            lambda s: f"{s['flood_sent']} / {s['flood_dropped']}" if "flood_sent" in s else "-",
        )
        lines.append("")

    lock_hz = m["lockstep"]["node_rate_hz"] if "lockstep" in m else 0
    trips = [
        ("lockstep", f"lockstep via node ({lock_hz:g} Hz tick)", "round_trip"),
        ("floor", "floor: DEALER/ROUTER + ort", ""),
        ("floor_placed", "floor placed as node and bridge", ""),
        ("naive", "naive: REQ/REP + torch eager", ""),
    ]
    if any(k in m for k, _, _ in trips):
        head = f"{'round trip, measured by the client':<34}{'p50 µs':>9}{'p99 µs':>9}"
        head += f"{'max µs':>10}{'n':>9}{'per s':>9}{'load 1m':>13}"
        lines += [head, "-" * len(head)]
        for key, label, prefix in trips:
            s = m.get(key)
            if s is None:
                continue
            p = f"{prefix}_" if prefix else ""
            n = s["round_trips"] if not prefix else s["round_trip_n"]
            rate = s["steps_per_s"] if prefix else s["trips_per_s"]
            load = f"{s['loadavg_1min'][0]:.2f}/{s['loadavg_1min'][1]:.2f}"
            lines.append(
                f"{label:<34}{s[p + 'p50_us']:>9.1f}{s[p + 'p99_us']:>9.1f}"
                f"{s[p + 'max_us']:>10.0f}{n:>9}{rate:>9.0f}{load:>13}"
            )
        if "lockstep" in m:
            lock = m["lockstep"]
            lines.append(
                f"(lockstep: bridge spin {lock['bridge_spin_us']:g} µs "
                f"({lock['bridge_spin_us_from']}), logging on;\n {LOCKSTEP_RATE_NOTE})"
            )
        lines.append("")

    lines.append("targets (node counters over the steady window)")
    for key, t in tgt.items():
        met = {True: "met", False: "MISSED", None: "not run"}[t["met"]]
        if key.startswith("lockstep"):
            met = "reference" if key.endswith("_reference") else met
            value = (
                f"{_f(t['ours_us'], '.1f')} / {_f(t['floor_us'], '.1f')} µs = "
                f"{_f(t['value'], '.2f', 'x')}"
            )
        elif key.startswith("naive"):
            value = (
                f"{_f(t['naive_us'], '.1f')} / {_f(t['ours_us'], '.1f')} µs = "
                f"{_f(t['value'], '.2f', 'x')}"
            )
            met = "reference"
        elif "miss_ratio" in key:
            node = "-" if t["value"] is None else f"{100 * t['value']:.3f}%"
            bare = [
                f"{name} {100 * t[k]:.3f}%"
                for name, k in (("bare", "bare_loop"), ("bare FIFO", "bare_loop_fifo"))
                if t[k] is not None
            ]
            value = f"node {node}" + (f" ({', '.join(bare)})" if bare else "")
        elif key.endswith("us_le_1000"):
            value = _f(t["value"], ".0f", " µs")
        else:
            value = "-" if t["value"] is None else f"{100 * t['value']:.3f}%"
        lines.append(f"  {t['label']:<40}{value:>44}   {met}")
    return "\n".join(lines)


def flood_scenario(
    children: Children, args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scenario 1 with a flooding peer started once the bridge is connected, stopped after the
    node has stopped (so the node's shutdown runs under the flood too)."""
    peers: list[Any] = []

    def start_flood(admin: str) -> None:
        bind = request(admin, "status", 10.0)["status"]["endpoints"]["bind"]
        argv = [sys.executable, str(FLOOD_PEER), bind, str(args.model), "flood", "100"]
        peers.append(children.start("flood_peer", argv))

    cfgs = [bridge_config("sim0", "realtime", args.rate_hz, args.seed)]
    try:
        run = served(
            children, args.model, args.rate_hz, cfgs, args.seconds, tmp, "flood", start_flood
        )
    finally:
        for peer in peers:
            peer.terminate()
            peer.reap(5.0)
    out = peers[0].stdout.read_text() if peers and peers[0].stdout else ""
    sent = [int(line.split()[1]) for line in out.splitlines() if line.startswith("sent ")]
    metrics = {
        **served_metrics(run),
        "bridge_rate_hz": args.rate_hz,
        "n_bridges": 1,
        "flood_sent": sent[-1] if sent else 0,
        "flood_dropped": run["node"]["dropped_over_rate"],
    }
    return run, metrics


# -- main -------------------------------------------------------------------------------------
def run_all(args: argparse.Namespace, children: Children, tmp: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    load: dict[str, Any] = {}
    for name in args.scenarios:
        load_before = os.getloadavg()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        if name in ("clock", "clock_fifo"):
            run = clock_floor(children, args, fifo=name == "clock_fifo")
            metrics[name] = clock_metrics(run)
        elif name == "realtime":
            cfgs = [bridge_config("sim0", "realtime", args.rate_hz, args.seed)]
            run = served(children, args.model, args.rate_hz, cfgs, args.seconds, tmp, name)
            metrics[name] = {**served_metrics(run), "bridge_rate_hz": args.rate_hz, "n_bridges": 1}
        elif name == "lockstep":
            cfgs = [bridge_config("lock0", "lockstep", 0, args.seed)]
            spin_from = "bridge default"
            spin_us = BridgeConfig().spin_us
            if args.bridge_spin_us is not None:
                cfgs[0].spin_us = args.bridge_spin_us
                spin_from, spin_us = "--bridge-spin-us", args.bridge_spin_us
            node_hz = args.lockstep_node_rate_hz
            run = served(children, args.model, node_hz, cfgs, args.lockstep_seconds, tmp, name)
            run["bridge_spin_us"] = spin_us
            b = run["bridges"][0]
            metrics[name] = {
                "node_rate_hz": node_hz,
                "node_rate_note": LOCKSTEP_RATE_NOTE,
                "logging": True,
                "bridge_spin_us": spin_us,
                "bridge_spin_us_from": spin_from,
                "round_trip_p50_us": b["round_trip_us"]["p50"],
                "round_trip_p99_us": b["round_trip_us"]["p99"],
                "round_trip_max_us": b["round_trip_us"]["max"],
                "round_trip_n": b["round_trip_us"]["n"],
                "steps_per_s": b["steps_per_s"],
                "transitions_logged": run["node"]["transitions_logged"],
                "transitions_sent": b["transitions_sent"],
                "deadline_misses_node": run["window"]["deadline_misses"],
            }
        elif name == "flood":
            run, metrics[name] = flood_scenario(children, args, tmp)
        elif name in ("floor", "floor_placed", "naive"):
            run = round_trips(children, name.split("_")[0], args, placed=name == "floor_placed")
            metrics[name] = run
        else:
            cfgs = [
                bridge_config(f"sim{i}", "realtime", args.bridge_rate_hz, args.seed + 1000 * i)
                for i in range(args.bridges)
            ]
            run = served(children, args.model, args.rate_hz, cfgs, args.seconds, tmp, name)
            metrics[name] = {
                **served_metrics(run),
                "bridge_rate_hz": args.bridge_rate_hz,
                "n_bridges": args.bridges,
            }
        raw[name] = run
        load[name] = {"before": load_before, "after": os.getloadavg()}
        metrics[name]["loadavg_1min"] = [load_before[0], load[name]["after"][0]]
    return {"metrics": metrics, "raw": raw, "loadavg_per_scenario": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX actor (17 -> 6)")
    parser.add_argument(
        "--rate-hz",
        type=float,
        default=1000.0,
        help="node rate (also scenario 1's bridge and the bare clock loop)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="bridge duration in the realtime and many-bridge scenarios",
    )
    parser.add_argument(
        "--lockstep-seconds", type=float, default=20.0, help="lockstep bridge duration"
    )
    parser.add_argument(
        "--lockstep-node-rate-hz",
        type=float,
        default=100.0,
        help="the node's tick rate in the lockstep scenario: " + LOCKSTEP_RATE_NOTE,
    )
    parser.add_argument(
        "--bridge-spin-us",
        type=float,
        default=None,
        help="lockstep bridge: busy-poll this long for each answer before sleeping "
        f"(default: the bridge's own, {BridgeConfig().spin_us:g})",
    )
    parser.add_argument(
        "--round-trips",
        type=int,
        default=20_000,
        help="timed round trips for the floor and the naive baseline",
    )
    parser.add_argument(
        "--warmup-trips",
        type=int,
        default=None,
        help="untimed round trips first (default: a tenth, at least 200)",
    )
    parser.add_argument("--bridges", type=int, default=10, help="bridges in the last scenario")
    parser.add_argument(
        "--bridge-rate-hz",
        type=float,
        default=100.0,
        help="each bridge's rate in the last scenario",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    # hidden: this script as a round-trip server or client process
    parser.add_argument(
        "--role",
        help=argparse.SUPPRESS,
        choices=["floor-server", "naive-server", "floor-client", "naive-client", "clock-loop"],
    )
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--fifo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--placed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup_trips is None:
        args.warmup_trips = max(200, args.round_trips // 10)

    if args.role == "clock-loop":
        print(
            json.dumps(role_clock_loop(args.rate_hz, args.seconds, args.fifo), indent=2), flush=True
        )
        return 0
    if args.role:
        kind, part = args.role.split("-")
        if part == "server":
            if kind == "floor":
                role_floor_server(args.endpoint, args.model, args.placed)
            else:
                role_naive_server(args.endpoint, args.model)
        else:
            result = role_client(
                kind, args.endpoint, args.round_trips, args.warmup_trips, args.seed, args.placed
            )
            print(json.dumps(result, indent=2), flush=True)
        return 0

    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    args.model = args.model.resolve()
    short = args.seconds < 60 or args.lockstep_seconds < 20 or args.round_trips < 20_000
    if short:
        print(
            "note: shortened run (defaults: --seconds 60 --lockstep-seconds 20 "
            "--round-trips 20000); fine for a smoke test, not for the targets",
            file=sys.stderr,
        )

    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    load_before = os.getloadavg()
    t0 = time.monotonic()
    results = with_children("control_loop", lambda children, tmp: run_all(args, children, tmp))
    if isinstance(results, int):
        return results
    load_after = os.getloadavg()

    metrics = results["metrics"]
    tgt = targets(metrics)
    import onnxruntime
    import torch

    result = {
        "what": "control node + simulator bridges as processes over ZeroMQ, HalfCheetah-v5",
        "command": shlex.join(command),
        "argv": command,
        "cwd": os.getcwd(),
        "short_run": short,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("role", "endpoint")
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
        "metrics": metrics,
        "targets": tgt,
        "runs": results["raw"],
    }
    write_result(
        args.out,
        result,
        loadavg_before=load_before,
        loadavg_after=load_after,
        loadavg_per_scenario=results["loadavg_per_scenario"],
        pyzmq=zmq.__version__,
        libzmq=zmq.zmq_version(),
        onnxruntime=onnxruntime.__version__,
        torch=torch.__version__,
    )
    print(table(metrics, tgt, args))
    print(
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
        f"{os.cpu_count()} cores ({cpu_model()}); {result['elapsed_s']:.0f} s; JSON in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
