"""The phase lock on its own (``control_node.node.clock.PhaseLock``), driven as the node's loop
drives it but on a simulated clock: a bridge's observations arrive on its schedule plus a
jitter, the ticks wake at their deadlines plus a lateness, both drawn from a seeded generator.
What the real processes show in test_loop_promises.py, here in numbers a noisy machine cannot
move: where the tick settles against the arrivals, and that it answers nearly every one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from control_node.config import NodeConfig
from control_node.node.bridges import BridgeState
from control_node.node.clock import PhaseLock

Draw = Callable[[np.random.Generator], float]
"""A random delay in ns."""

MS = 1_000_000


def none(rng: np.random.Generator) -> float:
    return 0.0


def arrival_jitter(rng: np.random.Generator) -> float:
    """The bridge's send and the transit: 50 us on average, now and then much more."""
    return rng.exponential(50e3)


def long_tail(rng: np.random.Generator) -> float:
    """A noisy VM's wake-ups: most 50 us late, one in three anywhere up to 1.5 ms."""
    return 50e3 if rng.random() < 2 / 3 else rng.uniform(0, 1.5 * MS)


@dataclass
class Run:
    lags_us: np.ndarray
    """For each answered observation after the first quarter (the lock settling): how long
    after it arrived the tick that answered it woke."""
    fresh: float
    """The share of the lead's observations answered by the first tick after them (the
    others waited a tick, or were superseded)."""


def simulate(
    node_hz: float, bridge_hz: float, margin_us: float, late: Draw, seconds: float = 20
) -> Run:
    """The node's loop (``NodeLoop.run``), on a simulated clock, around a real PhaseLock."""
    rng = np.random.default_rng(0)
    lock = PhaseLock(NodeConfig(model="actor.onnx", rate_hz=node_hz, phase_margin_us=margin_us))
    period, step = round(1e9 / node_hz), round(1e9 / bridge_hz)
    t0 = 1_000 * MS
    bridge = BridgeState("b", b"b", "s", "realtime", bridge_hz, 1, t0, silent_ns=10**15)

    def arrival(j: int) -> int:  # an arbitrary phase (1.7 ms) against the node's first tick
        return t0 + 1_700_000 + j * step + round(arrival_jitter(rng))

    j, next_arrival = 0, arrival(0)
    deadline, lags, fresh, last_tick = t0 + period, [], 0, t0
    while deadline < t0 + seconds * 1e9:
        t_tick = deadline + round(late(rng))
        arrived = None
        while next_arrival <= t_tick:  # the newest one is pending; earlier ones superseded
            arrived, j, next_arrival = next_arrival, j + 1, arrival(j + 1)
        correction = 0
        if arrived is not None:
            bridge.pending, bridge.pending_recv_ns, bridge.last_seen_ns = object(), arrived, arrived
            correction = lock.correction([bridge], t_tick, deadline)
            lags.append((t_tick - arrived) / 1e3)
            fresh += arrived >= last_tick
        last_tick = t_tick
        deadline += period + correction
        if t_tick > deadline:  # overran: skip the deadlines passed, as the loop does
            deadline += ((t_tick - deadline) // period + 1) * period
    return Run(np.array(lags[len(lags) // 4 :]), fresh / j)


def test_on_time_wake_ups_run_the_tick_the_margin_after_each_arrival() -> None:
    run = simulate(200, 200, 1000, none)
    assert 900 <= np.median(run.lags_us) <= 1100
    assert run.fresh >= 0.99


@pytest.mark.parametrize("late", [long_tail, lambda rng: 300e3], ids=["long-tail", "300us"])
def test_late_wake_ups_do_not_pull_the_tick_inside_the_margin(late: Draw) -> None:
    # Counted from the wake-up, a late tick read as a tick placed too late: the lock crept
    # earlier until even the late ones woke within the margin, and the median answer came
    # 0.53x the margin after its observation (0.37x seen in CI, with real processes).
    run = simulate(200, 200, 1000, late)
    assert np.median(run.lags_us) >= 1000, np.median(run.lags_us)
    assert run.fresh >= 0.99, run.fresh


def test_a_slower_lead_is_answered_the_margin_after_its_arrival_through_late_wake_ups() -> None:
    # 50 Hz under 200 Hz: a wake-up more than half a period late read as an observation that
    # missed its tick, and the lock jumped later (median 484 us at a 150 us margin)
    run = simulate(200, 50, 150, long_tail)
    assert 150 <= np.median(run.lags_us) <= 150 + 150, np.median(run.lags_us)
    assert run.fresh >= 0.99, run.fresh
