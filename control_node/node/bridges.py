"""What the node knows of each bridge, and the socket it talks to them on.

``BridgeState`` is one bridge's session and accounts; ``SentAction`` is what serving remembers
of an action it sent until sessions label the transition that used it; ``Link`` is the bridge
socket with who is on each connection. Serving and sessions both use these, so they live below
both.
"""

from __future__ import annotations

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


class Link:
    """The bridge socket (a ROUTER) and the bridge on each of its connections."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.by_identity: dict[bytes, BridgeState] = {}
        self.stale_events = 0
        """Bridges marked stale: silent past the watchdog (sessions) or unreachable (send)."""

    def send(self, identity: bytes, frames: list[bytes | memoryview]) -> bool:
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # peer gone (ROUTER_MANDATORY) or its queue full: drop, not block
            bridge = self.by_identity.get(identity)
            if bridge is not None and not bridge.stale:
                bridge.stale = True
                self.stale_events += 1
            return False
