"""The admin socket, the node's side (``control_node.admin`` is the client): status, shutdown,
deploy and rollback.

Every request is parsed strictly (``control_node.admin.parse_request``); the changing ones
(deploy, rollback, shutdown) must carry the admin token the node wrote at start
(``control_node/admin_token.py``). A deploy loads and checks the model in a thread, off the hot
path, within bounds: a regular file of at most ``max_model_mb``, measured in a probe process of
its own (``models/footprint.py``: batch-1 inference time against ``max_inference_share`` of a
period, memory against ``max_model_memory_mb``), all within ``deploy_timeout_s``, after which
the slot is freed. The loop swaps a passed model in when it is ready (between two ticks) and
answers the request then. The loader hands its result to the loop through a queue and wakes it
through a pipe whose read end sits in the loop's ``select`` beside the sockets.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import zmq

from control_node import protocol as P
from control_node.admin import CHANGING, AdminRequest, RequestError, parse_request
from control_node.admin_token import create_token, remove_token
from control_node.config import NodeConfig
from control_node.node.serving import Server
from control_node.realtime import helper_thread
from models.policy import (
    OnnxPolicy,
    PolicyError,
    check_expected,
    load_checked_proto,
    read_model_file,
)


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
        self.loaded: queue.SimpleQueue[tuple[int, bytes, bool, int, OnnxPolicy | str, dict]] = (
            queue.SimpleQueue()
        )
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.token, self.token_path = create_token(cfg.admin)
        self._loading: tuple[int, bytes, int] | None = None  # (load id, requester, t_request)
        self._load_id = 0
        self._misses_at_request = 0
        self.previous: OnnxPolicy | None = None
        self.deploys: list[dict[str, Any]] = []
        self.refused_requests = 0
        self.unauthorized_requests = 0

    def on_request(self, identity: bytes, frame: bytes) -> None:
        try:
            req = parse_request(frame)
            if req.cmd in CHANGING and not hmac.compare_digest(
                req.token.encode(), self.token.encode()
            ):
                raise RequestError(
                    f"{req.cmd} needs the node's admin token (the file {self.token_path}, "
                    "readable by the node's user alone)",
                    "unauthorized",
                )
            if req.cmd == "status":
                reply: dict[str, Any] = {"ok": True, "status": self.node.status()}
            elif req.cmd == "shutdown":
                self.node.request_stop()
                reply = {"ok": True, "status": self.node.status()}
            elif req.cmd == "deploy":
                reply = self._start_deploy(identity, req)
                if reply is None:
                    return  # answered when the model is loaded and swapped in
            else:
                reply = self._rollback()
        except RequestError as e:
            self.refused_requests += 1
            self.unauthorized_requests += e.code == "unauthorized"
            reply = {"ok": False, "code": e.code, "error": f"bad admin request: {e}"}
        except Exception as e:  # admin input is untrusted too: answer, never crash the loop
            reply = {
                "ok": False,
                "code": "internal",
                "error": P.short(f"{type(e).__name__}: {e}", 300),
            }
        self._reply(identity, reply)

    # -- deploy ---------------------------------------------------------------------------------
    def _start_deploy(self, identity: bytes, req: AdminRequest) -> dict[str, Any] | None:
        """Start the loader thread; None means the answer comes when it is done. A loader past
        its deadline is given up first (its late result will be thrown away)."""
        if self._loading is not None:
            load_id, waiting, t0 = self._loading
            if P.now_ns() - t0 <= self.cfg.deploy_timeout_s * 1e9 + 5e9:
                return {"ok": False, "code": "busy",
                        "error": "another deploy is loading; try again when it is done"}  # fmt: skip
            self._give_up(waiting, load_id)
        if self.node.state != "running":
            return {"ok": False, "code": "refused", "error": f"the node is {self.node.state}"}
        self._load_id += 1
        t_request = P.now_ns()
        self._loading = (self._load_id, identity, t_request)
        self._misses_at_request = self.node.deadline_misses
        threading.Thread(
            target=self._load,
            args=(self._load_id, identity, req.path, req.shadow, t_request),
            name="deploy-loader",
            daemon=True,
        ).start()
        return None

    def _give_up(self, identity: bytes, load_id: int) -> None:
        error = f"deploy given up: its checks did not finish in {self.cfg.deploy_timeout_s:g} s"
        self.deploys.append({"ok": False, "error": error, "load_id": load_id})
        self.log(f"node: {error}")
        self._reply(identity, {"ok": False, "code": "refused", "error": error})
        self._loading = None

    def _load(self, load_id: int, identity: bytes, path: str, shadow: bool, t_request: int) -> None:
        """Loader thread: the file's bounds, the static checks and the live model's (so every
        connected bridge's) robot, the probe process's measurements, then the runtime policy
        from the same bytes. It runs at normal priority, so loading can never starve the
        real-time loop."""
        helper_thread()
        cfg = self.cfg
        result: OnnxPolicy | str
        footprint: dict[str, Any] = {}
        deadline = t_request + cfg.deploy_timeout_s * 1e9
        try:
            data = read_model_file(path, round(cfg.max_model_mb * 2**20))
            _, meta = load_checked_proto(data, path)
            check_expected(meta, self.server.policy.metadata.robot, path)
            footprint = self._measure(data, path, (deadline - P.now_ns()) / 1e9)
            result = OnnxPolicy(path, provider=cfg.provider, data=data)
        except PolicyError as e:
            result = str(e)
        except Exception as e:  # anything else is a refusal too; the old model keeps serving
            result = f"{path}: {type(e).__name__}: {e}"
        self.loaded.put((load_id, identity, shadow, t_request, result, footprint))
        os.write(self._wake_w, b"x")

    def _measure(self, data: bytes, path: str, timeout_s: float) -> dict[str, Any]:
        """Run ``models.footprint`` on the model's bytes; its figures, or PolicyError saying
        which limit the model breaks, by how much."""
        cfg = self.cfg
        period_us = 1e6 / cfg.rate_hz
        budget_us = cfg.max_inference_share * period_us
        pinned = cfg.realtime.cpus if isinstance(cfg.realtime.cpus, list) else []
        # the deadline is the bound (the probe is killed at it); the CPU-time cap, above it even
        # on an idle machine, only backs that kill up
        cpu_s = 2 * timeout_s + 1
        cpus = sorted(set(range(os.cpu_count() or 1)) - set(pinned))
        argv = [sys.executable, "-m", "models.footprint", "--max-memory-mb",
                str(cfg.max_model_memory_mb), "--cpu-s", f"{cpu_s:.3f}",
                "--give-up-us", str(budget_us), "--max-bytes", str(len(data)),
                "--cpus", ",".join(map(str, cpus)), "--provider", cfg.provider]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            out, _ = proc.communicate(data, timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise PolicyError(
                f"{path}: deploy given up: its checks did not finish in "
                f"{cfg.deploy_timeout_s:g} s (deploy_timeout_s)"
            ) from None
        try:
            fp = json.loads(out.decode().splitlines()[-1])
        except (ValueError, IndexError):
            raise PolicyError(
                f"{path}: the probe process died (exit status {proc.returncode}) before it "
                f"measured the model (over its CPU time of {cpu_s:.0f} s?)"
            ) from None
        limit = cfg.max_model_memory_mb
        if not fp["ok"]:
            if fp.get("memory"):
                alloc = fp.get("alloc_bytes")
                need = f"a buffer of {alloc / 2**20:.0f} MB" if alloc else "more memory"
                raise PolicyError(
                    f"{path}: refused: at {fp['stage']} it needs {need}, over the limit of "
                    f"{limit:g} MB (max_model_memory_mb)"
                )
            raise PolicyError(fp["error"] if fp.get("policy_error") else f"{path}: {fp['error']}")
        p50 = fp["infer_us_p50"]
        if p50 > budget_us:
            raise PolicyError(
                f"{path}: refused: batch-1 inference takes {p50 / 1e3:.2f} ms (median of "
                f"{fp['runs']} runs on probes), over the budget of {budget_us / 1e3:.2f} ms "
                f"(max_inference_share {cfg.max_inference_share:g} of a {period_us / 1e3:g} ms "
                "period)"
            )
        if fp["peak_mb"] > limit:
            raise PolicyError(
                f"{path}: refused: checking and running it took {fp['peak_mb']:.0f} MB, over "
                f"the limit of {limit:g} MB (max_model_memory_mb)"
            )
        return {k: fp[k] for k in ("infer_us_p50", "infer_us_p99", "peak_mb")}

    def finish_deploy(self) -> None:
        """The loop's side of a deploy: swap in what the loader queued, answer the request."""
        load_id, identity, shadow, t_request, result, footprint = self.loaded.get()
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 64)
        if self._loading is None or self._loading[0] != load_id:
            return  # given up before it finished: nobody waits for it
        self._loading = None
        t_swap = P.now_ns()
        if isinstance(result, str):
            misses = self.node.deadline_misses - self._misses_at_request
            self.deploys.append(
                {"ok": False, "error": result, "shadow": shadow, "misses_during_load": misses}
            )
            self.log(f"node: deploy refused: {P.short(result, 400)}")
            self._reply(identity, {"ok": False, "code": "refused", "error": result})
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
            "footprint": footprint,
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
            return {"ok": False, "code": "refused", "error": "no previous model to roll back to"}
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
        """Close the loader's wake-up pipe and remove the token file (safe to call twice)."""
        for fd in (self.wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wake_r = self._wake_w = None  # type: ignore[assignment]
        remove_token(self.token_path, self.token)
