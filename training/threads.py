"""How many torch threads the updates use: ``threads: 0`` (auto) takes the CPUs that are free.

A second intra-op thread nearly doubles a small network's updates on an idle 2-core machine
(td3 on HalfCheetah: 1 thread 163-179 steps/s, 2 threads 318), but collapses them once another
process keeps one of those CPUs busy (10x slower: every parallel region waits for the thread
that is not running). So auto starts with the CPUs of this process's affinity that no other
process is using, at most ``MAX_AUTO``, and keeps watching: when other work takes CPUs away it
drops to the CPUs left (it never climbs back within a run, so a run changes its count at most
a few times, and a run on a quiet machine never). ``OMP_NUM_THREADS``, where set, is taken as
the count (the usual way to fix it for a whole process tree).

Results depend on the thread count in their last bits (a different reduction order): same-seed
runs are equal with the same count, so fix ``--threads`` (or ``OMP_NUM_THREADS``) where runs
must match bit for bit.
"""

from __future__ import annotations

import os
import sys
import time

import torch

MAX_AUTO = 4
"""More threads than this do not speed up networks of a few hundred units."""
RECHECK_S = 10.0
"""How often auto looks at the other processes' CPU use."""
SAMPLE_S = 0.25
"""How long the first look watches the CPUs."""
_HZ = os.sysconf("SC_CLK_TCK")


def _busy_ticks(cpus: set[int]) -> int:
    """Non-idle clock ticks of ``cpus`` since boot (/proc/stat; idle and iowait are idle)."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                ticks = [int(v) for v in values[:8]]
                busy += sum(ticks) - ticks[3] - ticks[4]
    return busy


def _own_ticks() -> float:
    """This process's CPU time (every thread) in clock ticks."""
    t = os.times()
    return (t.user + t.system) * _HZ


class ThreadPolicy:
    """Sets torch's thread count for ``requested`` (0: auto) and, with auto, lowers it when
    other processes take CPUs (:meth:`check`, from the training loop)."""

    def __init__(self, requested: int, log: bool = True) -> None:
        self.cpus = os.sched_getaffinity(0)
        self.auto = requested == 0 and not os.environ.get("OMP_NUM_THREADS")
        self.log = log
        self._mark: tuple[float, int, float] | None = None
        if requested:
            self.threads = requested
        elif not self.auto:
            self.threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
        else:
            self._mark = self._now()
            time.sleep(SAMPLE_S)
            self.threads = self._free()
            self._say(f"torch threads: {self.threads} (auto: CPUs free of other work)")
        torch.set_num_threads(self.threads)

    def _now(self) -> tuple[float, int, float]:
        return time.monotonic(), _busy_ticks(self.cpus), _own_ticks()

    def _free(self) -> int:
        """CPUs of the affinity not used by other processes since the last mark (rounded so
        that a CPU busy less than a quarter of the time counts as free); at least 1."""
        assert self._mark is not None
        t0, busy0, own0 = self._mark
        self._mark = now = self._now()
        elapsed_ticks = (now[0] - t0) * _HZ
        if elapsed_ticks <= 0:
            return self.threads
        others = max(0.0, (now[1] - busy0) - (now[2] - own0)) / elapsed_ticks
        return max(1, min(MAX_AUTO, len(self.cpus) - int(others + 0.75)))

    def check(self) -> None:
        """With auto, every ``RECHECK_S``: fewer threads if other work took CPUs meanwhile."""
        if not self.auto or self._mark is None or time.monotonic() - self._mark[0] < RECHECK_S:
            return
        free = self._free()
        if free < self.threads:
            self._say(
                f"torch threads: {self.threads} -> {free} (other processes are using CPUs; "
                "a thread without a CPU of its own makes every update wait for it)"
            )
            self.threads = free
            torch.set_num_threads(free)

    def _say(self, line: str) -> None:
        if self.log:
            print(f"ddpg train: {line}", file=sys.stderr)
