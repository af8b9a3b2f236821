"""How the node's loop waits for a deadline, and how it moves the next one.

Between deadlines the loop sleeps in ``select`` on the ZeroMQ file descriptors, so it wakes for
every message and handles it at once; with ``spin_us`` it busy-drains the last stretch before
the deadline instead (trading CPU for jitter). A stop request ends the wait at its next
wake-up.

The tick phase is locked to fast realtime bridges: the node nudges its next deadline so that it
runs ``phase_margin_us`` after their observations arrive, so each tick answers an observation
made since the previous one, as young as possible.
"""

from __future__ import annotations

import select
from collections.abc import Callable

from control_node import protocol as P
from control_node.config import NodeConfig


class Clock:
    """The waiting policy (sleep, then spin) and the phase correction, for one period."""

    def __init__(self, cfg: NodeConfig, fds: list[int], drain: Callable[[], None]) -> None:
        self.period_ns = round(1e9 / cfg.rate_hz)
        self.spin_ns = round(cfg.spin_us * 1e3)
        self.margin_ns = round(cfg.phase_margin_us * 1e3)
        self.fds, self.drain = fds, drain
        self.stopped = False
        """Set (from a signal handler too) to end the wait and the loop at the next wake-up."""

    def wait(self, deadline: int) -> None:
        """Handle messages as they arrive until ``deadline``: sleep in ``select`` until
        ``spin_ns`` before it, then busy-drain; return early once stopped."""
        drain, fds = self.drain, self.fds
        t_sleep = deadline - self.spin_ns
        while True:
            drain()  # also re-arms the edge-triggered descriptors, so it runs before each select
            if self.stopped:
                return
            remaining = t_sleep - P.now_ns()
            if remaining <= 0:
                break
            select.select(fds, [], [], remaining / 1e9)
        while P.now_ns() < deadline and not self.stopped:  # busy stretch (spin_us > 0)
            drain()

    def phase_correction(self, lag: int) -> int:
        """Move the next deadline so ticks run just after the observations arrive.

        ``lag`` is how long before this tick the answered observation arrived. More than half a
        period means it arrived just after the previous tick, which it missed: jump later, past
        that arrival plus the margin. Otherwise creep earlier, a little per tick, toward the
        margin. The balance of rare jumps and slow creep keeps the tick after the arrival on
        almost every period even when arrivals jitter by more than the margin, and keeps the
        observation as young as that jitter allows.
        """
        period, margin = self.period_ns, self.margin_ns
        if lag > period // 2:
            return min(period - lag + margin, period // 4)
        if lag <= margin:
            return 0
        return -min((lag - margin) // 10, max(period // 2000, 500))
