"""The admin socket needs credentials to change the node (issue 15, finding 3): deploy,
rollback and shutdown carry the token the node writes for its own user; status stays open.
Requests are typed and bounded; errors quote at most a short prefix. Real node, real sockets."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from loop_helpers import DDPG, ENV, PENDULUM, Node, start_node

from control_node.admin import AdminError, parse_request, request
from control_node.admin_token import read_token, token_path


def raw_request(node: Node, request_map: Any, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """One request sent as given (no token added); the reply, or None if none came."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(node.admin)
        frame = request_map if isinstance(request_map, bytes) else msgpack.packb(request_map)
        sock.send(frame)
        if not sock.poll(round(timeout_s * 1000)):
            return None
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return start_node(tmp_path, rate_hz=100, log=False)


def test_changing_commands_without_the_token_are_refused_and_status_stays_open(
    node: Node,
) -> None:
    path = token_path(node.admin)
    mode = path.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = read_token(node.admin)
    attempts = [
        {"v": 1, "cmd": "shutdown"},
        {"v": 1, "cmd": "shutdown", "token": "0" * 64},
        {"v": 1, "cmd": "rollback", "token": token[:-1] + "x"},
        {"v": 1, "cmd": "deploy", "path": str(PENDULUM)},
    ]
    for attempt in attempts:
        reply = raw_request(node, attempt)
        assert reply is not None and not reply["ok"] and reply["code"] == "unauthorized", reply
    status = node.status()  # no token needed to read
    assert status["state"] == "running" and status["admin_refused"]["unauthorized"] == 4
    assert raw_request(node, {"v": 1, "cmd": "rollback", "token": token})["code"] == "refused"
    final = node.stop()
    assert final["deploys"] == [] and not path.exists()  # the token goes with its node


def test_admin_requests_are_typed_and_bounded(node: Node) -> None:
    token = read_token(node.admin)
    deploy = {"v": 1, "cmd": "deploy", "token": token, "path": str(PENDULUM)}
    cases = [
        ({**deploy, "shadow": "no"}, "shadow = 'no' should be a bool"),
        ({"v": True, "cmd": "status"}, "v = True: expected the integer 1"),
        ({"v": 1.0, "cmd": "status"}, "v = 1.0: expected the integer 1"),
        ({"v": 1, "cmd": "status", "extra": 1}, "unknown field(s) 'extra'"),
        ({**deploy, "path": 17}, "path = 17 should be a str"),
        ({"v": 1, "cmd": "x" * 10_000}, "unknown admin command 'xxxx"),
        ([1, 2], "not a map"),
    ]
    for req, words in cases:
        reply = raw_request(node, req)
        assert reply is not None and not reply["ok"] and reply["code"] == "bad_request", reply
        assert words in reply["error"], (words, reply)
        assert len(reply["error"]) < 300, len(reply["error"])  # a short prefix, never the value
    # a request over the size limit: ZeroMQ drops the sender before the node reads it
    assert raw_request(node, {"v": 1, "cmd": "y" * 2_000_000}, timeout_s=1.0) is None
    status = node.status()
    assert status["state"] == "running" and status["model_id"] == "2ff52a327c6e434c"
    assert status["admin_refused"]["requests"] == len(cases)
    node.stop()


def test_parse_request_accepts_exactly_the_typed_fields() -> None:
    req = parse_request(msgpack.packb({"v": 1, "cmd": "deploy", "token": "t", "path": "/m"}))
    assert (req.cmd, req.token, req.path, req.shadow) == ("deploy", "t", "/m", False)
    assert parse_request(msgpack.packb({"v": 1, "cmd": "status"})).cmd == "status"


def test_ddpg_commands_find_the_token_and_refuse_one_others_can_read(node: Node) -> None:
    path = token_path(node.admin)
    os.chmod(path, 0o644)
    try:
        with pytest.raises(AdminError, match="chmod 600"):
            request(node.admin, "shutdown")
    finally:
        os.chmod(path, 0o600)
    assert node.proc.poll() is None
    done = subprocess.run(
        [*DDPG, "status", "--shutdown", "--node", node.admin],
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is stopping" in done.stdout
    node.proc.communicate(timeout=30)
    assert node.proc.returncode == 0


def test_the_token_file_of_a_killed_node_is_replaced_by_the_next(tmp_path: Path) -> None:
    first = start_node(tmp_path, rate_hz=100, log=False)
    old = read_token(first.admin)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.communicate(timeout=10)
    second = start_node(tmp_path, rate_hz=100, log=False, admin=first.admin)
    assert read_token(second.admin) != old
    assert request(second.admin, "shutdown")["ok"]
    second.proc.communicate(timeout=30)
