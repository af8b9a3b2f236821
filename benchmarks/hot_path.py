"""The node's hot path, stage by stage: what one tick of one HalfCheetah bridge costs, and where.

The real node objects (``ControlNode`` with its sessions, server, policy and transition log, on
real ZeroMQ sockets, serving the shipped HalfCheetah actor) are driven in one process, pinned
to one CPU with all its threads as the launcher's ``cpus: auto`` pins the node (``--cpu``;
bridges on the other CPUs). Each mode runs twice: plain, for the per-tick totals (``work per
tick``: the receive path of the observation plus the tick that answers it, wall and thread CPU
time; ``status work_us``: the node's own ``tick_work_us``), and staged, each stage a wrapped
call timed by its self time (its children are not in its figure; each wrapper adds ~0.1 µs to
its parent). Two ways to drive it:

- ``warm``: an in-process bridge sends one real HalfCheetah observation (recorded from the
  environment beforehand, encoded as ``sim_bridge/bridge.py`` encodes it, with the action the
  node sent last as the applied one) and the node drains and ticks at once, back to back: the
  CPU cost of the code with warm caches, little noise.
- ``live``: ``ControlNode.run`` at 1 kHz, with the project's default real-time settings, and a
  real ``ddpg bridge`` HalfCheetah realtime process at 1 kHz: what a tick costs on this
  machine, caches cold after each sleep (on this VM everything runs 3-5x slower than warm).

``--before DIR`` runs every mode also against another copy of the code (for example the tree
before a change: ``cp -r control_node models sim_bridge DIR``), alternating the two round by
round so that load from others lands on both; the table shows medians over the rounds.
``--serve-seconds S`` adds end to end runs (``ddpg serve --rate-hz 1000`` and one
``ddpg bridge`` at 1 kHz, as processes, placed as above) reporting the node's own
``tick_work_us``. Writes JSON (default benchmarks/results/hot_path.json) and prints the table.

    .venv/bin/python benchmarks/hot_path.py [--ticks 20000] [--seconds 10] [--rounds 3]
        [--modes warm,live] [--before DIR] [--serve-seconds 15] [--cpu N] [--out PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TREE = Path(os.environ.get("HOT_PATH_TREE", ROOT))
sys.path.insert(0, str(TREE))

CHEETAH = ROOT / "models" / "zoo" / "halfcheetah" / "actor.onnx"
ENV_ID = "HalfCheetah-v5"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "hot_path.json"
# (label, what it covers), in the order of a tick; a label's figure is its self time.
STAGES = [
    ("recv", "recv_multipart of the observation"),
    ("decode", "msgpack header, field and array checks, array views"),
    ("dispatch", "on_message: bridge lookup, type dispatch"),
    ("checks", "_check_obs: shape, dtype, applied action"),
    ("label", "_on_obs: duplicates, episodes, pending (without the log hand-off)"),
    ("log", "_log_transition: the action sent, the Transition (without append)"),
    ("append", "TransitionLog.append"),
    ("tick", "_tick: ready, fresh, phase, tick_work (without answer)"),
    ("answer", "safety, clip, SentAction, stats (answer without its stages)"),
    ("inference", "the policy on the batch"),
    ("encode", "the ACTION frames"),
    ("send", "Link.send"),
]
TOTALS = [
    ("receive path", "recv to the observation kept (drain, inclusive)"),
    ("tick path", "tick start to the last action sent (_tick, inclusive)"),
    ("work per tick", "receive path + tick path of the same tick"),
    ("work per tick (cpu)", "the same in the thread's CPU time: without time others took"),
]


# -- instrumentation --------------------------------------------------------------------------
class Stages:
    """Self time of nested wrapped calls, per label (ns), and the per-tick totals."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.samples: dict[str, list[int]] = collections.defaultdict(list)
        self._stack = [0]
        self.clock = clock

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        pc, stack, sink = self.clock, self._stack, self.samples[label]

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(0)
            t = pc()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = pc() - t
                children = stack.pop()
                stack[-1] += dt
                sink.append(dt - children)

        return timed


class TimedSocket:
    """The node's bridge socket with its receive timed (pyzmq sockets take no attributes)."""

    def __init__(self, sock: Any, wrap: Callable[[str, Callable[..., Any]], Any]) -> None:
        self._sock = sock
        self.recv_multipart = wrap("recv", sock.recv_multipart)
        self.getsockopt = sock.getsockopt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def instrument(node: Any, stages: Stages | None) -> dict[str, list[int]]:
    """Wrap the node's stages (those this tree has) and its per-tick totals."""
    from control_node import protocol
    from models import policy as policy_module

    totals: dict[str, list[int]] = collections.defaultdict(list)
    pc, cpu, pending, pending_cpu = time.perf_counter_ns, time.thread_time_ns, [0], [0]
    if stages is not None:
        w = stages.wrap
        sessions, server = node.sessions, node.server
        node.sock = TimedSocket(node.sock, w)
        protocol.decode = w("decode", protocol.decode)
        protocol.encode = w("encode", protocol.encode)  # before: every ACTION is packed here
        for label, owner, attr in [
            ("dispatch", node, "_on_message"),
            ("checks", sessions, "_check_obs"),
            ("label", sessions, "_on_obs"),
            ("log", sessions, "_log_transition"),
            ("append", node.translog, "append"),
            ("answer", server, "answer"),
            ("send", server, "_send"),
            ("encode", server, "_action_frames"),
        ]:
            if hasattr(owner, attr):
                setattr(owner, attr, w(label, getattr(owner, attr)))
        one = getattr(server, "_one", None)  # the policy's bound batch of 1
        if one is not None:
            one.run = w("inference", one.run)
        else:
            cls = policy_module.OnnxPolicy
            cls.__call__ = w("inference", cls.__call__)  # type: ignore[method-assign]
    drain, tick = node._drain, node._tick
    if stages is not None:
        tick = stages.wrap("tick", tick)

    def timed_drain() -> None:
        t, c = pc(), cpu()
        drain()
        pending[0] += pc() - t
        pending_cpu[0] += cpu() - c

    bridges, answered = node.sessions.bridges, [0]

    def timed_tick(t_tick: int, deadline: int) -> int:
        t, c = pc(), cpu()
        correction = tick(t_tick, deadline)
        dt, dc = pc() - t, cpu() - c
        now_answered = sum(b.answered for b in bridges.values())
        if now_answered > answered[0]:  # this tick sent an action: count its work
            answered[0] = now_answered
            totals["tick path"].append(dt)
            totals["receive path"].append(pending[0])
            totals["work per tick"].append(pending[0] + dt)
            totals["work per tick (cpu)"].append(pending_cpu[0] + dc)
        pending[0] = pending_cpu[0] = 0
        return correction

    node._drain, node._tick = timed_drain, timed_tick
    node.clock.drain = timed_drain  # the clock took the bound method at start-up
    return totals


# -- the node and a bridge ----------------------------------------------------------------------
def make_node(tmp: Path, cpu: int | None) -> Any:
    """The node as ``ddpg serve --rate-hz 1000`` makes it, with the project's default real-time
    settings, on ``cpu`` as the launcher's ``cpus: auto`` puts it (None: no pinning)."""
    from control_node.config import NodeConfig, RealtimeConfig, free_tcp_endpoint
    from control_node.node.loop import ControlNode

    cfg = NodeConfig(
        model=str(CHEETAH),
        bind=free_tcp_endpoint(),
        admin=free_tcp_endpoint(),
        rate_hz=1000.0,
        log_dir=str(tmp / "log"),
        realtime=RealtimeConfig(cpus="all" if cpu is None else [cpu]),
    )
    if hasattr(cfg, "rate_headroom"):  # warm mode ticks back to back, far above the 1 kHz
        cfg.rate_headroom = 100.0  # its bridge announces: keep its rate limit from dropping
    return ControlNode(cfg, log=lambda line: None)


def placement(cpu: int) -> tuple[int | None, str]:
    """(the node's CPU or None, the bridges' --cpus) for ``--cpu``: -1 pins nothing."""
    if cpu < 0:
        return None, "all"
    others = sorted(os.sched_getaffinity(0) - {cpu})
    return cpu, ",".join(map(str, others)) or "all"


def trajectory(policy: Any, steps: int) -> list[tuple[np.ndarray, float, bool]]:
    """(observation, reward, truncated) of real HalfCheetah steps under the actor."""
    from sim_bridge.envs import make_env

    env = make_env(ENV_ID)
    obs, _ = env.reset(seed=0)
    out = [(np.asarray(obs, np.float32), 0.0, False)]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(policy(np.asarray(obs, np.float32)))
        out.append((np.asarray(obs, np.float32), float(reward), bool(truncated or terminated)))
        if terminated or truncated:
            break
    env.close()
    return out


class FakeBridge:
    """A DEALER that speaks as ``sim_bridge.Bridge`` does: hello, then observations with the
    applied action, encoded with the protocol's own ``encode`` (taken before it is wrapped)."""

    def __init__(self, node: Any, traj: list[tuple[np.ndarray, float, bool]]) -> None:
        import zmq

        from control_node import protocol as P

        self.P, self.encode, self.decode, self.traj = P, P.encode, P.decode, traj
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(node.cfg.bind)
        meta = node.server.policy.metadata
        self.sock.send_multipart(
            P.hello(
                "cheetah",
                "0123456789abcdef",
                meta.env_id,
                meta.obs_shape,
                meta.obs_dtype,
                meta.act_low,
                meta.act_high,
                "realtime",
                1000.0,
                os.getpid(),
            )
        )
        while not self.sock.poll(0):
            node._drain()
            node.sock.poll(10)
        assert self.decode(self.sock.recv_multipart()).type == P.WELCOME
        self.episode, self.step = 0, 0
        self.seq, self.action = -1, None

    def send_obs(self) -> bool:
        """One observation; True when the node will answer it (not an episode's last)."""
        P = self.P
        obs, reward, done = self.traj[self.step % len(self.traj)]
        done = done or self.step % len(self.traj) == len(self.traj) - 1
        arrays = {"obs": obs}
        if self.step > 0:
            arrays["action"] = self.action
        fields = {
            "bridge_id": "cheetah",
            "episode": self.episode,
            "step": self.step,
            "reward": reward,
            "terminated": False,
            "truncated": done,
            "applied_seq": self.seq if self.step > 0 else -1,
            "applied_safe": False,
            "t_obs_ns": P.now_ns(),
            "t_send_ns": P.now_ns(),
        }
        self.sock.send_multipart(self.encode(P.OBS, fields, arrays))
        if done:
            self.episode, self.step = self.episode + 1, 0
        else:
            self.step += 1
        return not done

    def take_action(self) -> None:
        msg = self.decode(self.sock.recv_multipart())
        assert msg.type == self.P.ACTION, msg.fields
        self.seq, self.action = msg["seq"], np.array(msg.arrays["action"])


# -- the modes --------------------------------------------------------------------------------
def run_warm(ticks: int, staged: bool, tmp: Path, cpu: int) -> dict[str, Any]:
    node_cpu, _ = placement(cpu)
    if node_cpu is not None:  # before any thread starts: ZeroMQ's and the log writer inherit it
        os.sched_setaffinity(0, {node_cpu})
    node = make_node(tmp, node_cpu)
    traj = trajectory(node.server.policy, 1000)
    from control_node import protocol as P

    node.state, node.started_ns = "running", P.now_ns()
    bridge = FakeBridge(node, traj)
    stages = Stages(time.perf_counter_ns) if staged else None
    totals = instrument(node, stages)

    for _ in range(ticks):
        answered = bridge.send_obs()
        node.sock.poll(100)
        node._drain()
        t_tick = P.now_ns()
        node._tick(t_tick, t_tick)
        if answered:
            bridge.sock.poll(100)
            bridge.take_action()
    status = node.shutdown(grace_s=0.2)
    bridge.sock.close()
    bridge.ctx.term()
    return report(stages, totals, status)


def run_live(seconds: float, staged: bool, tmp: Path, cpu: int) -> dict[str, Any]:
    node_cpu, bridge_cpus = placement(cpu)
    node = make_node(tmp, node_cpu)
    stages = Stages(time.perf_counter_ns) if staged else None
    totals = instrument(node, stages)
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(TREE)}
    bridge = subprocess.Popen(
        [sys.executable, "-m", "control_node", "bridge", "--env", ENV_ID, "--id", "cheetah",
         "--node", node.cfg.bind, "--rate-hz", "1000", "--duration", str(seconds),
         "--cpus", bridge_cpus],
        cwd=TREE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        status = node.run(duration_s=seconds + 3.0)
    finally:
        bridge.kill()
        bridge.wait()
    return report(stages, totals, status)


def report(
    stages: Stages | None, totals: dict[str, list[int]], status: dict[str, Any]
) -> dict[str, Any]:
    def pct(values: list[int]) -> dict[str, float]:
        a = np.asarray(values, dtype=np.float64) / 1e3
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(a)}

    out: dict[str, Any] = {k: pct(v) for k, v in totals.items() if v}
    if stages is not None:
        out.update({k: pct(v) for k, v in stages.samples.items() if v})
    out["status"] = {
        k: status[k]
        for k in ("tick_work_us", "latency_us", "log_handoff_us", "miss_ratio", "fresh_ratio")
    }
    out["status"]["transitions_logged"] = status["transitions_logged"]
    return out


def run_serve(tree: Path, seconds: float, tmp: Path, cpu: int) -> dict[str, Any]:
    """``ddpg serve --rate-hz 1000`` and one ``ddpg bridge`` at 1 kHz; the node's status."""
    from control_node.config import free_tcp_endpoint

    node_cpu, bridge_cpus = placement(cpu)

    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(tree)}
    bind, admin = free_tcp_endpoint(), free_tcp_endpoint()
    ddpg = [sys.executable, "-m", "control_node"]
    node = subprocess.Popen(
        [*ddpg, "serve", "--model", str(CHEETAH), "--rate-hz", "1000", "--bind", bind,
         "--admin", admin, "--log-dir", str(tmp / "serve_log"), "--duration",
         str(seconds + 4), "--json", "--cpus", "all" if node_cpu is None else str(node_cpu)],
        cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    subprocess.run(
        [*ddpg, "bridge", "--env", ENV_ID, "--node", bind, "--rate-hz", "1000", "--duration",
         str(seconds), "--cpus", bridge_cpus],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
    )  # fmt: skip
    out, _ = node.communicate(timeout=60)
    status = json.loads(out)
    return {
        "tick_work_us": status["tick_work_us"],
        "miss_ratio": status["miss_ratio"],
        "fresh_ratio": status["fresh_ratio"],
        "latency_us": status["latency_us"],
    }


# -- rounds and the table ---------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hot_path_") as tmp_name:
        tmp = Path(tmp_name)
        if args.worker == "warm":
            result = run_warm(args.ticks, args.staged, tmp, args.cpu)
        elif args.worker == "live":
            result = run_live(args.seconds, args.staged, tmp, args.cpu)
        else:
            result = run_serve(TREE, args.seconds, tmp, args.cpu)
    print(json.dumps(result))


def spawn(tree: Path, mode: str, args: argparse.Namespace, staged: bool) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", mode, "--ticks", str(args.ticks)]
    argv += ["--cpu", str(args.cpu)]
    seconds = args.serve_seconds if mode == "serve" else args.seconds
    argv += ["--seconds", str(seconds)] + (["--staged"] if staged else [])
    env = {**os.environ, "HOT_PATH_TREE": str(tree), "MUJOCO_GL": "egl"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"hot_path worker ({tree}, {mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(rounds: list[dict[str, Any]], label: str, q: str) -> float | None:
    values = [r[label][q] for r in rounds if label in r]
    return round(statistics.median(values), 1) if values else None


def table(results: dict[str, dict[str, list[dict[str, Any]]]], trees: list[str]) -> str:
    lines = []
    for mode in ("warm", "live"):
        if mode not in results[trees[0]]:
            continue
        head = "".join(f"{t + ' p50':>12}{t + ' p99':>12}" for t in trees)
        lines += [f"\n{mode}: per-stage self time, µs (median of rounds)", f"{'stage':<16}{head}"]
        for label, _ in STAGES + TOTALS:
            row = f"{label:<16}"
            for t in trees:
                staged_or_plain = results[t][mode + ("" if label in dict(TOTALS) else "_staged")]
                for q in ("p50", "p99"):
                    v = median_of(staged_or_plain, label, q)
                    row += f"{'-' if v is None else v:>12}"
            lines.append(row)
        row = f"{'status work_us':<16}"
        for t in trees:
            for q in ("p50", "p99"):
                vals = [r["status"]["tick_work_us"][q] for r in results[t][mode]]
                row += f"{statistics.median(vals):>12.1f}"
        lines.append(row)
    if "serve" in results[trees[0]]:
        lines.append("\nserve: ddpg serve --rate-hz 1000 + one HalfCheetah bridge at 1 kHz")
        for t in trees:
            runs = results[t]["serve"]
            p50 = statistics.median(r["tick_work_us"]["p50"] for r in runs)
            p99 = statistics.median(r["tick_work_us"]["p99"] for r in runs)
            miss = statistics.median(r["miss_ratio"] for r in runs)
            lines.append(
                f"{t:<8} tick_work_us p50 {p50:.1f} p99 {p99:.1f}  misses {100 * miss:.2f}% "
                f"(median of {len(runs)}: {[r['tick_work_us']['p50'] for r in runs]})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=20_000, help="warm mode: ticks per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="live mode: s per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="warm,live", help="comma-separated: warm, live")
    parser.add_argument("--serve-seconds", type=float, default=0.0, help="0: no serve runs")
    parser.add_argument("--before", type=Path, help="another code tree to compare against")
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the node's CPU, all its threads (as the launcher's cpus: auto); bridges on the "
        "others; -1: no pinning (default: the last CPU)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--staged", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    trees = {"after": ROOT} if args.before is None else {"before": args.before, "after": ROOT}
    if args.before is None:
        trees = {"now": ROOT}
    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in trees}
    for i in range(args.rounds):
        order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            for mode in modes:
                for staged in (False, True):
                    key = mode + ("_staged" if staged else "")
                    results[name].setdefault(key, []).append(spawn(tree, mode, args, staged))
            if args.serve_seconds > 0:
                results[name].setdefault("serve", []).append(spawn(tree, "serve", args, False))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    text = table(results, list(trees))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trees": {k: str(v) for k, v in trees.items()},
        "stages": dict(STAGES + TOTALS),
        "loadavg": os.getloadavg(),
        "table": text,
        "rounds": results,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
