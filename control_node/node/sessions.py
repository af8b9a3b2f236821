"""Sessions: what the node does with each message a bridge sends.

A hello is checked against the live model's spec and answered with welcome; every observation
is checked (shape, dtype, the applied action) before it is used, turned into a logged transition
labelled with the action that produced it, and kept as its bridge's newest (realtime) or answered
at once (lockstep). Episodes are accounted per bridge and per model. Every message that fails to
parse or validate is answered with an error naming the reason and counted by code; serving goes
on. A bridge silent for longer than the watchdog is stale until it speaks again.

Bounds: each bridge's messages are held to its announced rate times ``rate_headroom`` (a token
bucket, checked before a message is decoded: the excess costs little, is dropped and counted);
at most ``max_bridges`` are live at once (another is refused, ``too_many_bridges``); gone and
stale bridges are forgotten after ``bridge_retention_s`` or beyond ``bridges_kept`` (their
counts move to the totals); each tick looks only at the live ones.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from control_node import protocol as P
from control_node.config import NodeConfig
from control_node.node.bridges import UNKNOWN_ACTION, BridgeState, Link
from control_node.node.serving import Server
from control_node.node.stats import Samples
from control_node.translog.schema import Transition
from control_node.translog.writer import TransitionLog
from models.policy import PolicyError, check_expected
from models.spec import PixelSpec, RobotSpec

MAX_BRIDGE_ID = 128
_TOTALS = ("observations", "fresh", "on_time", "transitions", "dropped")
"""A bridge's counts that the node's totals sum (a forgotten bridge's stay in them)."""


class NodeState(Protocol):
    """What sessions read of the loop: a hello is refused unless it is running."""

    state: str


class Sessions:
    """Every bridge's session: hello, checked observations, labelled transitions, episodes."""

    def __init__(
        self,
        cfg: NodeConfig,
        link: Link,
        server: Server,
        node: NodeState,
        translog: TransitionLog | None,
        rejected: collections.Counter[str],
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.link, self.server, self.node, self.log = cfg, link, server, node, log
        self.translog = translog
        self.bridges: dict[str, BridgeState] = {}
        """Every bridge remembered, by id: live, stale and gone (bounded by the sweep)."""
        self.live: dict[str, BridgeState] = {}
        """The bridges neither gone nor stale: all a tick looks at."""
        self.by_identity = link.by_identity
        self.dropped_over_rate = 0
        self.refused_full = 0
        self.forgotten = 0
        self.retired: collections.Counter[str] = collections.Counter()
        """Counts of forgotten bridges, kept for the node's totals."""
        self._next_sweep = 0
        self.rejected = rejected
        self.last_rejections: collections.deque[str] = collections.deque(maxlen=5)
        self.log_handoff = Samples()
        self.lockstep_answered: Callable[[], None] = lambda: None
        """Called after each lockstep answer (the loop's clock, :meth:`Clock.hold`, yields to
        ZeroMQ's I/O thread so the answer leaves at once, then holds off sleeping)."""
        self._handoff_add = self.log_handoff.add
        self.episode_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.returns_by_model: dict[str, list[float]] = collections.defaultdict(list)
        self.episodes = 0
        self._send, self._answer = link.send, server.answer
        self._watchdog_ns = round(cfg.watchdog_ms * 1e6)
        # fixed for the node's life: a deploy must match the live spec (check_expected)
        policy = server.policy
        self._obs_shape, self._obs_dtype = policy.obs_shape, server.obs_dtype
        self._act_shape = (policy.act_dim,)

    # -- each tick ------------------------------------------------------------------------------
    def ready(self, t_tick: int) -> list[BridgeState]:
        """Watch every live bridge for silence; return those with an unanswered observation.
        Once a second, forget what is past retention."""
        ready: list[BridgeState] = []
        left: list[BridgeState] | None = None
        for b in self.live.values():
            if b.gone or b.stale:
                left = [] if left is None else left
                left.append(b)
                continue
            if t_tick - b.last_seen_ns > b.silent_ns:
                b.stale, b.pending = True, None
                self.link.stale_events += 1
                left = [] if left is None else left
                left.append(b)
                self.log(
                    f"node: bridge {P.short(b.bridge_id)} is stale (silent > "
                    f"{b.silent_ns / 1e6:g} ms)"
                )
                continue
            if b.pending is not None:
                ready.append(b)
        if left:
            for b in left:
                if self.live.get(b.bridge_id) is b:
                    del self.live[b.bridge_id]
        if t_tick >= self._next_sweep:
            self._next_sweep = t_tick + 1_000_000_000
            self.sweep(t_tick, self.cfg.bridges_kept)
        return ready

    def sweep(self, now: int, keep: int) -> None:
        """Forget bridges gone or stale for longer than the retention, then the oldest of
        them beyond ``keep``; their counts move to ``retired``."""
        retention = self.cfg.bridge_retention_s * 1e9
        idle = [b for b in self.bridges.values() if self.live.get(b.bridge_id) is not b]
        idle.sort(key=lambda b: b.last_seen_ns)
        over = len(idle) - keep
        for i, b in enumerate(idle):
            if i >= over and now - b.last_seen_ns <= retention:
                break
            self._forget(b)

    def _forget(self, b: BridgeState) -> None:
        for name in _TOTALS:
            self.retired[name] += getattr(b, name)
        del self.bridges[b.bridge_id]
        if self.by_identity.get(b.identity) is b:
            del self.by_identity[b.identity]
        self.forgotten += 1

    def say_goodbye(self) -> list[BridgeState]:
        """Send bye to every bridge still here; return them (the node is stopping)."""
        live = [b for b in self.bridges.values() if not b.gone]
        for b in live:
            self._send(b.identity, P.encode(P.BYE, {"reason": "node stopping"}))
        return live

    # -- bridge messages ------------------------------------------------------------------------
    def on_message(self, identity: bytes, frames: list[bytes], t_recv: int) -> None:
        bridge = self.by_identity.get(identity)
        if bridge is not None:  # its rate limit, before any decoding
            tokens = bridge.tokens + (t_recv - bridge.t_tokens) * bridge.tokens_per_ns
            bridge.t_tokens = t_recv
            if tokens < 1.0:
                bridge.tokens = tokens
                self._drop(bridge, t_recv)
                return
            burst = bridge.burst
            bridge.tokens = (burst if tokens > burst else tokens) - 1.0
        try:
            msg = P.decode(frames)
            if msg.type == P.OBS:
                bridge_id = msg.fields["bridge_id"]
                if bridge is None or bridge.gone or bridge.bridge_id != bridge_id:
                    raise P.ProtocolError(
                        "unknown_bridge",
                        f"bridge {P.short(bridge_id)} has not said hello on this connection; "
                        "send hello first",
                    )
                self._check_obs(msg)
                self._on_obs(bridge, msg, t_recv)
            elif msg.type == P.HELLO:
                if self.node.state != "running":
                    raise P.ProtocolError("stopping", "the node is stopping; try again later")
                self._on_hello(identity, msg, t_recv)
            elif msg.type == P.BYE:
                if bridge is not None:
                    bridge.gone = True
                    bridge.pending = None
                    bridge.last_seen_ns = t_recv
                    sent = msg.fields.get("transitions_sent")
                    bridge.reported_sent = sent if isinstance(sent, int) else None
                    self.log(
                        f"node: bridge {P.short(bridge.bridge_id)} said goodbye "
                        f"({P.short(msg['reason'], 120)})"
                    )
            else:
                raise P.ProtocolError(
                    "bad_type", f"a node accepts hello, obs and bye, not {msg.type!r}"
                )
        except P.ProtocolError as e:
            self._reject(identity, e)
        except Exception as e:  # a bug must not stop the loop: count it, answer, keep serving
            reason = P.short(f"{type(e).__name__}: {e}", 200)
            self._reject(identity, P.ProtocolError("internal", reason))

    def _drop(self, b: BridgeState, t_recv: int) -> None:
        """A message over the bridge's rate: dropped and counted; the bridge is told at most
        once a second."""
        b.dropped += 1
        self.dropped_over_rate += 1
        if t_recv - b.notice_ns >= 1_000_000_000:
            b.notice_ns = t_recv
            allowed = b.tokens_per_ns * 1e9
            self._send(
                b.identity,
                P.error(
                    "rate_limited",
                    f"bridge {P.short(b.bridge_id)} sends faster than {allowed:g} messages/s "
                    f"(rate_headroom x its announced rate); {b.dropped} dropped so far",
                ),
            )

    def _reject(self, identity: bytes, e: P.ProtocolError) -> None:
        if e.code != "stopping":  # a hello during shutdown is not a fault of the bridge
            self.rejected[e.code] += 1
            self.last_rejections.append(f"{e.code}: {e.reason}")
        self._send(identity, P.error(e.code, e.reason))

    def _on_hello(self, identity: bytes, msg: P.Message, t_recv: int) -> None:
        self._check_hello(msg)
        bridge = self._admit(identity, msg, t_recv)
        self.log(
            f"node: bridge {P.short(bridge.bridge_id)} connected ({msg['mode']}, "
            f"{P.short(msg['env_id'])}, pid {msg['pid']})"
        )
        server = self.server
        self._send(
            identity,
            P.encode(
                P.WELCOME,
                {
                    "model_id": server.model_id,
                    "rate_hz": self.cfg.rate_hz,
                    "watchdog_ms": self.cfg.watchdog_ms,
                    "pid": os.getpid(),
                },
                {"safe_action": server.safe_action},
            ),
        )

    def _check_hello(self, msg: P.Message) -> None:
        """Refuse a bridge whose robot is not the one the live model was exported for."""
        server = self.server
        meta = server.policy.metadata
        bridge_id = msg["bridge_id"]
        if not 0 < len(bridge_id) <= MAX_BRIDGE_ID or not bridge_id.isprintable():
            raise P.ProtocolError(
                "bad_field",
                f"hello: bridge_id {P.short(bridge_id)} must be 1..{MAX_BRIDGE_ID} printable "
                "characters",
            )
        if msg["mode"] not in P.MODES:
            raise P.ProtocolError(
                "bad_field", f"hello: mode {P.short(msg['mode'])} is not one of {P.MODES}"
            )
        if msg["rate_hz"] > self.cfg.max_bridge_rate_hz:
            raise P.ProtocolError(
                "bad_field",
                f"hello: rate_hz {msg['rate_hz']:g} is over this node's limit of "
                f"{self.cfg.max_bridge_rate_hz:g} (max_bridge_rate_hz)",
            )
        if msg["obs_dtype"] != meta.obs_dtype:
            raise P.ProtocolError(
                "spec_mismatch",
                f"bridge observations are {msg['obs_dtype']}; the model takes {meta.obs_dtype}",
            )
        pixels = msg.fields.get("pixels")
        if pixels is not None and not isinstance(pixels, dict):
            raise P.ProtocolError(
                "bad_field", f"hello: pixels = {P.short(pixels)} is not a map or nil"
            )
        try:
            spec = RobotSpec(
                msg["env_id"],
                msg["obs_shape"],
                msg["act_low"],
                msg["act_high"],
                msg["obs_dtype"],
                None if pixels is None else PixelSpec.from_dict(pixels),
            )
        except (TypeError, ValueError) as e:
            raise P.ProtocolError(
                "bad_field", f"hello: malformed spec: {P.short(str(e), 200)}"
            ) from None
        try:
            check_expected(meta, spec, f"model {server.model_id}")
        except PolicyError as e:
            raise P.ProtocolError("spec_mismatch", str(e)) from None

    def _admit(self, identity: bytes, msg: P.Message, t_recv: int) -> BridgeState:
        """Register the bridge on this connection; a reconnect of its session keeps the
        accounts, another live process with its id is refused."""
        bridge_id = msg["bridge_id"]
        old = self.bridges.get(bridge_id)
        if old is not None and not (old.gone or old.stale or old.session == msg["session"]):
            raise P.ProtocolError(
                "duplicate_bridge",
                f"bridge id {P.short(bridge_id)} is already connected and live (another process?)",
            )
        self._check_room(bridge_id)
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
        rate = bridge.rate_hz if bridge.mode == "realtime" else 0.0
        bridge.silent_ns = max(self._watchdog_ns, round(2e9 / rate) if rate > 0 else 0)
        allowed = self.cfg.rate_headroom * (rate if rate > 0 else self.cfg.max_bridge_rate_hz)
        bridge.tokens_per_ns, bridge.burst = allowed / 1e9, max(10.0, allowed)
        bridge.tokens, bridge.t_tokens = bridge.burst, t_recv
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
                "dropped",
            ):
                setattr(bridge, name, getattr(old, name))
            bridge.last_return = old.last_return
        self.bridges[bridge_id] = bridge
        self.live[bridge_id] = bridge
        self.by_identity[identity] = bridge
        if len(self.bridges) >= self.cfg.max_bridges + self.cfg.bridges_kept + 64:
            self.sweep(t_recv, self.cfg.bridges_kept)  # a storm of hellos: trim now
        return bridge

    def _check_room(self, bridge_id: str) -> None:
        """Refuse one more live bridge beyond ``max_bridges``."""
        live = self.live
        if bridge_id not in live and len(live) >= self.cfg.max_bridges:
            # the table may hold some that went stale or gone since the last tick
            n = sum(1 for b in live.values() if not (b.gone or b.stale))
            if n >= self.cfg.max_bridges:
                self.refused_full += 1
                raise P.ProtocolError(
                    "too_many_bridges",
                    f"the node serves {n} bridges, its limit (max_bridges); try again later",
                )

    def _check_obs(self, msg: P.Message) -> None:
        arrays, fields = msg.arrays, msg.fields
        obs = arrays["obs"]
        shape, dtype = self._obs_shape, self._obs_dtype
        if obs.shape != shape or obs.dtype != dtype:
            raise P.ProtocolError(
                "bad_shape",
                f"obs: observation is {obs.dtype} {list(obs.shape)}; the model takes "
                f"{dtype} {list(shape)}",
            )
        step = fields["step"]
        if step > 0:
            action = arrays.get("action")
            if action is None:
                raise P.ProtocolError(
                    "bad_array", "obs: step > 0 needs the 'action' that produced it"
                )
            if action.shape != self._act_shape or action.dtype != np.float32:
                raise P.ProtocolError(
                    "bad_shape",
                    f"obs: applied action is {action.dtype} {list(action.shape)}; expected "
                    f"float32 [{self._act_shape[0]}]",
                )
        if step < 0 or fields["episode"] < 0:
            raise P.ProtocolError("bad_field", "obs: episode and step must be >= 0")

    def _on_obs(self, b: BridgeState, msg: P.Message, t_recv: int) -> None:
        if b.stale:
            self._check_room(b.bridge_id)
            b.stale = False
            self.live[b.bridge_id] = b
            self.log(f"node: bridge {P.short(b.bridge_id)} resumed")
        b.last_seen_ns = t_recv
        f = msg.fields
        episode, step = f["episode"], f["step"]
        prev = b.prev
        pf = None if prev is None else prev.fields
        if pf is not None and pf["step"] == step and pf["episode"] == episode:
            if b.mode == "lockstep":  # a resend after a lost answer: answer again, log nothing
                self._answer([b], [msg], [t_recv])
            b.gaps += 1
            return
        ended = f["terminated"] or f["truncated"]
        lockstep = b.mode == "lockstep"
        if lockstep and not ended:  # answered first: the log hand-off is not on its round trip
            self._answer([b], [msg], [t_recv])
            b.fresh += 1
            self.lockstep_answered()  # the clock hands it to ZeroMQ at once, then holds
        if step == 0 or episode != b.episode:
            b.episode, b.ep_return, b.ep_length, b.ep_models = episode, 0.0, 0, set()
        if step > 0:
            if pf is not None and pf["episode"] == episode and pf["step"] == step - 1:
                self._log_transition(b, prev, msg)  # type: ignore[arg-type]
            else:
                b.gaps += 1
            b.ep_return += float(f["reward"])
            b.ep_length += 1
        if ended:
            self._end_episode(b)
            b.prev = b.pending = None
            return
        b.prev = msg
        b.observations += 1
        if not lockstep:
            if b.pending is not None:
                b.superseded += 1
            b.pending, b.pending_recv_ns = msg, t_recv

    # -- transitions and episodes ---------------------------------------------------------------
    def _log_transition(self, b: BridgeState, prev: P.Message, msg: P.Message) -> None:
        f, pf = msg.fields, prev.fields
        seq, applied_safe = f["applied_seq"], f["applied_safe"]
        sent = b.sent.get(seq, UNKNOWN_ACTION)
        model_id = sent.model_id
        if sent.episode == pf["episode"] and sent.step == pf["step"]:
            b.on_time += 1
        if model_id and not applied_safe:  # the bridge's own safe steps label nothing
            b.ep_models.add(model_id)
        b.transitions += 1
        translog = self.translog
        if translog is None:
            return
        now = P.now_ns
        t0 = now()
        # positional, in Transition's field order (keywords cost three times as much)
        translog.append(
            Transition(
                b.bridge_id,  # bridge_id
                b.session,  # bridge_session
                f["episode"],  # episode
                pf["step"],  # step
                prev.arrays["obs"],  # obs
                msg.arrays["action"],  # action
                float(f["reward"]),  # reward
                msg.arrays["obs"],  # next_obs
                bool(f["terminated"]),  # terminated
                bool(f["truncated"]),  # truncated
                model_id,  # model_id
                bool(sent.safe or applied_safe),  # safe_action
                seq,  # action_seq
                pf["t_obs_ns"],  # t_obs_ns
                sent.t_send,  # t_action_ns
                f["t_obs_ns"],  # t_next_obs_ns
                sent.shadow_model_id,  # shadow_model_id
                sent.shadow_action,  # shadow_action
            )
        )
        self._handoff_add(now() - t0)

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
