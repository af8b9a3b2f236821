"""The admin protocol: typed requests, their limits, and the client that sends one request to a
running node's admin socket and returns its reply.

Requests and replies are msgpack maps (``{"v": 1, "cmd": "status"}``); see docs/protocol.md.
Changing commands carry the node's admin token (``admin_token.py``), which :func:`request`
finds on its own. The node parses every request with :func:`parse_request`: exact field types,
no unknown fields, at most ``MAX_REQUEST_BYTES``; its errors quote at most a short prefix of
what was sent.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import zmq

from control_node.admin_token import TokenError, read_token
from control_node.config import ConfigError, read_yaml
from control_node.protocol import PROTOCOL_VERSION, short

MAX_REQUEST_BYTES = 64 * 1024
"""The admin socket's ZeroMQ MAXMSGSIZE: a larger request disconnects its sender."""
MAX_PATH_CHARS = 4096
CHANGING = frozenset({"deploy", "rollback", "shutdown"})
"""Commands that change the node: they need the admin token."""
_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "status": {},
    "shutdown": {"token": (str, True)},
    "rollback": {"token": (str, True)},
    "deploy": {"token": (str, True), "path": (str, True), "shadow": (bool, False)},
}
"""Per command: field -> (exact type, required), beside ``v`` and ``cmd``."""


class AdminError(RuntimeError):
    """No answer from the node, or it refused the request; the message says which."""


class RequestError(ValueError):
    """A malformed admin request; ``code`` is bad_request or unauthorized."""

    def __init__(self, reason: str, code: str = "bad_request") -> None:
        super().__init__(reason)
        self.code = code


class AdminRequest(NamedTuple):
    cmd: str
    token: str = ""
    path: str = ""
    shadow: bool = False


def parse_request(frame: bytes) -> AdminRequest:
    """Check one request frame strictly (``v`` the int 1, a known ``cmd``, each field of its
    exact type: ``"shadow": "no"`` and ``v: true`` are refused)."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise RequestError(f"request is {len(frame)} bytes (max {MAX_REQUEST_BYTES})")
    try:
        request = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:
        raise RequestError(f"request is not msgpack: {type(e).__name__}") from None
    if not isinstance(request, dict):
        raise RequestError(f"request is a msgpack {type(request).__name__}, not a map")
    v = request.pop("v", None)
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise RequestError(f"v = {short(v)}: expected the integer {PROTOCOL_VERSION}")
    cmd = request.pop("cmd", None)
    if type(cmd) is not str or cmd not in _FIELDS:
        raise RequestError(f"unknown admin command {short(cmd)}; one of {sorted(_FIELDS)}")
    spec = _FIELDS[cmd]
    if unknown := sorted(map(short, set(request) - set(spec))):
        raise RequestError(f"{cmd}: unknown field(s) {', '.join(unknown[:5])}")
    for name, (kind, required) in spec.items():
        if name not in request:
            if required:
                code = "unauthorized" if name == "token" else "bad_request"
                raise RequestError(f"{cmd}: needs {name!r}", code)
            continue
        if type(request[name]) is not kind:
            raise RequestError(
                f"{cmd}: {name} = {short(request[name])} should be a {kind.__name__}"
            )
    path = request.get("path", "")
    if cmd == "deploy" and (not 0 < len(path) <= MAX_PATH_CHARS or "\0" in path):
        raise RequestError(f"deploy: path {short(path)} must be 1..{MAX_PATH_CHARS} characters")
    return AdminRequest(cmd, **request)


def request(
    address: str,
    cmd: str,
    timeout_s: float = 2.0,
    token_file: Path | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Send ``cmd`` to the node at ``address`` and return its reply (raises AdminError). A
    changing command carries the node's token, read from ``token_file`` or found by address."""
    if cmd in CHANGING and "token" not in args:
        try:
            args["token"] = read_token(address, token_file)
        except TokenError as e:
            raise AdminError(str(e)) from None
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
    """``--node ADDR``, ``--launch FILE`` and ``--token-file``: how a command finds the node
    (see admin_address) and its admin token."""
    parser.add_argument("--node", metavar="ADDR", help="admin endpoint (default: ./launch.yaml's)")
    parser.add_argument(
        "--launch",
        type=Path,
        default=Path("launch.yaml"),
        metavar="FILE",
        help="launch file to find the admin endpoint in (default: launch.yaml)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the node's admin token (default: found by endpoint in the node user's runtime "
        "directory; see docs/protocol.md)",
    )


def admin_address(node: str | None, launch_file: Path = Path("launch.yaml")) -> str:
    """``--node ADDR`` if given, else the admin endpoint of ``./launch.yaml``."""
    if node:
        return node
    try:
        data = read_yaml(launch_file)  # bounded, as every config file
        return str(data["node"].get("admin", "tcp://127.0.0.1:5556"))
    except (ConfigError, KeyError, TypeError, AttributeError):
        raise AdminError(f"no --node ADDR given and no node.admin found in {launch_file}") from None
