"""A hostile peer for the flood test and the control-loop benchmark's flood row: one DEALER
that says a valid realtime hello for the robot of MODEL, then sends consecutive valid
observations (each a loggable transition) as fast as it can until killed.

Run as ``python tests/flood_peer.py ENDPOINT MODEL [BRIDGE_ID] [ANNOUNCED_HZ]``; prints
``ready`` once its hello is answered and ``sent N`` every second (how many it has sent)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import zmq

from control_node import protocol as P
from models.policy import OnnxPolicy
from models.spec import RobotSpec

_PLACEHOLDER = 2**64 - 1  # packed as uint64 (0xcf + 8 bytes): patched with the send time


def templates(bridge_id: str, robot: RobotSpec, count: int) -> list[list[bytes]]:
    """Frames of ``count`` consecutive observations (each a loggable transition), their time
    stamps placeholders that :func:`stamped` fills in: valid in every field, as a compromised
    bridge would send them, at the rate of a prebuilt message."""
    obs = np.zeros(robot.obs_shape, np.float32)
    action = np.zeros(robot.act_low.shape, np.float32)
    out = []
    for step in range(count):
        header = {
            "bridge_id": bridge_id, "episode": 0, "step": step,
            "reward": 1.0, "terminated": False, "truncated": False,
            "applied_seq": 0, "applied_safe": False,
            "t_obs_ns": _PLACEHOLDER, "t_send_ns": _PLACEHOLDER,
        }  # fmt: skip
        arrays = {"obs": obs} if step == 0 else {"obs": obs, "action": action}
        out.append([bytes(f) for f in P.encode(P.OBS, header, arrays)])
    return out


def stamped(header: bytes, now: int) -> bytes:
    """``header`` with both placeholder time stamps set to ``now``."""
    mark = b"\xcf" + _PLACEHOLDER.to_bytes(8, "big")
    return header.replace(mark, b"\xcf" + now.to_bytes(8, "big"))


def main() -> None:
    endpoint, model = sys.argv[1], sys.argv[2]
    bridge_id = sys.argv[3] if len(sys.argv) > 3 else "flood"
    hz = float(sys.argv[4]) if len(sys.argv) > 4 else 100.0
    robot = OnnxPolicy(model).metadata.robot
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    sock.send_multipart(
        P.hello(bridge_id, "flood", robot.env_id, robot.obs_shape, "float32",
                robot.act_low, robot.act_high, "realtime", hz, os.getpid())
    )  # fmt: skip
    assert sock.poll(10_000), "no welcome"
    sock.recv_multipart()
    print("ready", flush=True)
    sent, next_report = 0, time.monotonic() + 1.0
    send, recv, events = sock.send_multipart, sock.recv_multipart, sock.getsockopt
    batch = templates(bridge_id, robot, 5000)
    while True:  # the steps of one episode again and again: a new episode each time round
        for header, *arrays in batch:
            try:
                send([stamped(header, P.now_ns()), *arrays], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
            while events(zmq.EVENTS) & zmq.POLLIN:  # the node's answers and errors: forget
                recv(zmq.NOBLOCK)
        if time.monotonic() >= next_report:
            print(f"sent {sent}", flush=True)
            next_report += 1.0


if __name__ == "__main__":
    main()
