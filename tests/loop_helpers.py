"""Helpers for tests that run the control loop as real processes: ``ddpg serve`` and ``ddpg
bridge`` as subprocesses on free ports, and a raw DEALER socket for hand-made messages.
Everything started here is killed after each test by the autouse fixture in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zmq

from control_node import protocol as P
from control_node.admin import AdminError, request
from control_node.config import free_tcp_endpoint

ROOT = Path(__file__).resolve().parents[1]
PENDULUM = ROOT / "models" / "zoo" / "inverted_pendulum" / "actor.onnx"
CHEETAH = ROOT / "models" / "zoo" / "halfcheetah" / "actor.onnx"
DDPG = [sys.executable, "-m", "control_node"]
ENV = {**os.environ, "MUJOCO_GL": "egl"}
T = TypeVar("T")
STARTED: list[subprocess.Popen[str]] = []


def kill_started() -> None:
    """Kill every process the helpers started that still runs (a failed test's leftovers)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except AdminError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Node:
    proc: subprocess.Popen[str]
    bind: str
    admin: str
    log_dir: Path | None

    def status(self) -> dict[str, Any]:
        return request(self.admin, "status", timeout_s=2.0)["status"]

    def stop(self) -> dict[str, Any]:
        """SIGTERM and the node's final status (it prints it as JSON)."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return json.loads(out)


def start_node(
    tmp_path: Path,
    model: Path = PENDULUM,
    rate_hz: float = 200,
    log: bool = True,
    bind: str | None = None,
    admin: str | None = None,
    extra: tuple[str, ...] = (),
) -> Node:
    bind, admin = bind or free_tcp_endpoint(), admin or free_tcp_endpoint()
    log_dir = tmp_path / "logs" if log else None
    argv = [*DDPG, "serve", "--model", str(model), "--bind", bind, "--admin", admin]
    argv += ["--rate-hz", str(rate_hz), "--log-dir", str(log_dir) if log_dir else "none"]
    proc = subprocess.Popen(
        [*argv, *extra, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    STARTED.append(proc)
    node = Node(proc, bind, admin, log_dir)
    wait_for("the node's admin socket", lambda: proc.poll() is None and node.status())
    return node


def start_bridge(node_addr: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*DDPG, "bridge", "--node", node_addr, *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    STARTED.append(proc)
    return proc


def stop_bridge(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out)


def run_launch(launch: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``ddpg launch`` to its end; its JSON summary (fails with its stderr if it failed)."""
    done = subprocess.run(
        [*DDPG, "launch", str(launch), *args, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class RawBridge:
    """A DEALER socket speaking the protocol by hand, to send exactly the bytes a test needs."""

    def __init__(self, address: str, bridge_id: str = "raw") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.bridge_id = bridge_id

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0) -> P.Message:
        assert self.sock.poll(round(timeout_s * 1000)), "no reply from the node"
        return P.decode(self.sock.recv_multipart())

    def hello(
        self, env_id: str = "InvertedPendulum-v5", obs_shape: tuple[int, ...] = (4,)
    ) -> P.Message:
        self.send(
            P.hello(
                self.bridge_id, "s1", env_id, obs_shape, "float32",
                np.array([-3.0]), np.array([3.0]), "lockstep", 0.0, os.getpid(),
            )
        )  # fmt: skip
        return self.recv()

    def obs(self, obs: np.ndarray, step: int = 0, **fields: Any) -> list[Any]:
        header = {
            "bridge_id": self.bridge_id,
            "episode": 0,
            "step": step,
            "reward": 1.0 if step else 0.0,
            "terminated": False,
            "truncated": False,
            "applied_seq": step,
            "applied_safe": False,
            "t_obs_ns": P.now_ns(),
            "t_send_ns": P.now_ns(),
            **fields,
        }
        arrays = {"obs": obs}
        if step > 0:
            arrays["action"] = np.array([0.1], np.float32)
        return P.encode(P.OBS, header, arrays)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def write_launch(tmp_path: Path, **changes: Any) -> Path:
    node: dict[str, Any] = {
        "model": str(PENDULUM),
        "bind": free_tcp_endpoint(),
        "admin": free_tcp_endpoint(),
        "rate_hz": 100,
        "log_dir": "logs",
    }
    bridge: dict[str, Any] = {"id": "sim0", "env": "InvertedPendulum-v5", "rate_hz": 100}
    data: dict[str, Any] = {"node": node, "bridges": [bridge]}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        target = {"node": node, "bridge": bridge}.get(section, data)
        target[name or section] = value
    path = tmp_path / "launch.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path
