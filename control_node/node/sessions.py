"""Sessions: what the node does with each message a bridge sends.

A hello is checked against the live model's spec and answered with welcome; every observation
is checked (shape, dtype, the applied action) before it is used, turned into a logged transition
labelled with the action that produced it, and kept as its bridge's newest (realtime) or answered
at once (lockstep). Episodes are accounted per bridge and per model. Every message that fails to
parse or validate is answered with an error naming the reason and counted by code; serving goes
on. A bridge silent for longer than the watchdog is stale until it speaks again.
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
        self.by_identity = link.by_identity
        self.rejected = rejected
        self.last_rejections: collections.deque[str] = collections.deque(maxlen=5)
        self.log_handoff = Samples()
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
        """Watch every bridge for silence; return those with an unanswered observation."""
        ready: list[BridgeState] = []
        for b in self.bridges.values():
            if b.gone:
                continue
            if not b.stale and t_tick - b.last_seen_ns > b.silent_ns:
                b.stale, b.pending = True, None
                self.link.stale_events += 1
                self.log(f"node: bridge {b.bridge_id} is stale (silent > {b.silent_ns / 1e6:g} ms)")
            if b.pending is not None:
                ready.append(b)
        return ready

    def say_goodbye(self) -> list[BridgeState]:
        """Send bye to every bridge still here; return them (the node is stopping)."""
        live = [b for b in self.bridges.values() if not b.gone]
        for b in live:
            self._send(b.identity, P.encode(P.BYE, {"reason": "node stopping"}))
        return live

    # -- bridge messages ------------------------------------------------------------------------
    def on_message(self, identity: bytes, frames: list[bytes], t_recv: int) -> None:
        try:
            msg = P.decode(frames)
            if msg.type == P.OBS:
                bridge = self.by_identity.get(identity)
                bridge_id = msg.fields["bridge_id"]
                if bridge is None or bridge.gone or bridge.bridge_id != bridge_id:
                    raise P.ProtocolError(
                        "unknown_bridge",
                        f"bridge {bridge_id!r} has not said hello on this connection; "
                        "send hello first",
                    )
                self._check_obs(msg)
                self._on_obs(bridge, msg, t_recv)
            elif msg.type == P.HELLO:
                if self.node.state != "running":
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

    def _on_hello(self, identity: bytes, msg: P.Message, t_recv: int) -> None:
        self._check_hello(msg)
        bridge = self._admit(identity, msg, t_recv)
        self.log(
            f"node: bridge {bridge.bridge_id} connected ({msg['mode']}, {msg['env_id']}, "
            f"pid {msg['pid']})"
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
            spec = RobotSpec(
                msg["env_id"],
                msg["obs_shape"],
                msg["act_low"],
                msg["act_high"],
                msg["obs_dtype"],
                None if pixels is None else PixelSpec.from_dict(pixels),
            )
        except (TypeError, ValueError) as e:
            raise P.ProtocolError("bad_field", f"hello: malformed spec: {e}") from None
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
        rate = bridge.rate_hz if bridge.mode == "realtime" else 0.0
        bridge.silent_ns = max(self._watchdog_ns, round(2e9 / rate) if rate > 0 else 0)
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
        return bridge

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
        b.last_seen_ns = t_recv
        if b.stale:
            b.stale = False
            self.log(f"node: bridge {b.bridge_id} resumed")
        f = msg.fields
        episode, step = f["episode"], f["step"]
        prev = b.prev
        pf = None if prev is None else prev.fields
        if pf is not None and pf["step"] == step and pf["episode"] == episode:
            if b.mode == "lockstep":  # a resend after a lost answer: answer again, log nothing
                self._answer([b], [msg], [t_recv])
            b.gaps += 1
            return
        if step == 0 or episode != b.episode:
            b.episode, b.ep_return, b.ep_length, b.ep_models = episode, 0.0, 0, set()
        if step > 0:
            if pf is not None and pf["episode"] == episode and pf["step"] == step - 1:
                self._log_transition(b, prev, msg)  # type: ignore[arg-type]
            else:
                b.gaps += 1
            b.ep_return += float(f["reward"])
            b.ep_length += 1
        if f["terminated"] or f["truncated"]:
            self._end_episode(b)
            b.prev = b.pending = None
            return
        b.prev = msg
        b.observations += 1
        if b.mode == "lockstep":
            self._answer([b], [msg], [t_recv])
            b.fresh += 1
        else:
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
