"""How the node's loop waits for a deadline, and how it moves the next one.

Between deadlines the loop sleeps in ``select`` on the ZeroMQ file descriptors, so it wakes for
every message and handles it at once; with ``spin_us`` it busy-drains the last stretch before
the deadline instead (trading CPU for jitter). With the ``freeze`` garbage-collector policy
it collects garbage in the slack before a deadline, when the collection fits
(``control_node/realtime.py``). A stop request ends the wait at its next wake-up.

The tick phase is locked to one realtime bridge, the lead (``PhaseLock``): the node nudges its
next deadline so that the tick runs ``phase_margin_us`` after the lead's observations arrive,
so each tick answers an observation made since the previous one, as young as possible. The
lead may be slower than the node (a 25 Hz robot under a 100 Hz node): then every few ticks one
answers it just after its observation arrives.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from os import sched_yield

from control_node import protocol as P
from control_node.config import NodeConfig
from control_node.node.bridges import BridgeState

LOCK_TOLERANCE = 1e-3
"""How close to a whole number the node's rate over a bridge's must be for the tick to lock on
that bridge."""


def periods_per_step(node_hz: float, bridge_hz: float) -> int:
    """How many node periods one step of a bridge at ``bridge_hz`` lasts, when the tick can lock
    on it (each time run just after its observation arrives): it is no faster than the node, and
    its period is a whole number of node periods (25 Hz under 100 Hz: 4), so its observations
    arrive at the same point of the node's period every time. 0 when it cannot (30 Hz under
    100 Hz; a faster bridge, whose newest observation is never older than its own period)."""
    if not 0 < bridge_hz <= node_hz * (1 + LOCK_TOLERANCE):
        return 0
    ratio = node_hz / bridge_hz
    return round(ratio) if abs(ratio - round(ratio)) <= LOCK_TOLERANCE * ratio else 0


class Clock:
    """The waiting policy for one period: sleep, then spin."""

    def __init__(self, cfg: NodeConfig, fds: list[int], drain: Callable[[], None]) -> None:
        self.period_ns = round(1e9 / cfg.rate_hz)
        self.spin_ns = round(cfg.spin_us * 1e3)
        self.lockstep_spin_ns = round(cfg.lockstep_spin_us * 1e3)
        self.spin_until = 0
        """Busy-drain until then instead of sleeping (:meth:`hold`)."""
        self.fds, self.drain = fds, drain
        self.stopped = False
        """Set (from a signal handler too) to end the wait and the loop at the next wake-up."""
        self.collect: Callable[[int], bool] | None = None
        """gc freeze: collects garbage if it fits in the slack (ns) left; True if it did."""

    def hold(self) -> None:
        """A lockstep observation was just answered. First yield, so ZeroMQ's I/O thread, at
        the loop's own real-time priority on its CPU, sends the answer now rather than once
        the loop sleeps (``realtime.io_priority``). Then, since the bridge's next observation
        comes soon, busy-drain for ``lockstep_spin_us`` instead of sleeping: it is taken in
        at once, with warm caches (a wake-up from ``select`` cost tens of microseconds here,
        and the node's work ran about 1.5x slower after one)."""
        sched_yield()
        self.spin_until = P.now_ns() + self.lockstep_spin_ns

    def wait(self, deadline: int) -> None:
        """Handle messages as they arrive until ``deadline``: sleep in ``select`` until
        ``spin_ns`` before it, then busy-drain; return early once stopped. Every busy-drain
        yields the CPU between looks, so ZeroMQ's I/O thread, at the loop's own real-time
        priority on the same CPU, still reads and sends meanwhile."""
        drain, fds, collect, now, spin = self.drain, self.fds, self.collect, P.now_ns, sched_yield
        t_sleep = deadline - self.spin_ns
        while True:
            drain()  # also re-arms the edge-triggered descriptors, so it runs before each select
            if self.stopped:
                return
            t = now()
            remaining = t_sleep - t
            if remaining <= 0:
                break
            if collect is not None and collect(remaining):
                continue  # take in what came meanwhile, then sleep
            if t < self.spin_until:  # a lockstep bridge's next observation is near (hold)
                spin()
                continue
            select.select(fds, [], [], remaining / 1e9)
        while now() < deadline and not self.stopped:  # busy stretch (spin_us > 0)
            drain()
            spin()


class PhaseLock:
    """Which realtime bridge the tick phase follows (the lead), and how far to move the next
    deadline to follow it.

    The lead is the fastest bridge the tick can lock on (:func:`periods_per_step`), the first of
    equals; it leads until it goes stale, gone or silent past its watchdog, or a faster one
    comes. Only the lead's observations (and, at the node's own rate, those of bridges at the
    same rate) move the deadline: bridges at other phases or rates cannot all be followed at
    once, and each is answered at the next tick, at most one node period after it arrives.

    A new lead's second observation moves the deadline all the way, to the margin after it. Then
    the aim depends on what a late observation (one that arrives just after a tick) costs. A
    lead at the node's rate loses its next step's action: the tick follows the rule of rare
    jumps and slow creep (:meth:`_every`), which keeps it after nearly every arrival however
    they jitter. A slower lead's late observation is answered at the next tick, still before
    its next step: the tick aims at the median arrival plus the margin (:meth:`_median`).
    """

    GAIN = 8
    """A slower lead's lag off the margin moves the next deadline 1/GAIN of the way back."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.node_hz = cfg.rate_hz
        self.period_ns = round(1e9 / cfg.rate_hz)
        self.margin_ns = round(cfg.phase_margin_us * 1e3)
        self.step_ns = self.period_ns // 50
        """The most one lag of a slower lead's moves a deadline (200 us at 100 Hz)."""
        self.lead: BridgeState | None = None
        self._periods = 0  # the lead's periods_per_step
        self._late = False  # the slower lead's previous observation was late
        self._new = 0  # observations of a new lead before it moves the deadline all the way
        self._per_step: dict[float, int] = {}

    def correction(self, ready: list[BridgeState], t_tick: int, deadline: int) -> int:
        """The move (ns) of the next deadline after the tick at ``t_tick``, due at
        ``deadline``, answers ``ready`` (their ``pending_recv_ns`` are the arrivals); elects
        the lead.

        Each lag is counted from the deadline, not from when the tick woke: where the tick
        runs is the deadline's doing, and the wake-up's lateness is the scheduler's. Counted
        from the wake-up, a long tail of late wake-ups (a third of the ticks up to 1.5 ms late,
        on a noisy VM) read as ticks placed too late; the lock crept earlier until even they
        ran within the margin, and the median tick then ran half the margin after its arrival
        (``tests/test_phase_lock.py``). An observation that arrived after the deadline, caught
        only because the tick woke late, has a negative lag: one period less, by its phase,
        it is the late one it is."""
        lead = self.lead
        if lead is not None and (
            lead.gone or lead.stale or t_tick - lead.last_seen_ns > lead.silent_ns
        ):
            lead = None  # (silent: a reconnect replaced its state with a new one)
        answered = False
        for b in ready:
            if b is lead:
                answered = True
            elif (lead is None or b.rate_hz > lead.rate_hz) and self._steps(b.rate_hz):
                lead, answered, self._new, self._late = b, True, 2, False
                self._periods = self._steps(b.rate_hz)
        self.lead = lead
        if not answered:
            return 0
        assert lead is not None
        if self._periods > 1:
            return self._median(deadline - lead.pending_recv_ns)
        lag = max(deadline - b.pending_recv_ns for b in ready if b.rate_hz == lead.rate_hz)
        return self._every(lag)

    def _steps(self, bridge_hz: float) -> int:
        n = self._per_step.get(bridge_hz)
        if n is None:
            n = self._per_step[bridge_hz] = periods_per_step(self.node_hz, bridge_hz)
        return n

    def _first(self, lag: int) -> int | None:
        """A new lead's second observation: the whole move to the margin after it. (Its first
        is its reset's, sent before its steps' schedule began: off their phase by a step.)"""
        if not self._new:
            return None
        self._new -= 1
        if self._new:
            return 0
        period, margin = self.period_ns, self.margin_ns
        return period - lag + margin if lag > period // 2 else margin - lag

    def _every(self, lag: int) -> int:
        """A lead at the node's rate; ``lag``: how long before this tick's deadline the oldest
        answered observation at its rate arrived (by its phase: a lag of more than a period,
        or a negative one, counts modulo the period).

        More than half a period means it arrived just after the previous tick, which it missed:
        jump later, past that arrival plus the margin. Otherwise creep earlier, a little per
        tick, toward the margin. The balance of rare jumps and slow creep keeps the tick after
        the arrival on almost every period even when arrivals jitter by more than the margin,
        and keeps the observation as young as that jitter allows.
        """
        period, margin = self.period_ns, self.margin_ns
        lag %= period
        first = self._first(lag)
        if first is not None:
            return first
        if lag > period // 2:
            return min(period - lag + margin, period // 4)
        if lag <= margin:
            return 0
        return -min((lag - margin) // 10, max(period // 2000, 500))

    def _median(self, lag: int) -> int:
        """A lead slower than the node; ``lag``: how long before this tick's deadline its
        observation arrived.

        More than half a period means it arrived just after the previous tick. Once may be a
        hiccup of the bridge's (its next step keeps its own schedule): wait. Twice in a row
        means the ticks run too early: jump later, past that arrival plus the margin. Any other
        lag moves the deadline 1/GAIN of the way to the margin, at most ``step_ns``, so one late
        wake-up of the node's own cannot move the phase far. A lag of more than a period (it
        arrived while the node overran) counts by its phase. (The rule of rare jumps and slow
        creep, here, jumped at every hiccup and crept back at 0.05% of a period per answered
        tick: on this VM a 50 Hz bridge under a 100 Hz node waited 1.5 ms.)
        """
        period, margin = self.period_ns, self.margin_ns
        lag %= period
        first = self._first(lag)
        if first is not None:
            return first
        if lag > period // 2:
            self._late = not self._late
            return 0 if self._late else min(period - lag + margin, period // 2)
        self._late = False
        step = (lag - margin) // self.GAIN
        return -max(-self.step_ns, min(step, self.step_ns))
