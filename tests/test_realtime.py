"""Real-time settings (issue 13): applied to real ``ddpg serve`` and ``ddpg bridge`` processes
and read back from the OS (scheduling policy and priority per thread, locked memory, CPUs);
helper threads at normal priority; without CAP_SYS_NICE one line and serving on; the launcher's
CPU assignment; the slack-time garbage collector."""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import select
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hostile_models import slow_actor
from loop_helpers import (
    DDPG,
    ENV,
    PENDULUM,
    ROOT,
    STARTED,
    Node,
    run_launch,
    start_bridge,
    start_node,
    stop_bridge,
    wait_for,
    write_launch,
)

from control_node import realtime
from control_node.admin import AdminError, request
from control_node.argv import bridge_flags, serve_argv
from control_node.config import (
    BridgeConfig,
    ConfigError,
    NodeConfig,
    RealtimeConfig,
    free_tcp_endpoint,
    from_mapping,
)
from control_node.node import clock as clock_module
from control_node.node.clock import Clock
from control_node.serve_cli import add_arguments as serve_arguments
from control_node.serve_cli import node_config_from_args
from sim_bridge.bridge_cli import add_arguments as bridge_arguments

CPUS = sorted(os.sched_getaffinity(0))
NODE_CPU, BRIDGE_CPU = CPUS[-1], CPUS[0]  # the launcher's choice on this machine, too
OTHER, FIFO = 0, 1  # /proc/PID/task/TID/stat policy numbers


def _rt_permitted() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return (
        subprocess.run([*DDPG[:1], "-c", probe], capture_output=True, timeout=120).returncode == 0
    )


needs_rt = pytest.mark.skipif(
    not _rt_permitted(), reason="SCHED_FIFO is not permitted here (no CAP_SYS_NICE, rtprio 0)"
)


# -- reading the OS, independently of control_node.realtime ---------------------------------
def thread_stats(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (OS name, policy, rt priority) from /proc/PID/task/TID/{comm,stat}."""
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (comm, int(fields[38]), int(fields[37]))  # stat fields 41 and 40
    return out


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def policy(pid: int) -> tuple[int, int]:
    """The main thread's policy (without the reset-on-fork flag) and priority."""
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(
        pid
    ).sched_priority


def assert_holds_idle_poll(pid: int) -> None:
    """The process keeps a PM QoS request open, and the kernel's latency target is 0 us."""
    fds = os.listdir(f"/proc/{pid}/fd")
    held = {
        os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if os.path.exists(f"/proc/{pid}/fd/{fd}")
    }
    assert "/dev/cpu_dma_latency" in held, held
    with open("/dev/cpu_dma_latency", "rb") as f:
        assert struct.unpack("i", f.read(4))[0] == 0


def assert_locked(pid: int) -> None:
    """Every mapping is locked: VmLck covers (nearly) all of VmSize."""
    locked, size = vm_kb(pid, "VmLck"), vm_kb(pid, "VmSize")
    assert locked > 0.9 * size, (locked, size)


def popen(argv: list[str], prefix: list[str] = (), preexec: Any = None) -> subprocess.Popen[str]:
    """A ddpg process that the autouse fixture kills if the test fails."""
    proc = subprocess.Popen(
        [*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=preexec,
    )  # fmt: skip
    STARTED.append(proc)
    return proc


def wait_served(node: Node, answered: int = 10) -> None:
    """Until bridge sim0 is live and the node has answered it ``answered`` times."""

    def served() -> bool:
        bridges = node.status()["bridges"]
        return any(b["id"] == "sim0" and b["answered"] >= answered for b in bridges)

    wait_for(f"{answered} actions for bridge sim0", served)


def realtime_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "real-time:" in line]


def stop(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """SIGTERM; the process's JSON summary and its stderr."""
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out), err


# -- the settings, read back from the OS ----------------------------------------------------
@needs_rt
def test_serve_applies_the_settings_and_status_reports_them(tmp_path: Path) -> None:
    node = start_node(tmp_path, extra=("--cpus", str(NODE_CPU)))
    pid = node.proc.pid
    assert policy(pid) == (os.SCHED_FIFO, 50)
    assert_locked(pid)
    assert os.sched_getaffinity(pid) == {NODE_CPU}
    assert_holds_idle_poll(pid)
    threads = thread_stats(pid)
    for tid in threads:
        assert os.sched_getaffinity(tid) == {NODE_CPU}, threads[tid]
    io = [t for t in threads.values() if t[0].startswith("ZMQbg/IO/")]
    assert io and all(t[1:] == (FIFO, 50) for t in io), threads  # as the loop (io_priority)
    writer = [t for t in threads.values() if t[0].startswith("translog:")]
    assert writer and all(t[1:] == (OTHER, 0) for t in writer), threads  # the log writer

    rt = node.status()["realtime"]
    assert (rt["sched_policy"], rt["sched_priority"], rt["cpus"]) == ("SCHED_FIFO", 50, [NODE_CPU])
    assert rt["memory_locked"] and rt["vmlck_kb"] > 0 and rt["not_set"] == []
    assert rt["cpu_idle_poll"] is True
    assert rt["gc"]["policy"] == "freeze" and rt["gc"]["automatic"] is False
    assert rt["gc"]["frozen"] > 0
    by_tid = {t["tid"]: t for t in rt["threads"]}
    assert by_tid[pid]["sched_policy"] == "SCHED_FIFO"
    assert {t["name"] for t in rt["threads"] if t["sched_policy"] == "SCHED_OTHER"} >= {
        "translog:logs"
    }

    shown = subprocess.run(
        [*DDPG, "status", "--node", node.admin, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert json.loads(shown.stdout)["realtime"]["sched_policy"] == "SCHED_FIFO", shown.stderr
    table = subprocess.run(
        [*DDPG, "status", "--node", node.admin],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    ).stdout
    assert f"real-time SCHED_FIFO 50, CPUs [{NODE_CPU}], memory locked" in table, table
    assert "idle CPUs polling, gc freeze" in table, table
    final = node.stop()
    assert final["realtime"]["sched_policy"] == "SCHED_FIFO"


@needs_rt
def test_bridge_applies_the_settings_and_gets_actions(tmp_path: Path) -> None:
    node = start_node(tmp_path, log=False)
    bridge = start_bridge(node.bind, "--cpus", str(BRIDGE_CPU))
    wait_served(node)
    pid = bridge.pid
    assert policy(pid) == (os.SCHED_FIFO, 40)
    assert_locked(pid)
    assert os.sched_getaffinity(pid) == {BRIDGE_CPU}
    assert_holds_idle_poll(pid)
    summary = stop_bridge(bridge)
    rt = summary["realtime"]
    assert (rt["sched_policy"], rt["sched_priority"], rt["cpus"]) == (
        "SCHED_FIFO",
        40,
        [BRIDGE_CPU],
    )
    assert rt["memory_locked"] and rt["not_set"] == [] and rt["cpu_idle_poll"] is True
    assert rt["gc"] == {"policy": "freeze", "automatic": True, "frozen": rt["gc"]["frozen"]}
    assert summary["steps"] > 0 and summary["action_delivery_us"]["n"] > 0
    node.stop()


@needs_rt
def test_a_lockstep_bridge_reads_its_answer_while_it_spins_for_it(tmp_path: Path) -> None:
    """A lockstep bridge may busy-wait (``spin_us``, here 2 ms) for each answer, on its own
    CPU at SCHED_FIFO. Its ZeroMQ I/O thread, which reads that answer, shares the CPU: one
    priority above the loop thread it preempts the spin. (At the same priority it could read
    only once the spin gave up: every round trip took the whole 2 ms.)"""
    node = start_node(tmp_path, log=False, extra=("--cpus", str(NODE_CPU)))
    bridge = start_bridge(
        node.bind, "--mode", "lockstep", "--spin-us", "2000", "--cpus", str(BRIDGE_CPU)
    )
    wait_served(node, answered=200)
    threads = thread_stats(bridge.pid)
    io = [t for t in threads.values() if t[0].startswith("ZMQbg/IO/")]
    assert io and all(t[1:] == (FIFO, 41) for t in io), threads
    summary = stop_bridge(bridge)
    node.stop()
    round_trip = summary["round_trip_us"]
    assert round_trip["n"] >= 200
    assert round_trip["p50"] < 1000, round_trip  # well inside one 2 ms spin


@needs_rt
@pytest.mark.skipif(shutil.which("chrt") is None, reason="needs chrt (util-linux)")
def test_helper_threads_run_at_normal_priority_under_a_real_time_loop(tmp_path: Path) -> None:
    """Started under ``chrt -f 30`` every thread begins SCHED_FIFO: the loop ends at 50, the log
    writer and a deploy's loader at SCHED_OTHER (the loader is caught while it waits for the
    probe process measuring a slow model), and the loop serves on meanwhile."""
    bind, admin, logs = free_tcp_endpoint(), free_tcp_endpoint(), tmp_path / "logs"
    argv = [*DDPG, "serve", "--model", str(PENDULUM), "--bind", bind, "--admin", admin]
    proc = popen([*argv, "--log-dir", str(logs), "--json"], prefix=["chrt", "-f", "30"])
    node = Node(proc, bind, admin, logs)
    wait_for("the node", lambda: proc.poll() is None and node.status())
    pid = proc.pid
    assert policy(pid) == (os.SCHED_FIFO, 50)
    threads = thread_stats(pid)
    assert [t[1:] for t in threads.values() if t[0] == "translog:logs"] == [(OTHER, 0)], threads

    model = slow_actor(tmp_path / "slow.onnx", 200)  # ~0.1 s per observation: refused
    reply: dict[str, Any] = {}

    def deploy() -> None:
        try:
            request(admin, "deploy", timeout_s=30, path=str(model))
        except AdminError as e:  # refused, as it should be
            reply["error"] = str(e)

    asker = threading.Thread(target=deploy)
    asker.start()
    try:
        loader = wait_for(
            "the deploy loader thread",
            lambda: [t for t in thread_stats(pid).values() if t[0] == "deploy-loader"],
        )
        assert [t[1:] for t in loader] == [(OTHER, 0)]
        ticks = node.status()["ticks"]
        wait_for("ticks while the loader waits", lambda: node.status()["ticks"] > ticks + 20)
    finally:
        asker.join(30)
    assert "slow.onnx: refused: batch-1 inference takes" in reply["error"], reply
    node.stop()


# -- without permission: one line, and serving on ------------------------------------------
def _no_rtprio() -> None:
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("caps", ["-sys_nice", "-sys_nice,-ipc_lock"])
def test_without_permission_one_line_says_what_and_how_and_both_serve(
    tmp_path: Path, caps: str
) -> None:
    prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    bind, admin = free_tcp_endpoint(), free_tcp_endpoint()
    argv = [*DDPG, "serve", "--model", str(PENDULUM), "--bind", bind, "--admin", admin]
    proc = popen([*argv, "--log-dir", "none", "--json"], prefix, _no_rtprio)
    node = Node(proc, bind, admin, None)
    wait_for("the node", lambda: proc.poll() is None and node.status())
    bridge = popen([*DDPG, "bridge", "--node", bind, "--json"], prefix, _no_rtprio)
    wait_served(node)
    time.sleep(0.3)
    assert policy(proc.pid) == (os.SCHED_OTHER, 0)
    assert policy(bridge.pid) == (os.SCHED_OTHER, 0)
    summary, bridge_err = stop(bridge)
    assert summary["steps"] > 0 and summary["action_delivery_us"]["n"] > 0  # it got actions
    final, node_err = stop(proc)
    assert final["state"] == "stopped" and final["transitions_seen"] > 0
    no_memlock = "ipc_lock" in caps
    for who, rt, stderr in (
        ("node", final["realtime"], node_err),
        ("bridge", summary["realtime"], bridge_err),
    ):
        assert rt["sched_policy"] == "SCHED_OTHER" and rt["memory_locked"] is not no_memlock
        assert len(rt["not_set"]) == 1 + no_memlock, rt
        lines = realtime_lines(stderr)
        assert len(lines) == 1, stderr
        line = lines[0]
        priority = 50 if who == "node" else 40
        assert f"SCHED_FIFO priority {priority} (EPERM: no CAP_SYS_NICE" in line, line
        assert "RLIMIT_RTPRIO is 0" in line and "rtprio 99` " in line, line
        assert (
            "/etc/security/limits.conf" in line and "--cap-add=sys_nice --ulimit rtprio=99" in line
        )
        assert ("memlock unlimited" in line and "--ulimit memlock=-1" in line) is no_memlock, line
        assert ("RLIMIT_MEMLOCK is 8 MiB" in line) is no_memlock, line
        assert line.endswith(
            "serving on with SCHED_OTHER" + ", memory not locked" * no_memlock + f", CPUs {CPUS}"
        )


def test_without_the_pm_qos_device_one_line_says_so_and_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as in a container started without --device=/dev/cpu_dma_latency
    monkeypatch.setattr(realtime.permissions, "CPU_LATENCY", str(tmp_path / "dev" / "absent"))
    monkeypatch.setattr(realtime, "_held_latency_requests", [])
    lines: list[str] = []
    cfg = RealtimeConfig(sched_policy="other", lock_memory=False, cpus="all", gc="default")
    settings = realtime.apply(cfg, "bridge", lines.append)
    assert settings["cpu_idle_poll"] is False and realtime._held_latency_requests == []
    assert len(settings["not_set"]) == 1 and len(lines) == 1, lines
    assert "idle CPUs polling (" in lines[0] and "ENOENT" in lines[0], lines
    assert "udev rule" in lines[0] and "--device=/dev/cpu_dma_latency" in lines[0], lines
    assert (
        realtime.apply(replace(cfg, cpu_idle_poll=False), "bridge", lines.append)["not_set"] == []
    )


# -- the launcher ---------------------------------------------------------------------------
@needs_rt
def test_launch_runs_real_time_with_node_and_bridge_on_separate_cpus(tmp_path: Path) -> None:
    summary = run_launch(write_launch(tmp_path), "--duration", "2")
    node, bridge = summary["realtime"], summary["bridges"][0]["realtime"]
    assert (node["sched_policy"], node["sched_priority"]) == ("SCHED_FIFO", 50)
    assert (bridge["sched_policy"], bridge["sched_priority"]) == ("SCHED_FIFO", 40)
    assert node["memory_locked"] and bridge["memory_locked"]
    if len(CPUS) >= 2:
        assert node["cpus"] == [CPUS[-1]] and bridge["cpus"] == CPUS[:-1]
    # the 2 s are the loop's, from when the bridge is live: a start-up slowed by locking memory
    # on a loaded machine once left 68 ticks and nothing logged, when they counted from launch
    assert summary["bridges"][0]["steps"] >= 0.8 * 2 * 100, summary["bridges"][0]
    assert summary["ticks"] >= 0.8 * 2 * 100 and summary["transitions_logged"] > 0


def test_the_launcher_puts_the_node_on_a_cpu_of_its_own() -> None:
    def assign(n: int, cpus: set[int], *bridge_cpus: Any) -> tuple[Any, list[Any]]:
        node = RealtimeConfig()
        bridges = [RealtimeConfig(cpus=bridge_cpus[i] if i < len(bridge_cpus) else "auto")
                   for i in range(n)]  # fmt: skip
        realtime.assign_cpus(node, bridges, cpus)
        return node.cpus, [b.cpus for b in bridges]

    assert assign(1, {0, 1}) == ([1], [[0]])
    assert assign(10, {0, 1}) == ([1], [[0]] * 10)
    assert assign(1, {0}) == ("all", ["all"])
    assert assign(2, {0, 1, 2, 3}) == ([3], [[0], [1]])
    assert assign(3, {0, 1, 2}) == ([2], [[0, 1]] * 3)
    assert assign(2, {0, 1, 2}, [2]) == ([1], [[2], [0]])  # the node avoids named CPUs


# -- configuration and flags ----------------------------------------------------------------
def test_realtime_keys_are_checked_and_bridges_default_below_the_node() -> None:
    bridge = from_mapping(BridgeConfig, {"realtime": {"cpus": [0]}}, "bridges[0]")
    assert bridge.realtime.sched_priority == 40 and bridge.realtime.cpus == [0]
    assert NodeConfig(model="x").realtime.sched_priority == 50
    for bad, message in (
        ({"sched_policy": "batch"}, "node.realtime.sched_policy = 'batch': choose fifo, rr"),
        ({"sched_priority": 99}, "node.realtime.sched_priority = 99: must be in 1..80"),
        ({"cpus": "some"}, "node.realtime.cpus = 'some': a list of CPU numbers, auto or all"),
        ({"cpus": [-1]}, "node.realtime.cpus = [-1]: a non-empty list"),
        ({"gc": "off"}, "node.realtime.gc = 'off': choose freeze or default"),
        ({"lock_memory": "yes"}, "node.realtime.lock_memory = 'yes': expected bool"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from_mapping(NodeConfig, {"model": "x", "realtime": bad}, "node")


def test_flags_are_the_keys_and_round_trip() -> None:
    import argparse

    rt = RealtimeConfig(sched_policy="rr", sched_priority=33, lock_memory=False, cpus=[0, 1],
                        gc="default")  # fmt: skip
    argv = serve_argv(NodeConfig(model=str(PENDULUM), realtime=rt))
    assert "--sched-policy" in argv and argv[argv.index("--cpus") + 1] == "0,1"
    parser = argparse.ArgumentParser()
    serve_arguments(parser)
    assert node_config_from_args(parser.parse_args(argv[4:])).realtime == rt
    bridge = BridgeConfig(realtime=rt)
    parser = argparse.ArgumentParser()
    bridge_arguments(parser)
    args = vars(parser.parse_args(bridge_flags(bridge)))
    assert {k.removeprefix("rt_"): v for k, v in args.items() if k.startswith("rt_")} == vars(rt)
    for cmd, priority in (("serve", 50), ("bridge", 40)):
        text = subprocess.run(
            [*DDPG, cmd, "--help"], capture_output=True, text=True, env=ENV, timeout=120
        )
        flat = " ".join(text.stdout.split("examples:")[0].split())
        helps = {h.split()[0]: h for h in re.split(r" (?=--[a-z])", flat)}
        for key, default in (("--sched-policy", "fifo"), ("--sched-priority", priority),
                             ("--lock-memory", "true"), ("--cpus", "auto"),
                             ("--cpu-idle-poll", "true"), ("--gc", "freeze")):  # fmt: skip
            assert f"(default: {default})" in helps[key], (cmd, key, helps.get(key))


def test_docs_and_the_shipped_launch_file_name_every_realtime_key() -> None:
    docs = (ROOT / "docs" / "launch.md").read_text()
    shipped = (ROOT / "launch.yaml").read_text()
    section = docs.split("## `node.realtime`, `bridges[].realtime`")[1].split("\n## ")[0]
    node, bridge = RealtimeConfig(), BridgeConfig().realtime
    for key in vars(node):
        row = f"| `{key}` | `{str(getattr(node, key)).lower()}` | "
        assert row + f"`{str(getattr(bridge, key)).lower()}` |" in section, key
        assert shipped.count(f" {key}: ") == 2, key  # the node's and the bridge's


# -- the slack-time garbage collector -------------------------------------------------------
def test_slack_gc_collects_only_when_the_slack_fits() -> None:
    try:
        slack = realtime.SlackGC()
        assert not gc.isenabled()
        assert not slack.collect(10**9)  # nothing due yet
        keep = [[] for _ in range(2 * slack.thresholds[0])]  # due: tracked objects pending
        assert not slack.collect(slack.FLOOR_NS)  # too little slack: it waits
        assert slack.collections == [0, 0, 0]
        assert slack.collect(10**9)
        assert slack.collections == [1, 0, 0] and slack.max_ns[0] > 0
        assert gc.get_count()[0] < slack.thresholds[0]
        keep += [[] for _ in range(slack.FORCE * slack.thresholds[0] + 10)]
        assert slack.collect(0) and slack.forced == 1  # too long without slack: gen 0 anyway
    finally:
        gc.enable()


def test_the_clock_collects_in_the_wait_with_the_time_left() -> None:
    calls: list[int] = []
    clock = Clock(NodeConfig(model="x"), [], lambda: None)
    clock.collect = lambda remaining: calls.append(remaining) is None and len(calls) == 1
    t0 = time.monotonic_ns()
    clock.wait(t0 + 20_000_000)
    assert time.monotonic_ns() - t0 >= 20_000_000
    assert len(calls) >= 2 and 10_000_000 < calls[0] <= 20_000_000, calls


def test_after_a_lockstep_answer_the_clock_busy_drains_then_sleeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``hold`` (the sessions call it after each lockstep answer) keeps the wait draining, never
    asleep in ``select``, for ``lockstep_spin_us``: the bridge's next observation is taken in at
    once. Then the wait sleeps to its deadline as before, and without a hold it sleeps at once.
    (The sleeps are read from ``select`` itself, so a busy machine cannot fail the test.)"""
    sleeps: list[int] = []

    class RecordingSelect:
        @staticmethod
        def select(r: list[int], w: list[int], x: list[int], timeout: float) -> Any:
            sleeps.append(time.monotonic_ns())
            return select.select(r, w, x, timeout)

    monkeypatch.setattr(clock_module, "select", RecordingSelect)
    looks: list[int] = []
    cfg = NodeConfig(model="x", lockstep_spin_us=5000)
    clock = Clock(cfg, [], lambda: looks.append(time.monotonic_ns()))
    t0 = time.monotonic_ns()
    clock.hold()
    clock.wait(t0 + 30_000_000)
    assert time.monotonic_ns() - t0 >= 30_000_000
    assert sleeps and sleeps[0] >= t0 + 5_000_000, [s - t0 for s in sleeps[:3]]  # held, then
    assert len([t for t in looks if t < sleeps[0]]) > 10, len(looks)  # looking meanwhile
    assert len(sleeps) <= 3, len(sleeps)  # asleep to the deadline
    looks.clear()
    sleeps.clear()
    t1 = time.monotonic_ns()
    clock.wait(t1 + 10_000_000)
    assert sleeps and len([t for t in looks if t < sleeps[0]]) == 1, looks  # asleep at once
