"""What the node knows of each bridge, and the socket it talks to them on.

``BridgeState`` is one bridge's session and accounts; ``SentAction`` is what serving remembers
of an action it sent until sessions label the transition that used it; ``Link`` is the bridge
socket with who is on each connection. Serving and sessions both use these, so they live below
both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import zmq

from control_node import protocol as P


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


UNKNOWN_ACTION = SentAction("", True, 0, -1, -1, "", None)
"""An applied action the node did not send (the bridge's own safe action, or too old)."""
new_sent_action = functools.partial(tuple.__new__, SentAction)
"""``new_sent_action((model_id, safe, ...))``: a SentAction without the Python-level
``__new__`` a NamedTuple call runs (a third of the cost, on the hot path)."""
SENT_KEPT = 512
"""Actions remembered per bridge: an applied action older than this many is labelled unknown."""
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


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
    silent_ns: int = 0
    """Silence after which the bridge is stale: the node's watchdog, or two of the bridge's
    steps when it is slower than that (an 8.3 Hz pixel bridge is silent 120 ms a step)."""
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
    dropped: int = 0
    """Messages dropped for coming faster than the bridge's allowance (its rate limit)."""
    tokens: float = 0.0
    """The rate limit's token bucket: messages it may still send now (up to ``burst``)."""
    t_tokens: int = 0
    tokens_per_ns: float = 0.0
    burst: float = 0.0
    notice_ns: int = 0
    """When it was last told it is over its rate (at most once a second)."""


class Link:
    """The bridge socket (a ROUTER) and the bridge on each of its connections."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._send = sock.send
        self.by_identity: dict[bytes, BridgeState] = {}
        self.stale_events = 0
        """Bridges marked stale: silent past the watchdog (sessions) or unreachable (send)."""

    def send(self, identity: bytes, frames: list[bytes | memoryview]) -> bool:
        """One message to one bridge, never blocking. Frame by frame, as ``send_multipart``
        sends it, without its per-frame type checks (the frames are bytes or memoryviews); the
        ROUTER refuses an unroutable or full peer on the identity frame, before any is sent."""
        send, last = self._send, len(frames) - 1
        try:
            send(identity, _MORE)
            for i in range(last):
                send(frames[i], _MORE)
            send(frames[last], _LAST)
            return True
        except zmq.ZMQError:  # peer gone (ROUTER_MANDATORY) or its queue full: drop, not block
            bridge = self.by_identity.get(identity)
            if bridge is not None and not bridge.stale:
                bridge.stale = True
                self.stale_events += 1
            return False
