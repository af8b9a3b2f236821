"""The admin socket, the node's side (``control_node.admin`` is the client): status, shutdown,
deploy and rollback.

A deploy loads and checks the model in a thread, off the hot path; the loop swaps it in when it
is ready (between two ticks) and answers the request then. The loader hands its result to the
loop through a queue and wakes it through a pipe whose read end sits in the loop's ``select``
beside the sockets.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import zmq

from control_node import protocol as P
from control_node.config import NodeConfig
from control_node.node.serving import Server
from control_node.realtime import helper_thread
from models.policy import OnnxPolicy, PolicyError


class Loop(Protocol):
    """What admin needs of the loop."""

    state: str
    ticks: int
    deadline_misses: int

    def request_stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Admin:
    """Answer admin requests; deploy a model (live or shadow) or roll back to the previous."""

    def __init__(
        self,
        cfg: NodeConfig,
        sock: zmq.Socket,
        server: Server,
        node: Loop,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.sock, self.server, self.node, self.log = cfg, sock, server, node, log
        self.loaded: queue.SimpleQueue[tuple[bytes, bool, int, OnnxPolicy | str]] = (
            queue.SimpleQueue()
        )
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self._loading = False
        self._misses_at_request = 0
        self.previous: OnnxPolicy | None = None
        self.deploys: list[dict[str, Any]] = []

    def on_request(self, identity: bytes, frame: bytes) -> None:
        try:
            request = msgpack.unpackb(frame, raw=False)
            if not isinstance(request, dict) or request.get("v") != P.PROTOCOL_VERSION:
                raise ValueError("expected a map with v = 1")
            cmd = request.get("cmd")
            if cmd == "status":
                reply: dict[str, Any] = {"ok": True, "status": self.node.status()}
            elif cmd == "shutdown":
                self.node.request_stop()
                reply = {"ok": True, "status": self.node.status()}
            elif cmd == "deploy":
                reply = self._start_deploy(identity, request)
                if reply is None:
                    return  # answered when the model is loaded and swapped in
            elif cmd == "rollback":
                reply = self._rollback()
            else:
                reply = {"ok": False, "error": f"unknown admin command {cmd!r}"}
        except Exception as e:  # admin input is untrusted too: answer, never crash the loop
            reply = {"ok": False, "error": f"bad admin request: {e}"}
        self._reply(identity, reply)

    # -- deploy ---------------------------------------------------------------------------------
    def _start_deploy(self, identity: bytes, request: dict[str, Any]) -> dict[str, Any] | None:
        """Start the loader thread; None means the answer comes when it is done."""
        path, shadow = request.get("path"), bool(request.get("shadow", False))
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "deploy needs 'path': the ONNX model file"}
        if self._loading:
            return {"ok": False, "error": "another deploy is loading; try again when it is done"}
        if self.node.state != "running":
            return {"ok": False, "error": f"the node is {self.node.state}"}
        self._loading = True
        t_request = P.now_ns()
        self._misses_at_request = self.node.deadline_misses
        threading.Thread(
            target=self._load,
            args=(identity, path, shadow, t_request),
            name="deploy-loader",
            daemon=True,
        ).start()
        return None

    def _load(self, identity: bytes, path: str, shadow: bool, t_request: int) -> None:
        """Loader thread: the runtime policy's checks, plus the live model's (and so every
        connected bridge's) env, observation shape and action bounds. It runs at normal
        priority, so loading can never starve the real-time loop."""
        helper_thread()
        result: OnnxPolicy | str
        try:
            expect = self.server.policy.metadata.robot  # the live robot, every bridge's
            candidate = OnnxPolicy(path, expect=expect, provider=self.cfg.provider)
            result = candidate
        except PolicyError as e:
            result = str(e)
        except Exception as e:  # anything else is a refusal too; the old model keeps serving
            result = f"{path}: {type(e).__name__}: {e}"
        self.loaded.put((identity, shadow, t_request, result))
        os.write(self._wake_w, b"x")

    def finish_deploy(self) -> None:
        """The loop's side of a deploy: swap in what the loader queued, answer the request."""
        identity, shadow, t_request, result = self.loaded.get()
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 64)
        self._loading = False
        t_swap = P.now_ns()
        if isinstance(result, str):
            self.deploys.append({"ok": False, "error": result, "shadow": shadow})
            self.log(f"node: deploy refused: {result}")
            self._reply(identity, {"ok": False, "error": result})
            return
        server = self.server
        record: dict[str, Any] = {
            "ok": True,
            "model_id": result.model_id,
            "previous": server.model_id,
            "shadow": shadow,
            "path": str(result.path),
            "request_to_swap_ms": round((t_swap - t_request) / 1e6, 3),
            "at_tick": self.node.ticks,
            "misses_during_load": self.node.deadline_misses - self._misses_at_request,
            "t_request": t_request,
        }
        if shadow:
            server.shadow_with(result)
            self.log(f"node: shadowing {result.model_id} beside {server.model_id}")
        else:
            self.previous = server.policy
            server.serve(result, record)
            server.shadow_with(None)
            self.log(f"node: now serving {result.model_id} (was {record['previous']})")
        self.deploys.append(record)
        reply = {k: v for k, v in record.items() if k != "t_request"}
        self._reply(identity, {"ok": True, "deploy": reply})

    def _rollback(self) -> dict[str, Any]:
        if self.previous is None:
            return {"ok": False, "error": "no previous model to roll back to"}
        server = self.server
        old = server.model_id
        self.previous, current = server.policy, self.previous
        record = {"ok": True, "model_id": current.model_id, "previous": old, "rollback": True,
                  "at_tick": self.node.ticks, "t_request": P.now_ns()}  # fmt: skip
        server.serve(current, record)
        self.deploys.append(record)
        self.log(f"node: rolled back to {server.model_id} (from {old})")
        return {"ok": True, "deploy": {k: v for k, v in record.items() if k != "t_request"}}

    def _reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart([identity, msgpack.packb(reply)], zmq.NOBLOCK)

    def close(self) -> None:
        """Close the loader's wake-up pipe (safe to call twice)."""
        for fd in (self.wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wake_r = self._wake_w = None  # type: ignore[assignment]
