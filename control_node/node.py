"""The control node: serves an ONNX actor to any number of bridges on its own fixed-rate clock.

One thread owns the sockets and the policy. Between deadlines it sleeps in ``select`` on the
ZeroMQ file descriptors, so it wakes for every message: observations are checked, turned into
logged transitions, and kept as their bridge's newest; lockstep bridges are answered at once.
At each deadline (``next += period``, never ``sleep(period)``) the tick infers the newest
observation of every live realtime bridge in one batch and sends each its action. A deadline
that passes while the node is busy is counted and skipped, never caught up.

The tick phase is locked to fast realtime bridges: the node nudges its next deadline so that it
runs ``phase_margin_us`` after their observations arrive, so each tick answers an observation
made since the previous one, as young as possible.

Safety: actions are clipped to the model's bounds; a non-finite observation (or output) gets
the safe action, flagged and counted; a bridge silent for longer than the watchdog is stale
until it speaks again. Every message that fails to parse or validate is answered with an error
naming the reason and counted by code; serving goes on.
"""

from __future__ import annotations

import array
import collections
import contextlib
import math
import os
import queue
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq

from control_node import protocol as P
from control_node.config import NodeConfig
from control_node.translog import LogSpec, Transition, TransitionLog
from models.policy import OnnxPolicy, PolicyError, check_expected, pixel_spec_dict


class NodeError(RuntimeError):
    """The node cannot start (bad model, address in use, ...); the message says why."""


class Samples:
    """Durations (ns) in logarithmic buckets 1% wide: adding is O(1) on the hot path and a
    summary costs microseconds, so ``ddpg status --watch`` never disturbs the clock."""

    RATIO = 1.01
    BUCKETS = 2400  # 1.01 ** 2400 ns is far beyond any duration we time

    def __init__(self) -> None:
        self.counts = array.array("q", bytes(8 * self.BUCKETS))
        self.count = 0
        self.total = 0
        self.total_sq = 0
        self.max = 0
        self._scale = 1.0 / math.log(self.RATIO)

    def add(self, value: int) -> None:
        i = int(math.log(value) * self._scale) if value > 1 else 0
        self.counts[min(i, self.BUCKETS - 1)] += 1
        self.count += 1
        self.total += value
        self.total_sq += value * value
        if value > self.max:
            self.max = value

    def summary_us(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "std": 0.0, "n": 0}
        cumulative = np.cumsum(np.frombuffer(self.counts, dtype=np.int64))
        p50, p99 = (
            self.RATIO ** (int(np.searchsorted(cumulative, q * n)) + 0.5) / 1e3 for q in (0.5, 0.99)
        )
        mean = self.total / n
        std = math.sqrt(max(self.total_sq / n - mean * mean, 0.0))
        return {
            "p50": round(min(p50, self.max / 1e3), 1),
            "p99": round(min(p99, self.max / 1e3), 1),
            "max": round(self.max / 1e3, 1),
            "std": round(std / 1e3, 1),
            "n": n,
        }


class SentAction(NamedTuple):
    """What the node remembers of an action it sent, until the transition that used it."""

    model_id: str
    safe: bool
    t_send: int
    episode: int
    step: int
    """The observation it answered."""
    shadow_model_id: str
    shadow_action: np.ndarray | None


class ShadowStats:
    """How far a shadow candidate's actions are from the live ones (L-inf per action)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.over_10pct = 0  # actions differing by more than 10% of the action range

    def add(self, diffs: np.ndarray, ranges: np.ndarray) -> None:
        if diffs.size == 0:
            return
        per_action = diffs.max(axis=1)
        self.count += len(per_action)
        self.total += float(per_action.sum())
        self.max = max(self.max, float(per_action.max()))
        self.over_10pct += int((diffs > 0.1 * ranges).any(axis=1).sum())

    def summary(self) -> dict[str, float]:
        n = self.count
        return {
            "actions": n,
            "mean_abs_diff": self.total / n if n else 0.0,
            "max_abs_diff": self.max,
            "share_over_10pct_of_range": self.over_10pct / n if n else 0.0,
        }


UNKNOWN_ACTION = SentAction("", True, 0, -1, -1, "", None)
"""An applied action the node did not send (the bridge's own safe action, or too old)."""


@dataclass
class BridgeState:
    """What the node knows about one connected bridge."""

    bridge_id: str
    identity: bytes
    session: str
    mode: str
    rate_hz: float
    pid: int
    last_seen_ns: int
    stale: bool = False
    pending: P.Message | None = None
    """Newest observation not yet answered (realtime)."""
    pending_recv_ns: int = 0
    prev: P.Message | None = None
    """Previous observation of the running episode: the start of the next transition."""
    seq: int = 0
    sent: dict[int, SentAction] = field(default_factory=dict)
    """Recent actions by sequence number, to label logged transitions."""
    episode: int = -1
    ep_return: float = 0.0
    ep_length: int = 0
    ep_models: set[str] = field(default_factory=set)
    observations: int = 0
    answered: int = 0
    fresh: int = 0
    superseded: int = 0
    transitions: int = 0
    on_time: int = 0
    """Transitions whose applied action answered the transition's own observation."""
    gaps: int = 0
    episodes: int = 0
    last_return: float | None = None
    reported_sent: int | None = None
    gone: bool = False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ControlNode:
    """Bind the sockets, load and check the model, open the log; :meth:`run` serves."""

    def __init__(self, cfg: NodeConfig, log: Callable[[str], None] = _stderr) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log
        try:
            self.policy = OnnxPolicy(cfg.model, provider=cfg.provider)
        except PolicyError as e:
            raise NodeError(str(e)) from None
        meta = self.policy.metadata
        self.model_id = meta.model_id
        self.model_ids = {self.model_id}  # every model that has served here
        self.act_low, self.act_high = meta.act_low, meta.act_high
        # fixed for the node's life: a deploy must match it (check_expected on the live spec)
        self.obs_dtype = np.dtype(meta.obs_dtype)
        self._float_obs = self.obs_dtype.kind == "f"  # only floats can be non-finite
        safe = np.zeros(self.policy.act_dim) if cfg.safe_action is None else cfg.safe_action
        safe = np.asarray(safe, dtype=np.float32)
        if safe.shape != (self.policy.act_dim,):
            raise NodeError(
                f"safe_action has {safe.size} values; the model's actions have "
                f"{self.policy.act_dim}"
            )
        self.safe_action = np.clip(safe, self.act_low, self.act_high).astype(np.float32)
        self.period_ns = round(1e9 / cfg.rate_hz)
        P.set_timer_slack()
        # The log writer and a deploy's loader are threads: make them hand the GIL back to the
        # loop within 0.1 ms of its asking (Python's default is 5 ms, five 1 kHz periods).
        sys.setswitchinterval(1e-4)

        self.ctx = zmq.Context()
        self.sock = self._bind(zmq.ROUTER, cfg.bind, "bind")
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises, not vanishes
        self.admin = self._bind(zmq.ROUTER, cfg.admin, "admin")
        # a loader thread hands finished deploys to the loop through this queue and wakes it
        # through the pipe (its read end sits in the loop's select beside the sockets)
        self._loaded: queue.SimpleQueue[tuple[bytes, bool, int, OnnxPolicy | str]] = (
            queue.SimpleQueue()
        )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._loading = False
        self._misses_at_request = 0
        self.previous: OnnxPolicy | None = None
        self.shadow: OnnxPolicy | None = None
        self.shadow_stats = ShadowStats()
        self.deploys: list[dict[str, Any]] = []
        self._first_action_of: dict[str, Any] | None = None
        self.fds = [self.sock.getsockopt(zmq.FD), self.admin.getsockopt(zmq.FD), self._wake_r]

        self.translog: TransitionLog | None = None
        if cfg.log_dir is not None:
            spec = LogSpec(
                env_id=meta.env_id,
                obs_shape=tuple(meta.obs_shape),
                obs_dtype=meta.obs_dtype,
                act_low=tuple(float(x) for x in meta.act_low),
                act_high=tuple(float(x) for x in meta.act_high),
                pixels=meta.pixels,  # pixel models: each frame stored once (see translog)
            )
            try:
                self.translog = TransitionLog(Path(cfg.log_dir), spec, cfg.chunk_seconds)
            except (OSError, ValueError) as e:
                self.close()
                raise NodeError(f"log_dir {cfg.log_dir!r}: {e}") from None

        self.bridges: dict[str, BridgeState] = {}
        self.by_identity: dict[bytes, BridgeState] = {}
        self.state = "ready"
        self._stop = False
        self.started_ns = P.now_ns()
        self.ticks = 0
        self.deadline_misses = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.last_rejections: collections.deque[str] = collections.deque(maxlen=5)
        self.safe_actions = 0
        self.non_finite_obs = 0
        self.stale_events = 0
        self.latency = Samples()  # observation received -> its action sent (per observation)
        self.obs_age = Samples()  # observation made (bridge clock) -> its action sent
        self.tick_work = Samples()  # tick start -> last action sent
        self.tick_late = Samples()  # tick start - deadline
        self.tick_period = Samples()  # tick start - previous tick start
        self.log_handoff = Samples()
        self.episode_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.returns_by_model: dict[str, list[float]] = collections.defaultdict(list)
        self.episodes = 0
        self._last_tick_ns = 0
        self._phase_err: list[int] = []

    def _bind(self, kind: int, address: str, key: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close()
            self.ctx.term()
            raise NodeError(f"cannot bind {key} {address}: {e.strerror}") from None
        return sock

    # -- the loop -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Safe from a signal handler: the loop stops at its next wake-up (within one period)."""
        self._stop = True

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Serve until :meth:`request_stop`, an admin shutdown or ``duration_s``; then say goodbye
        to the bridges, commit the log and return the final status."""
        period = self.period_ns
        spin = round(self.cfg.spin_us * 1e3)
        start = P.now_ns()
        end = start + round(duration_s * 1e9) if duration_s else None
        next_tick = start + period
        self.state = "running"
        self.started_ns = start
        while not self._stop:
            self._wait_until(next_tick - spin)
            while P.now_ns() < next_tick and not self._stop:  # busy stretch (spin_us > 0)
                self._drain()
            t_tick = P.now_ns()
            self.tick_late.add(t_tick - next_tick)
            if self._last_tick_ns:
                self.tick_period.add(t_tick - self._last_tick_ns)
            correction = self._tick(t_tick)
            next_tick += period + correction
            now = P.now_ns()
            if now > next_tick:  # this tick overran one or more deadlines: skip them
                missed = (now - next_tick) // period + 1
                self.deadline_misses += missed
                next_tick += missed * period
            if end is not None and now >= end:
                break
        return self.shutdown()

    def _wait_until(self, t_target: int) -> None:
        """Handle messages as they arrive until ``t_target`` (sleeping in select in between)."""
        while True:
            self._drain()
            if self._stop:
                return
            remaining = t_target - P.now_ns()
            if remaining <= 0:
                return
            select.select(self.fds, [], [], remaining / 1e9)

    def _drain(self) -> None:
        """Receive everything queued on both sockets (this also re-arms their edge-triggered
        file descriptors, which is why it runs before every select)."""
        sock, admin = self.sock, self.admin
        while True:
            busy = False
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = sock.recv_multipart(zmq.NOBLOCK)
                self._on_bridge_message(frames[0], frames[1:], P.now_ns())
                busy = True
            if admin.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = admin.recv_multipart(zmq.NOBLOCK)
                self._on_admin(frames[0], frames[-1])
                busy = True
            if not self._loaded.empty():
                self._finish_deploy(*self._loaded.get())
                busy = True
            if not busy:
                return

    def _tick(self, t_tick: int) -> int:
        """Answer the newest observation of every live realtime bridge; watch for silence.
        Returns the phase correction (ns) for the next deadline."""
        self.ticks += 1
        ready: list[BridgeState] = []
        watchdog = round(self.cfg.watchdog_ms * 1e6)
        for b in self.bridges.values():
            if b.gone:
                continue
            if not b.stale and t_tick - b.last_seen_ns > watchdog:
                b.stale, b.pending = True, None
                self.stale_events += 1
                self.log(
                    f"node: bridge {b.bridge_id} is stale (silent > {self.cfg.watchdog_ms} ms)"
                )
            if b.pending is not None:
                ready.append(b)
        correction = 0
        if ready:
            phase_lock = 0.5 * self.cfg.rate_hz
            errors = []
            for b in ready:
                if b.pending_recv_ns >= self._last_tick_ns:
                    b.fresh += 1
                if b.rate_hz >= phase_lock:
                    errors.append(t_tick - b.pending_recv_ns)
            msgs = [b.pending for b in ready]
            self._answer(ready, msgs, [b.pending_recv_ns for b in ready], t_tick)  # type: ignore[arg-type]
            for b in ready:
                b.pending = None
            if errors:
                correction = self._phase_correction(max(errors))
            self.tick_work.add(P.now_ns() - t_tick)
        self._last_tick_ns = t_tick
        return correction

    def _phase_correction(self, lag: int) -> int:
        """Move the next deadline so ticks run just after the observations arrive.

        ``lag`` is how long before this tick the answered observation arrived. More than half a
        period means it arrived just after the previous tick, which it missed: jump later, past
        that arrival plus the margin. Otherwise creep earlier, a little per tick, toward the
        margin. The balance of rare jumps and slow creep keeps the tick after the arrival on
        almost every period even when arrivals jitter by more than the margin, and keeps the
        observation as young as that jitter allows.
        """
        period, margin = self.period_ns, round(self.cfg.phase_margin_us * 1e3)
        if lag > period // 2:
            return min(period - lag + margin, period // 4)
        if lag <= margin:
            return 0
        return -min((lag - margin) // 10, max(period // 2000, 500))

    # -- bridge messages ------------------------------------------------------------------------
    def _on_bridge_message(self, identity: bytes, frames: list[bytes], t_recv: int) -> None:
        try:
            msg = P.decode(frames)
            if msg.type == P.OBS:
                bridge = self.by_identity.get(identity)
                if bridge is None or bridge.gone or bridge.bridge_id != msg["bridge_id"]:
                    raise P.ProtocolError(
                        "unknown_bridge",
                        f"bridge {msg['bridge_id']!r} has not said hello on this connection; "
                        "send hello first",
                    )
                self._check_obs(msg)
                self._on_obs(bridge, msg, t_recv)
            elif msg.type == P.HELLO:
                if self.state != "running":
                    raise P.ProtocolError("stopping", "the node is stopping; try again later")
                self._on_hello(identity, msg, t_recv)
            elif msg.type == P.BYE:
                bridge = self.by_identity.get(identity)
                if bridge is not None:
                    bridge.gone = True
                    bridge.pending = None
                    sent = msg.fields.get("transitions_sent")
                    bridge.reported_sent = sent if isinstance(sent, int) else None
                    self.log(f"node: bridge {bridge.bridge_id} said goodbye ({msg['reason']})")
            else:
                raise P.ProtocolError(
                    "bad_type", f"a node accepts hello, obs and bye, not {msg.type!r}"
                )
        except P.ProtocolError as e:
            self._reject(identity, e)
        except Exception as e:  # a bug must not stop the loop: count it, answer, keep serving
            self._reject(identity, P.ProtocolError("internal", f"{type(e).__name__}: {e}"))

    def _reject(self, identity: bytes, e: P.ProtocolError) -> None:
        if e.code != "stopping":  # a hello during shutdown is not a fault of the bridge
            self.rejected[e.code] += 1
            self.last_rejections.append(f"{e.code}: {e.reason}")
        self._send(identity, P.error(e.code, e.reason))

    def _send(self, identity: bytes, frames: list[bytes | memoryview]) -> bool:
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # peer gone (ROUTER_MANDATORY) or its queue full: drop, not block
            bridge = self.by_identity.get(identity)
            if bridge is not None and not bridge.stale:
                bridge.stale = True
                self.stale_events += 1
            return False

    def _on_hello(self, identity: bytes, msg: P.Message, t_recv: int) -> None:
        meta = self.policy.metadata
        if msg["mode"] not in P.MODES:
            raise P.ProtocolError(
                "bad_field", f"hello: mode {msg['mode']!r} is not one of {P.MODES}"
            )
        if msg["obs_dtype"] != meta.obs_dtype:
            raise P.ProtocolError(
                "spec_mismatch",
                f"bridge observations are {msg['obs_dtype']}; the model takes {meta.obs_dtype}",
            )
        pixels = msg.fields.get("pixels")
        if pixels is not None and not isinstance(pixels, dict):
            raise P.ProtocolError("bad_field", f"hello: pixels = {pixels!r} is not a map or nil")
        try:
            spec = _HelloSpec(
                msg["env_id"],
                tuple(int(d) for d in msg["obs_shape"]),
                np.asarray(msg["act_low"], dtype=np.float32),
                np.asarray(msg["act_high"], dtype=np.float32),
                msg["obs_dtype"],
                pixels,
            )
        except (TypeError, ValueError) as e:
            raise P.ProtocolError("bad_field", f"hello: malformed spec: {e}") from None
        try:
            check_expected(meta, spec, f"model {self.model_id}")
        except PolicyError as e:
            raise P.ProtocolError("spec_mismatch", str(e)) from None
        bridge_id = msg["bridge_id"]
        old = self.bridges.get(bridge_id)
        if old is not None and not (old.gone or old.stale or old.session == msg["session"]):
            raise P.ProtocolError(
                "duplicate_bridge",
                f"bridge id {bridge_id!r} is already connected and live (another process?)",
            )
        if old is not None:
            self.by_identity.pop(old.identity, None)
        bridge = BridgeState(
            bridge_id,
            identity,
            msg["session"],
            msg["mode"],
            float(msg["rate_hz"]),
            msg["pid"],
            t_recv,
        )
        if old is not None and old.session == msg["session"]:  # a reconnect: keep the accounts
            for name in ("seq", "episode", "ep_return", "ep_length", "ep_models", "episodes"):
                setattr(bridge, name, getattr(old, name))
            for name in (
                "observations",
                "answered",
                "fresh",
                "superseded",
                "transitions",
                "on_time",
                "gaps",
            ):
                setattr(bridge, name, getattr(old, name))
            bridge.last_return = old.last_return
        self.bridges[bridge_id] = bridge
        self.by_identity[identity] = bridge
        self.log(
            f"node: bridge {bridge_id} connected ({msg['mode']}, {msg['env_id']}, pid {msg['pid']})"
        )
        self._send(
            identity,
            P.encode(
                P.WELCOME,
                {
                    "model_id": self.model_id,
                    "rate_hz": self.cfg.rate_hz,
                    "watchdog_ms": self.cfg.watchdog_ms,
                    "pid": os.getpid(),
                },
                {"safe_action": self.safe_action},
            ),
        )

    def _check_obs(self, msg: P.Message) -> None:
        obs = msg.arrays["obs"]
        shape = self.policy.obs_shape
        if obs.shape != shape or obs.dtype != self.obs_dtype:
            raise P.ProtocolError(
                "bad_shape",
                f"obs: observation is {obs.dtype} {list(obs.shape)}; the model takes "
                f"{self.obs_dtype} {list(shape)}",
            )
        action = msg.arrays.get("action")
        if msg["step"] > 0:
            if action is None:
                raise P.ProtocolError(
                    "bad_array", "obs: step > 0 needs the 'action' that produced it"
                )
            if action.shape != (self.policy.act_dim,) or action.dtype != np.float32:
                raise P.ProtocolError(
                    "bad_shape",
                    f"obs: applied action is {action.dtype} {list(action.shape)}; expected "
                    f"float32 [{self.policy.act_dim}]",
                )
        if msg["step"] < 0 or msg["episode"] < 0:
            raise P.ProtocolError("bad_field", "obs: episode and step must be >= 0")

    def _on_obs(self, b: BridgeState, msg: P.Message, t_recv: int) -> None:
        b.last_seen_ns = t_recv
        if b.stale:
            b.stale = False
            self.log(f"node: bridge {b.bridge_id} resumed")
        episode, step = msg["episode"], msg["step"]
        prev = b.prev
        if prev is not None and (prev["episode"], prev["step"]) == (episode, step):
            if b.mode == "lockstep":  # a resend after a lost answer: answer again, log nothing
                self._answer([b], [msg], [t_recv], t_recv)
            b.gaps += 1
            return
        terminal = msg["terminated"] or msg["truncated"]
        if step == 0 or episode != b.episode:
            b.episode, b.ep_return, b.ep_length, b.ep_models = episode, 0.0, 0, set()
        if step > 0:
            if prev is not None and prev["episode"] == episode and prev["step"] == step - 1:
                self._log_transition(b, prev, msg)
            else:
                b.gaps += 1
            b.ep_return += float(msg["reward"])
            b.ep_length += 1
        if terminal:
            self._end_episode(b)
            b.prev = b.pending = None
            return
        b.prev = msg
        b.observations += 1
        if b.mode == "lockstep":
            self._answer([b], [msg], [t_recv], t_recv)
            b.fresh += 1
        else:
            if b.pending is not None:
                b.superseded += 1
            b.pending, b.pending_recv_ns = msg, t_recv

    def _log_transition(self, b: BridgeState, prev: P.Message, msg: P.Message) -> None:
        seq = msg["applied_seq"]
        sent = b.sent.get(seq, UNKNOWN_ACTION)
        model_id, t_action = sent.model_id, sent.t_send
        safe = sent.safe or msg["applied_safe"]
        if (sent.episode, sent.step) == (prev["episode"], prev["step"]):
            b.on_time += 1
        if model_id and not msg["applied_safe"]:  # the bridge's own safe steps label nothing
            b.ep_models.add(model_id)
        b.transitions += 1
        if self.translog is None:
            return
        t0 = P.now_ns()
        self.translog.append(
            Transition(
                bridge_id=b.bridge_id,
                bridge_session=b.session,
                episode=msg["episode"],
                step=prev["step"],
                obs=prev.arrays["obs"],
                action=msg.arrays["action"],
                reward=float(msg["reward"]),
                next_obs=msg.arrays["obs"],
                terminated=bool(msg["terminated"]),
                truncated=bool(msg["truncated"]),
                model_id=model_id,
                safe_action=bool(safe),
                action_seq=seq,
                t_obs_ns=prev["t_obs_ns"],
                t_action_ns=t_action,
                t_next_obs_ns=msg["t_obs_ns"],
                shadow_model_id=sent.shadow_model_id,
                shadow_action=sent.shadow_action,
            )
        )
        self.log_handoff.add(P.now_ns() - t0)

    def _end_episode(self, b: BridgeState) -> None:
        b.episodes += 1
        self.episodes += 1
        b.last_return = b.ep_return
        models = sorted(b.ep_models)
        label = models[0] if len(models) == 1 else "mixed" if models else "safe"
        self.returns_by_model[label].append(b.ep_return)
        self.episode_log.append(
            {
                "bridge": b.bridge_id,
                "episode": b.episode,
                "return": b.ep_return,
                "length": b.ep_length,
                "model_id": label,
            }
        )

    def _answer(
        self, bridges: list[BridgeState], msgs: list[P.Message], recv_ns: list[int], t_tick: int
    ) -> None:
        """Infer all observations in one batch and send each bridge its action."""
        check = self._float_obs  # uint8 frames are always finite: no pass over them
        if len(msgs) == 1:
            obs = msgs[0].arrays["obs"]
            finite = np.array([not check or np.isfinite(obs).all()])
            actions = (self.policy(obs) if finite[0] else self.safe_action)[None]
        else:
            batch = np.stack([m.arrays["obs"] for m in msgs])
            finite = np.ones(len(msgs), dtype=bool)
            if check:
                finite = np.isfinite(batch).reshape(len(msgs), -1).all(axis=1)
                batch[~finite] = 0.0
            actions = self.policy(batch)
        ok = finite & np.isfinite(actions).all(axis=1)
        if not ok.all():
            self.non_finite_obs += int((~finite).sum())
            actions = np.where(ok[:, None], actions, self.safe_action)
        actions = np.clip(actions, self.act_low, self.act_high).astype(np.float32, copy=False)
        shadow_actions = None
        if self.shadow is not None:  # the candidate answers too; only the live action is sent
            obs_batch = np.stack([m.arrays["obs"] for m in msgs])
            obs_batch[~finite] = 0.0
            shadow_actions = np.clip(self.shadow(obs_batch), self.act_low, self.act_high)
            self.shadow_stats.add(
                np.abs(shadow_actions - actions)[ok], self.act_high - self.act_low
            )
        shadow_id = self.shadow.model_id if self.shadow is not None else ""
        for i, (b, msg, t_recv, action, good) in enumerate(
            zip(bridges, msgs, recv_ns, actions, ok, strict=True)
        ):
            b.seq += 1
            safe = not bool(good)
            t_send = P.now_ns()
            fields = {
                "seq": b.seq,
                "episode": msg["episode"],
                "step": msg["step"],
                "model_id": self.model_id,
                "safe": safe,
                "t_obs_ns": msg["t_obs_ns"],
                "t_recv_ns": t_recv,
                "t_send_ns": t_send,
            }
            if safe:
                self.safe_actions += 1
                self.rejected["non_finite"] += 1
                fields["note"] = "non-finite observation or action: safe action sent"
            self._send(b.identity, P.encode(P.ACTION, fields, {"action": action}))
            shadow = None if shadow_actions is None else shadow_actions[i]
            b.sent[b.seq] = SentAction(
                self.model_id, safe, t_send, msg["episode"], msg["step"], shadow_id, shadow
            )
            if len(b.sent) > 512:
                for old in [s for s in b.sent if s <= b.seq - 256]:
                    del b.sent[old]
            b.answered += 1
            self.obs_age.add(t_send - msg["t_obs_ns"])
            self.latency.add(t_send - t_recv)
        if self._first_action_of is not None and not all(not g for g in ok):
            deploy, self._first_action_of = self._first_action_of, None
            deploy["request_to_first_action_ms"] = round(
                (P.now_ns() - deploy["t_request"]) / 1e6, 3
            )

    # -- admin ----------------------------------------------------------------------------------
    def _on_admin(self, identity: bytes, frame: bytes) -> None:
        try:
            request = msgpack.unpackb(frame, raw=False)
            if not isinstance(request, dict) or request.get("v") != P.PROTOCOL_VERSION:
                raise ValueError("expected a map with v = 1")
            cmd = request.get("cmd")
            if cmd == "status":
                reply: dict[str, Any] = {"ok": True, "status": self.status()}
            elif cmd == "shutdown":
                self.request_stop()
                reply = {"ok": True, "status": self.status()}
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
        self._admin_reply(identity, reply)

    # -- deploy ---------------------------------------------------------------------------------
    def _start_deploy(self, identity: bytes, request: dict[str, Any]) -> dict[str, Any] | None:
        """Load and check the model in a thread, off the hot path; the loop swaps it in when
        it is ready (between two ticks) and answers the request then."""
        path, shadow = request.get("path"), bool(request.get("shadow", False))
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "deploy needs 'path': the ONNX model file"}
        if self._loading:
            return {"ok": False, "error": "another deploy is loading; try again when it is done"}
        if self.state != "running":
            return {"ok": False, "error": f"the node is {self.state}"}
        self._loading = True
        t_request = P.now_ns()
        self._misses_at_request = self.deadline_misses
        threading.Thread(
            target=self._load, args=(identity, path, shadow, t_request), daemon=True
        ).start()
        return None

    def _load(self, identity: bytes, path: str, shadow: bool, t_request: int) -> None:
        """Loader thread: the runtime policy's checks, plus the live model's (and so every
        connected bridge's) env, observation shape and action bounds."""
        result: OnnxPolicy | str
        try:
            candidate = OnnxPolicy(path, expect=_spec_of(self.policy), provider=self.cfg.provider)
            result = candidate
        except PolicyError as e:
            result = str(e)
        except Exception as e:  # anything else is a refusal too; the old model keeps serving
            result = f"{path}: {type(e).__name__}: {e}"
        self._loaded.put((identity, shadow, t_request, result))
        os.write(self._wake_w, b"x")

    def _finish_deploy(
        self, identity: bytes, shadow: bool, t_request: int, result: OnnxPolicy | str
    ) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 64)
        self._loading = False
        t_swap = P.now_ns()
        if isinstance(result, str):
            self.deploys.append({"ok": False, "error": result, "shadow": shadow})
            self.log(f"node: deploy refused: {result}")
            self._admin_reply(identity, {"ok": False, "error": result})
            return
        record: dict[str, Any] = {
            "ok": True,
            "model_id": result.model_id,
            "previous": self.model_id,
            "shadow": shadow,
            "path": str(result.path),
            "request_to_swap_ms": round((t_swap - t_request) / 1e6, 3),
            "at_tick": self.ticks,
            "misses_during_load": self.deadline_misses - self._misses_at_request,
            "t_request": t_request,
        }
        if shadow:
            self.shadow, self.shadow_stats = result, ShadowStats()
            self.log(f"node: shadowing {result.model_id} beside {self.model_id}")
        else:
            self.previous, self.policy, self.shadow = self.policy, result, None
            self.model_id = result.model_id
            self.model_ids.add(result.model_id)
            self._first_action_of = record
            self.log(f"node: now serving {result.model_id} (was {record['previous']})")
        self.deploys.append(record)
        reply = {k: v for k, v in record.items() if k != "t_request"}
        self._admin_reply(identity, {"ok": True, "deploy": reply})

    def _rollback(self) -> dict[str, Any]:
        if self.previous is None:
            return {"ok": False, "error": "no previous model to roll back to"}
        old = self.model_id
        self.policy, self.previous = self.previous, self.policy
        self.model_id = self.policy.model_id
        self.model_ids.add(self.model_id)
        record = {"ok": True, "model_id": self.model_id, "previous": old, "rollback": True,
                  "at_tick": self.ticks, "t_request": P.now_ns()}  # fmt: skip
        self._first_action_of = record
        self.deploys.append(record)
        self.log(f"node: rolled back to {self.model_id} (from {old})")
        return {"ok": True, "deploy": {k: v for k, v in record.items() if k != "t_request"}}

    def _admin_reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.admin.send_multipart([identity, msgpack.packb(reply)], zmq.NOBLOCK)

    def status(self) -> dict[str, Any]:
        now = P.now_ns()
        uptime = (now - self.started_ns) / 1e9
        all_ticks = self.ticks + self.deadline_misses
        observations = sum(b.observations for b in self.bridges.values())
        fresh = sum(b.fresh for b in self.bridges.values())
        on_time = sum(b.on_time for b in self.bridges.values())
        transitions = sum(b.transitions for b in self.bridges.values())
        log = self.translog
        returns = [r for rs in self.returns_by_model.values() for r in rs]
        return {
            "state": self.state,
            "pid": os.getpid(),
            "model_id": self.model_id,
            "model_ids": sorted(self.model_ids),
            "model": str(self.cfg.model),
            "env_id": self.policy.metadata.env_id,
            "rate_hz": self.cfg.rate_hz,
            "uptime_s": round(uptime, 3),
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "miss_ratio": self.deadline_misses / all_ticks if all_ticks else 0.0,
            "achieved_rate_hz": round(self.ticks / uptime, 2) if uptime > 0 else 0.0,
            "rejected_messages": sum(self.rejected.values()),
            "rejected_by_code": dict(self.rejected),
            "last_rejections": list(self.last_rejections),
            "safe_actions": self.safe_actions,
            "non_finite_observations": self.non_finite_obs,
            "stale_events": self.stale_events,
            "latency_us": self.latency.summary_us(),
            "obs_age_us": self.obs_age.summary_us(),
            "tick_work_us": self.tick_work.summary_us(),
            "tick_lateness_us": self.tick_late.summary_us(),
            "tick_period_us": self.tick_period.summary_us(),
            "log_handoff_us": self.log_handoff.summary_us(),
            "fresh_ratio": fresh / observations if observations else 0.0,
            "on_time_ratio": on_time / transitions if transitions else 0.0,
            "transitions_logged": log.transitions_committed if log else 0,
            "transitions_seen": transitions,
            "log": None
            if log is None
            else {
                "dir": str(self.cfg.log_dir),
                "appended": log.transitions_appended,
                "committed": log.transitions_committed,
                "chunks": log.chunks_committed,
                "bytes": log.bytes_committed,
                "write_errors": log.write_errors,
                "last_error": log.last_error,
            },
            "episodes": self.episodes,
            "mean_return": float(np.mean(returns)) if returns else None,
            "returns_by_model": {
                m: {"episodes": len(r), "mean": float(np.mean(r)), "std": float(np.std(r))}
                for m, r in self.returns_by_model.items()
            },
            "recent_episodes": list(self.episode_log)[-10:],
            "previous_model_id": self.previous.model_id if self.previous else None,
            "shadow": None
            if self.shadow is None
            else {"model_id": self.shadow.model_id, **self.shadow_stats.summary()},
            "deploys": [{k: v for k, v in d.items() if k != "t_request"} for d in self.deploys],
            "bridges": [self._bridge_status(b, now) for b in self.bridges.values()],
            "endpoints": {"bind": self.cfg.bind, "admin": self.cfg.admin},
        }

    @staticmethod
    def _bridge_status(b: BridgeState, now: int) -> dict[str, Any]:
        return {
            "id": b.bridge_id,
            "mode": b.mode,
            "rate_hz": b.rate_hz,
            "pid": b.pid,
            "state": "gone" if b.gone else "stale" if b.stale else "live",
            "silent_ms": round((now - b.last_seen_ns) / 1e6, 1),
            "episode": b.episode,
            "episodes": b.episodes,
            "last_return": b.last_return,
            "observations": b.observations,
            "answered": b.answered,
            "fresh": b.fresh,
            "superseded": b.superseded,
            "transitions": b.transitions,
            "on_time": b.on_time,
            "gaps": b.gaps,
            "reported_sent": b.reported_sent,
        }

    # -- stopping -------------------------------------------------------------------------------
    def shutdown(self, grace_s: float = 1.0) -> dict[str, Any]:
        """Say goodbye to live bridges, take in what they sent before they heard it (a bridge
        answers bye with its own, after its last observation), commit the log."""
        self.state = "stopping"
        live = [b for b in self.bridges.values() if not b.gone]
        for b in live:
            self._send(b.identity, P.encode(P.BYE, {"reason": "node stopping"}))
        end = P.now_ns() + round(grace_s * 1e9)
        self._stop = False
        while any(not b.gone and not b.stale for b in live) and P.now_ns() < end:
            self._drain()
            select.select(self.fds, [], [], 0.005)
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
        for fd in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None  # type: ignore[assignment]
        for sock in (getattr(self, "sock", None), getattr(self, "admin", None)):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self.ctx.term()


@dataclass(frozen=True)
class _HelloSpec:
    """What a bridge (or the live model, for a deploy) needs a model to take."""

    env_id: str
    obs_shape: tuple[int, ...]
    act_low: np.ndarray
    act_high: np.ndarray
    obs_dtype: str
    pixels: dict[str, Any] | None
    """The pixel spec (size, stack, repeat, camera); None for state observations."""


def _spec_of(policy: OnnxPolicy) -> _HelloSpec:
    meta = policy.metadata
    return _HelloSpec(
        meta.env_id,
        tuple(meta.obs_shape),
        meta.act_low,
        meta.act_high,
        meta.obs_dtype,
        pixel_spec_dict(meta),
    )


def summary_line(status: dict[str, Any]) -> str:
    lat = status["latency_us"]
    mean = status["mean_return"]
    return (
        f"ticks {status['ticks']}  misses {status['deadline_misses']} "
        f"({100 * status['miss_ratio']:.3f}%)  latency p50 {lat['p50']:.0f} us p99 "
        f"{lat['p99']:.0f} us  episodes {status['episodes']}  mean return "
        f"{'-' if mean is None or math.isnan(mean) else f'{mean:.1f}'}  logged "
        f"{status['transitions_logged']}"
    )
