"""The benchmarks' child processes, on top of ``control_node.processes``: output in files, a
stderr tail in every error, a served run (a node and its bridges, snapshotted while they run)
and every child stopped at the end, Ctrl-C included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from control_node.admin import request
from control_node.argv import bridge_argv, serve_argv
from control_node.config import BridgeConfig, NodeConfig, free_tcp_endpoint
from control_node.processes import Child, NotReady, last_json, wait_for_admin
from control_node.realtime import assign_cpus

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0
"""How long the node, the bridges and the round-trip servers get to come up (2 busy cores)."""


class BenchError(RuntimeError):
    """A child process failed or did not come up; the message carries its stderr tail."""


def stderr_text(child: Child) -> str:
    try:
        return child.stderr.read_text(errors="replace") if child.stderr else ""
    except OSError:
        return ""


def tail(child: Child, lines: int = 15) -> str:
    text = "\n".join(stderr_text(child).splitlines()[-lines:])
    return f"--- {child.name} stderr (last {lines} lines) ---\n{text}"


def result(child: Child, timeout_s: float) -> dict[str, Any]:
    """Wait for the process and parse the JSON object it printed last."""
    try:
        rc = child.collect(timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"{child.name} still running after {timeout_s:.0f} s\n{tail(child)}"
        ) from None
    if rc != 0:
        raise BenchError(f"{child.name} exited with {rc}\n{tail(child)}")
    text = child.outputs[-1]
    data = last_json(text)
    if data is None:
        raise BenchError(f"{child.name} printed no JSON; stdout ends with {text[-300:]!r}")
    return data


class Children:
    """Every process a benchmark starts, stdout and stderr in files under ``tmp`` (a full pipe
    would stall it); :meth:`stop_all` ends those still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Child] = []
        self.env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )

    def start(self, name: str, argv: Sequence[str]) -> Child:
        """Started in our session: a Ctrl-C reaches the children too, and each stops cleanly."""
        stem = self.tmp / f"{len(self.all):02d}_{name}"
        child = Child(
            name,
            list(argv),
            stdout=Path(f"{stem}.out"),
            stderr=Path(f"{stem}.err"),
            env=self.env,
            cwd=ROOT,
            new_session=False,
        )
        child.start()
        self.all.append(child)
        return child

    def stop_all(self, grace_s: float = 5.0) -> None:
        running = [c for c in self.all if c.alive()]
        for c in running:
            c.terminate()
        end = time.monotonic() + grace_s
        for c in running:
            c.reap(max(0.0, end - time.monotonic()))


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def with_children(
    prog: str, body: Callable[[Children, Path], T], tmp_dir: Path | None = None
) -> T | int:
    """``body(children, tmp)`` in a fresh temp dir; every child it started is stopped at the
    end, Ctrl-C, SIGTERM and SIGHUP included. Its result, or the exit code after an error."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    with tempfile.TemporaryDirectory(prefix=f"{prog}_", dir=tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        children = Children(tmp)
        try:
            return body(children, tmp)
        except BenchError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; stopping child processes", file=sys.stderr)
            return 130
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
            children.stop_all()


# -- a served run: a node and its bridges --------------------------------------------------------
@dataclass
class Served:
    """One served run: every final JSON and two status snapshots of the node, ``first`` once
    every bridge is connected and ``last`` once the first bridge has exited."""

    node: dict[str, Any]
    bridges: list[dict[str, Any]]
    first: dict[str, Any]
    first_took_s: float
    """How long the first status request took (each costs the node's loop time)."""
    last: dict[str, Any]
    window_s: float
    """Wall time from the first snapshot to the last."""
    during: Any
    node_stderr_tail: list[str]


def window_start(
    node: Child, bridges: list[Child], admin: str, ids: set[str]
) -> tuple[dict[str, Any], float]:
    """Once every bridge has said it is connected (its stderr), one status request to the node
    (only then, since each costs the node's loop time): the window's first snapshot."""
    end = time.monotonic() + READY_TIMEOUT_S + 5 * len(bridges)
    while time.monotonic() < end:
        for c in [node, *bridges]:
            if not c.alive():
                raise BenchError(
                    f"{c.name} exited ({c.proc.returncode}) before every bridge was connected"  # type: ignore[union-attr]
                    f"\n{tail(c)}"
                )
        if all("connected to node" in stderr_text(b) for b in bridges):
            t0 = time.perf_counter()
            status = request(admin, "status", 10.0)["status"]
            took = time.perf_counter() - t0
            live = {
                b["id"] for b in status["bridges"] if b["state"] == "live" and b["observations"]
            }
            if live >= ids:
                return status, took
        time.sleep(0.1)
    raise BenchError(f"not every bridge connected within {READY_TIMEOUT_S:.0f} s")


def start_node(children: Children, name: str, cfg: NodeConfig, cap_s: float) -> Child:
    """``ddpg serve`` for at most ``cap_s``, once it answers its admin socket."""
    node = children.start(f"{name}_node", serve_argv(cfg, "--duration", f"{cap_s:g}", "--json"))
    try:
        wait_for_admin(node, cfg.admin, READY_TIMEOUT_S)
    except NotReady as e:
        if e.returncode is not None:
            raise BenchError(f"{node.name} exited with {e.returncode}\n{tail(node)}") from None
        raise BenchError(
            f"{node.name}: admin socket {cfg.admin} did not answer in {READY_TIMEOUT_S:.0f} s"
        ) from None
    return node


def wait_first_exit(name: str, node: Child, bridges: list[Child], end: float) -> None:
    """Until one bridge has exited (each runs for ``--duration``); the node must outlive it."""
    while all(b.alive() for b in bridges):
        if time.monotonic() > end:
            raise BenchError(f"{name}: the bridges ran past --duration by {READY_TIMEOUT_S} s")
        if not node.alive():
            raise BenchError(f"{name}: the node exited before its bridges\n{tail(node)}")
        time.sleep(0.02)


def serve(
    children: Children,
    name: str,
    node: NodeConfig,
    bridges: list[BridgeConfig],
    seconds: float,
    during: Callable[[str], Any] | None = None,
) -> Served:
    """Start the node on fresh endpoints, wait for its admin socket, start the bridges for
    ``seconds``, snapshot the node when all are connected, run ``during(admin)``, snapshot again
    when the first bridge exits, wait for them, stop the node (SIGTERM: it says goodbye and
    commits its log) and gather every final JSON. CPUs are placed as ``ddpg launch`` places
    them (``cpus: auto``: the node on a CPU of its own, the bridges on the others)."""
    node = replace(node, realtime=replace(node.realtime))
    bridges = [replace(b, realtime=replace(b.realtime)) for b in bridges]
    assign_cpus(node.realtime, [b.realtime for b in bridges], os.sched_getaffinity(0))
    bind, admin = free_tcp_endpoint(), free_tcp_endpoint()
    while admin == bind:
        admin = free_tcp_endpoint()
    # The node's own --duration is only a safety cap: it is stopped right after its bridges exit.
    cap = seconds + 2 * READY_TIMEOUT_S + 10 * len(bridges) + 60
    node_proc = start_node(children, name, replace(node, bind=bind, admin=admin), cap)
    procs = [
        children.start(
            f"{name}_bridge_{b.id}",
            bridge_argv(replace(b, node=bind), "--duration", f"{seconds:g}", "--json"),
        )
        for b in bridges
    ]
    first, first_took = window_start(node_proc, procs, admin, {b.id for b in bridges})
    t_first = time.monotonic()
    extra = during(admin) if during is not None else None
    wait_first_exit(name, node_proc, procs, t_first + seconds + READY_TIMEOUT_S)
    last = request(admin, "status", 10.0)["status"]
    window_s = time.monotonic() - t_first
    summaries = [result(b, seconds + READY_TIMEOUT_S) for b in procs]
    node_proc.terminate()
    final = result(node_proc, 30.0)
    node_tail = stderr_text(node_proc).splitlines()[-20:]
    return Served(final, summaries, first, first_took, last, window_s, extra, node_tail)
