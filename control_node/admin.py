"""The admin client: one request to a running node's admin socket, one reply.

Requests and replies are msgpack maps (``{"v": 1, "cmd": "status"}``); see docs/protocol.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgpack
import yaml
import zmq

from control_node.protocol import PROTOCOL_VERSION


class AdminError(RuntimeError):
    """No answer from the node, or it refused the request; the message says which."""


def request(address: str, cmd: str, timeout_s: float = 2.0, **args: Any) -> dict[str, Any]:
    """Send ``cmd`` to the node at ``address`` and return its reply (raises AdminError)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(msgpack.packb({"v": PROTOCOL_VERSION, "cmd": cmd, **args}))
        if not sock.poll(round(timeout_s * 1000)):
            raise AdminError(f"no answer from a node at {address} within {timeout_s:g} s")
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise AdminError(f"node at {address} refused {cmd!r}: {error}")
    return reply


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """``--node ADDR`` and ``--launch FILE``: how a command finds the node (see admin_address)."""
    parser.add_argument("--node", metavar="ADDR", help="admin endpoint (default: ./launch.yaml's)")
    parser.add_argument(
        "--launch",
        type=Path,
        default=Path("launch.yaml"),
        metavar="FILE",
        help="launch file to find the admin endpoint in (default: launch.yaml)",
    )


def admin_address(node: str | None, launch_file: Path = Path("launch.yaml")) -> str:
    """``--node ADDR`` if given, else the admin endpoint of ``./launch.yaml``."""
    if node:
        return node
    try:
        data = yaml.safe_load(launch_file.read_text())
        return str(data["node"].get("admin", "tcp://127.0.0.1:5556"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise AdminError(f"no --node ADDR given and no node.admin found in {launch_file}") from None
