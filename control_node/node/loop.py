"""The control node's loop: serves an ONNX actor to any number of bridges on its own clock.

One thread owns the sockets and the policy. Between deadlines it waits in the clock
(``clock.py``), handling every message as it arrives (``sessions.py``); lockstep bridges are
answered at once. At each deadline (``next += period``, never ``sleep(period)``) the tick infers
the newest observation of every live realtime bridge in one batch and sends each its action
(``serving.py``). A deadline that passes while the node is busy is counted and skipped, never
caught up. Admin requests and deploys (``deploy.py``) are handled between ticks.
"""

from __future__ import annotations

import collections
import math
import select
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from control_node import protocol as P
from control_node import realtime
from control_node.admin import MAX_REQUEST_BYTES
from control_node.admin_token import TokenError
from control_node.config import NodeConfig
from control_node.node.bridges import Link
from control_node.node.clock import Clock, PhaseLock
from control_node.node.deploy import Admin
from control_node.node.serving import Server
from control_node.node.sessions import Sessions
from control_node.node.stats import Samples
from control_node.node.status import node_status
from control_node.translog.schema import LogSpec
from control_node.translog.writer import TransitionLog
from models.policy import OnnxPolicy, PolicyError

# plain ints: pyzmq's enum members cost ~0.5 µs per use in the drain
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
DRAIN_BATCH = 64
"""Bridge messages taken in a row before the drain looks at the admin socket and the loader."""
BRIDGE_HWM = 1000
"""Messages queued per bridge connection, each way: a peer that sends faster than the node
takes them in waits (or drops) at its end, not in the node's memory."""
ADMIN_HWM = 100


class NodeError(RuntimeError):
    """The node cannot start (bad model, address in use, ...); the message says why."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ControlNode:
    """Bind the sockets, load and check the model, open the log; :meth:`run` serves."""

    def __init__(self, cfg: NodeConfig, log: Callable[[str], None] = _stderr) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log
        try:
            policy = OnnxPolicy(
                cfg.model, provider=cfg.provider, max_bytes=round(cfg.max_model_mb * 2**20)
            )
        except PolicyError as e:
            raise NodeError(str(e)) from None
        safe = np.zeros(policy.act_dim) if cfg.safe_action is None else cfg.safe_action
        safe = np.asarray(safe, dtype=np.float32)
        if safe.shape != (policy.act_dim,):
            raise NodeError(
                f"safe_action has {safe.size} values; the model's actions have {policy.act_dim}"
            )
        meta = policy.metadata
        safe = np.clip(safe, meta.act_low, meta.act_high).astype(np.float32)
        P.set_timer_slack()
        # The log writer and a deploy's loader are threads: make them hand the GIL back to the
        # loop within 0.1 ms of its asking (Python's default is 5 ms, five 1 kHz periods).
        sys.setswitchinterval(1e-4)

        self.ctx = zmq.Context()
        obs_nbytes = math.prod(policy.obs_shape) * np.dtype(meta.obs_dtype).itemsize
        self.sock = self._bind(
            zmq.ROUTER, cfg.bind, "bind", BRIDGE_HWM, P.max_frame_bytes(obs_nbytes)
        )
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises, not vanishes
        self.admin_sock = self._bind(zmq.ROUTER, cfg.admin, "admin", ADMIN_HWM, MAX_REQUEST_BYTES)
        rejected: collections.Counter[str] = collections.Counter()  # sessions' and serving's
        self.link = Link(self.sock)
        self.server = Server(policy, safe, self.link, rejected)
        try:
            self.admin = Admin(cfg, self.admin_sock, self.server, self, log)
        except (TokenError, OSError) as e:
            for sock in (self.sock, self.admin_sock):
                sock.close(linger=0)
            self.ctx.term()
            raise NodeError(f"admin token: {e}") from None
        self.translog: TransitionLog | None = None
        if cfg.log_dir is not None:
            try:
                self.translog = TransitionLog(
                    Path(cfg.log_dir),
                    LogSpec.of(meta.robot),
                    cfg.chunk_seconds,
                    report=lambda line: log(f"node: {line}"),  # failing, and working again
                )
            except (OSError, ValueError) as e:
                self.close()
                raise NodeError(f"log_dir {cfg.log_dir!r}: {e}") from None
        self.sessions = Sessions(cfg, self.link, self.server, self, self.translog, rejected, log)
        fds = [self.sock.getsockopt(zmq.FD), self.admin_sock.getsockopt(zmq.FD)]
        self.clock = Clock(cfg, [*fds, self.admin.wake_r], self._drain)
        self.sessions.lockstep_answered = self.clock.hold
        # the hot path's callees, looked up once
        self._on_message, self._on_request = self.sessions.on_message, self.admin.on_request
        self._loaded = self.admin.loaded
        self.phase = PhaseLock(cfg)  # which bridge's observations the tick phase follows

        self.state = "ready"
        self.started_ns = P.now_ns()
        self.ticks = 0
        self.deadline_misses = 0
        self.tick_work = Samples()  # tick start -> last action sent
        self.tick_late = Samples()  # tick start - deadline
        self.tick_period = Samples()  # tick start - previous tick start
        self._last_tick_ns = 0
        self._drain_until = 0
        """The drain returns by this time (the next deadline) whatever is still queued."""
        self.realtime: dict[str, Any] = {}  # the real-time settings in effect, once running
        self.slack_gc: realtime.SlackGC | None = None

    def _bind(self, kind: int, address: str, key: str, hwm: int, max_frame: int) -> zmq.Socket:
        """A bound socket whose queues are bounded: ``hwm`` messages per peer each way, and a
        peer that sends a frame over ``max_frame`` bytes is disconnected by ZeroMQ before the
        frame is read into memory."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close()
            self.ctx.term()
            raise NodeError(f"cannot bind {key} {address}: {e.strerror}") from None
        return sock

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop stops at its next wake-up (within one period)."""
        self.clock.stopped = True

    def status(self) -> dict[str, Any]:
        return node_status(self)

    def _start_realtime(self) -> None:
        """Apply the real-time settings from the loop's own thread once start-up is done (the
        garbage collector freezes what start-up made); with gc freeze the clock collects in
        the slack before each deadline."""
        rt = self.cfg.realtime
        self.realtime = realtime.apply(rt, "node", lambda line: self.log(f"node: {line}"))
        if rt.gc == "freeze":
            self.slack_gc = realtime.SlackGC()
            self.clock.collect = self.slack_gc.collect

    # -- the hot path ---------------------------------------------------------------------------
    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Serve until :meth:`request_stop`, an admin shutdown or ``duration_s``; then say goodbye
        to the bridges, commit the log and return the final status."""
        self._start_realtime()
        clock = self.clock
        period = clock.period_ns
        start = P.now_ns()
        end = start + round(duration_s * 1e9) if duration_s else None
        next_tick = start + period
        self.state = "running"
        self.started_ns = start
        while not clock.stopped:
            self._drain_until = next_tick
            clock.wait(next_tick)  # handles messages as they come, until the deadline
            t_tick = P.now_ns()
            self.tick_late.add(t_tick - next_tick)
            if self._last_tick_ns:
                self.tick_period.add(t_tick - self._last_tick_ns)
            correction = self._tick(t_tick, next_tick)
            next_tick += period + correction
            now = P.now_ns()
            if now > next_tick:  # this tick overran one or more deadlines: skip them
                missed = (now - next_tick) // period + 1
                self.deadline_misses += missed
                next_tick += missed * period
            if end is not None and now >= end:
                break
        return self.shutdown()

    def _drain(self) -> None:
        """Receive what is queued on both sockets until both are empty (this also re-arms
        their edge-triggered file descriptors, which is why it runs before every select), the
        deadline (``_drain_until``) comes or a stop is asked for: a peer that sends without end
        can delay a tick by one message, never stop it. Bridge messages come first, up to
        ``DRAIN_BATCH`` in a row, then one admin request and a loaded deploy."""
        sock, admin_sock, loaded, clock = self.sock, self.admin_sock, self._loaded, self.clock
        on_message, now, until = self._on_message, P.now_ns, self._drain_until
        while True:
            more, budget = False, DRAIN_BATCH
            while sock.getsockopt(_EVENTS) & _POLLIN:
                frames = sock.recv_multipart(_NOBLOCK)
                t = now()
                on_message(frames[0], frames[1:], t)
                budget -= 1
                if not budget or t >= until:
                    more = True
                    break
            if admin_sock.getsockopt(_EVENTS) & _POLLIN:
                frames = admin_sock.recv_multipart(_NOBLOCK)
                self._on_request(frames[0], frames[-1])
                more = True
            if not loaded.empty():
                self.admin.finish_deploy()
                more = True
            if not more or clock.stopped or now() >= until:
                return

    def _tick(self, t_tick: int, deadline: int) -> int:
        """Answer the newest observation of every live realtime bridge; watch for silence.
        Returns the phase correction (ns) for the next deadline (this tick's was
        ``deadline``; it woke at ``t_tick``)."""
        self.ticks += 1
        ready = self.sessions.ready(t_tick)
        correction = 0
        if ready:
            last = self._last_tick_ns
            msgs, recv_ns = [], []
            for b in ready:
                t_recv = b.pending_recv_ns
                if t_recv >= last:
                    b.fresh += 1
                msgs.append(b.pending)
                recv_ns.append(t_recv)
            self.server.answer(ready, msgs, recv_ns)
            for b in ready:
                b.pending = None
            correction = self.phase.correction(ready, t_tick, deadline)
            self.tick_work.add(P.now_ns() - t_tick)
        self._last_tick_ns = t_tick
        return correction

    # -- stopping -------------------------------------------------------------------------------
    def shutdown(self, grace_s: float = 1.0) -> dict[str, Any]:
        """Say goodbye to live bridges, take in what they sent before they heard it (a bridge
        answers bye with its own, after its last observation), commit the log."""
        self.state = "stopping"
        live = self.sessions.say_goodbye()
        end = self._drain_until = P.now_ns() + round(grace_s * 1e9)
        self.clock.stopped = False
        while any(not b.gone and not b.stale for b in live) and P.now_ns() < end:
            self._drain()
            select.select(self.clock.fds, [], [], 0.005)
        self._drain_until = P.now_ns() + self.clock.period_ns  # a flood must not hold it here
        self._drain()
        if self.translog is not None:
            self.translog.close()
        self.state = "stopped"
        final = self.status()
        self.close()
        return final

    def close(self) -> None:
        if self.translog is not None:
            self.translog.close()
        self.admin.close()
        for sock in (self.sock, self.admin_sock):
            if not sock.closed:
                sock.close(linger=0)
        self.ctx.term()
