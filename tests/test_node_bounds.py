"""The node's tables and inputs are bounded (issue 15, findings 2 and 8): a storm of hellos is
refused beyond ``max_bridges`` and forgotten after retention, status stays small, an oversized
frame never reaches memory, an overflowing observation is counted, and peers' strings are
escaped in log lines. Real node process, real DEALER sockets sending real bytes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from loop_helpers import RawBridge, start_node, wait_for

from control_node import protocol as P
from control_node.admin import AdminError, request


def hello(bridge_id: str, mode: str = "lockstep", rate_hz: float = 0.0) -> list[bytes]:
    frames = P.hello(
        bridge_id, "s1", "InvertedPendulum-v5", (4,), "float32",
        np.array([-3.0]), np.array([3.0]), mode, rate_hz, os.getpid(),
    )  # fmt: skip
    return [bytes(f) for f in frames]


def replies(sock: zmq.Socket, n: int, timeout_s: float = 10.0) -> list[P.Message]:
    out: list[P.Message] = []
    end = time.monotonic() + timeout_s
    while len(out) < n and sock.poll(max(1, round((end - time.monotonic()) * 1000))):
        out.append(P.decode(sock.recv_multipart()))
    return out


def test_a_storm_of_hellos_is_refused_beyond_the_limit_and_forgotten(tmp_path: Path) -> None:
    node = start_node(
        tmp_path, rate_hz=200, log=False,
        extra=("--max-bridges", "5", "--bridges-kept", "20", "--bridge-retention-s", "2",
               "--status-bridges", "8"),
    )  # fmt: skip
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.bind)
    try:
        total = 0
        for wave in range(3):  # each wave goes stale (lockstep: silent past the watchdog)
            for i in range(300):
                sock.send_multipart(hello(f"w{wave}-{i}"))
            got = replies(sock, 300)
            total += 300
            codes = [m.type if m.type == P.WELCOME else m["code"] for m in got]
            # counted from below: exactly the limit is welcomed, every other hello refused
            assert codes.count(P.WELCOME) == 5 and codes.count("too_many_bridges") == 295, codes
            wait_for("the wave to go stale", lambda: node.status()["bridges_summary"]["live"] == 0)
        status = node.status()
        summary = status["bridges_summary"]
        assert summary["refused_full"] == 3 * 295
        assert summary["stale"] + summary["gone"] <= 20 and summary["live"] == 0, summary
        assert len(status["bridges"]) <= 8 and len(msgpack.packb(status)) < 20_000
        assert status["rejected_by_code"]["too_many_bridges"] == 3 * 295
        wait_for(
            "retention to forget them all",
            lambda: node.status()["bridges_summary"]["forgotten"] == 15,
            timeout=10,
        )
    finally:
        sock.close(linger=0)
        ctx.term()
    final = node.stop()
    assert final["bridges"] == [] and final["deadline_misses"] <= 0.01 * final["ticks"]


def test_an_oversized_frame_disconnects_its_sender_and_serving_goes_on(tmp_path: Path) -> None:
    node = start_node(tmp_path, rate_hz=200, log=False)
    good, bad = RawBridge(node.bind, "good"), RawBridge(node.bind, "bad")
    try:
        assert good.hello().type == P.WELCOME
        bad.send([b"\x81\xa1v\x01" + b" " * (8 * 2**20)])  # an 8 MB header frame
        with pytest.raises(AssertionError, match="no reply"):
            bad.recv(timeout_s=1.0)  # ZeroMQ dropped the peer; the node never saw it
        obs = np.zeros(4, np.float32)
        good.send(good.obs(obs))
        assert good.recv().type == P.ACTION
    finally:
        good.close()
        bad.close()
    final = node.stop()
    assert final["rejected_messages"] == 0


def test_decode_checks_the_header_size_before_copying_it() -> None:
    class Huge:
        """A frame whose length is known but that must not be copied."""

        def __len__(self) -> int:
            return P.MAX_HEADER_BYTES + 1

        def __bytes__(self) -> bytes:
            raise AssertionError("the decoder copied an oversized frame")

        def __buffer__(self, flags: int) -> memoryview:
            raise AssertionError("the decoder copied an oversized frame")

    with pytest.raises(P.ProtocolError, match="max 65536"):
        P.decode([Huge()])  # type: ignore[list-item]


def test_an_observation_that_overflows_the_network_is_counted_and_answered_safely(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path, rate_hz=200, log=False)
    raw = RawBridge(node.bind, "rt")
    try:
        raw.send(hello("rt", "realtime", 100.0))
        assert raw.recv().type == P.WELCOME
        raw.send(raw.obs(np.full(4, 1e38, np.float32)))  # finite, but the actor overflows
        action = raw.recv()
        assert action.type == P.ACTION and action["safe"], action.fields
    finally:
        raw.close()
    final = node.stop()
    assert final["non_finite_actions"] == 1 and final["non_finite_observations"] == 0
    assert final["safe_actions"] == 1


def test_peers_strings_are_checked_and_escaped_in_log_lines(tmp_path: Path) -> None:
    node = start_node(tmp_path, rate_hz=200, log=False)
    raw = RawBridge(node.bind, "x")
    try:
        raw.send(hello("evil\x00\x1b[2J"))
        refused = raw.recv()
        assert refused.type == P.ERROR and refused["code"] == "bad_field"
        assert "printable" in refused["reason"] and "\\x00" in refused["reason"]
        raw.send(hello("b" * 200))
        assert raw.recv()["code"] == "bad_field"
        with pytest.raises(AdminError):
            request(node.admin, "deploy", 30.0, path="/tmp/no\x1b[31mwhere\n.onnx")
    finally:
        raw.close()
    node.proc.terminate()
    _, err = node.proc.communicate(timeout=30)
    assert "deploy refused" in err and "\\x1b[31m" in err
    assert "\x00" not in err and "\x1b" not in err
