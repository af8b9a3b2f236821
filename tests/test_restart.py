"""Restarting after a crash: ``ddpg launch`` right after a node died by kill -9 starts on the
same ports; a port that is really taken is refused in one line; a launcher killed with -9 takes
its node and bridges with it.

The probe these pin down (issue 15, finding 7): ``port_in_use`` test-bound without
SO_REUSEADDR, so the TIME_WAIT connections of a node that had bridges made ``ddpg launch``
refuse ``port is already in use`` for up to a minute, although ZeroMQ (which binds with
SO_REUSEADDR) would have bound at once. Every process started here is killed after each test.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq
from loop_helpers import (
    DDPG,
    ENV,
    STARTED,
    RawBridge,
    start_bridge,
    start_node,
    stop_bridge,
    wait_for,
    write_launch,
)

from control_node import protocol as P
from control_node.admin import request
from control_node.config import free_tcp_endpoint, port_in_use


def plain_bind_fails(address: str) -> bool:
    """Whether a bind without SO_REUSEADDR fails (what the old check did)."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            return True
    return False


@pytest.mark.parametrize("end", ["kill -9", "SIGTERM"])
def test_a_launch_right_after_a_node_with_bridges_ended_starts(tmp_path: Path, end: str) -> None:
    node = start_node(tmp_path / "first", rate_hz=200)
    if end == "kill -9":  # a bridge that is connected and quiet when the node dies: its side
        raw = RawBridge(node.bind)  # closes after the node's, which leaves TIME_WAIT behind
        assert raw.hello().type == P.WELCOME
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=10)
        wait_for("the connection in TIME_WAIT", lambda: plain_bind_fails(node.bind), 10)
        raw.close()
    else:  # a node that stops cleanly closes its bridges' connections itself
        bridge = start_bridge(node.bind, "--rate-hz", "100")
        wait_for("a live bridge", lambda: node.status()["bridges"])
        node.stop()
        stop_bridge(bridge)
    # A plain bind fails there, as the old check's did; ZeroMQ's (SO_REUSEADDR) and ours do not.
    assert plain_bind_fails(node.bind) and not port_in_use(node.bind)
    launch = write_launch(tmp_path, node__bind=node.bind, node__admin=node.admin)
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "3", "--json", "--quiet"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["ticks"] > 0 and summary["transitions_logged"] > 0


@pytest.mark.parametrize("holder", ["socket", "zeromq"])
def test_a_port_really_taken_is_refused_in_one_line(tmp_path: Path, holder: str) -> None:
    taken = free_tcp_endpoint()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    plain = socket.socket()
    try:
        if holder == "zeromq":  # a node already serving there: it binds with SO_REUSEADDR
            sock.bind(taken)
        else:
            host, _, port = taken.removeprefix("tcp://").rpartition(":")
            plain.bind((host, int(port)))
            plain.listen()
        launch = write_launch(tmp_path, node__bind=taken)
        done = subprocess.run(
            [*DDPG, "launch", str(launch), "--duration", "3"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
    finally:
        plain.close()
        sock.close()
        ctx.term()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        f"ddpg launch: error: {launch}: node.bind = '{taken}': port is already in use"
    ), done.stderr


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_launcher_killed_with_9_takes_its_node_and_bridges_with_it(tmp_path: Path) -> None:
    launch = write_launch(tmp_path)
    admin = json.loads(launch.read_text())["node"]["admin"]
    proc = subprocess.Popen(
        [*DDPG, "launch", str(launch), "--quiet"],  # runs until stopped
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    STARTED.append(proc)
    watchdog = threading.Timer(60, proc.kill)  # a readline never blocks past it
    watchdog.start()
    try:
        assert proc.stderr is not None
        while "bridge(s) running" not in (line := proc.stderr.readline()):
            assert line, "the launch did not start"
    finally:
        watchdog.cancel()
    status = request(admin, "status", 2.0)["status"]
    pids = [status["pid"], *(b["pid"] for b in status["bridges"])]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    try:
        wait_for("the node and the bridge to stop", lambda: all(map(_gone, pids)), 30)
    finally:
        for pid in pids:  # a failed check must not leave them running
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while port_in_use(admin) and time.monotonic() < deadline:  # the ports are free again
        time.sleep(0.05)
    assert not port_in_use(admin)
