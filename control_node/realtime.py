"""Real-time settings of a node or bridge process: applied at start-up, read back from the OS.

:func:`apply` sets what ``RealtimeConfig`` asks (docs/launch.md, README "Real-time setup"):
SCHED_FIFO (or RR) for the loop thread and ZeroMQ's I/O threads, which carry every message (a
bridge's one priority above its loop: :func:`io_priority`), and normal priority for every other
thread; ``mlockall`` of current and future pages; the CPUs of every thread; idle CPUs that
poll instead of halting (a PM QoS request); and the garbage collector's policy
(:class:`SlackGC` on the node). What the OS does not permit it names in one line, with the
errno or the limit and how to permit it (both worded in ``permissions.py``, as ``ddpg doctor``
says them), and the process serves on without it.

Helper threads run at normal priority so they can never starve the loop, which never waits
for them: the policy carries SCHED_RESET_ON_FORK, so threads the loop starts later begin at
SCHED_OTHER, and the helpers (the log writer, a deploy's loader) also set themselves to it with
:func:`helper_thread`, whatever they inherited and whenever they start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from control_node import permissions
from control_node.config import RealtimeConfig

POLICIES = {"fifo": os.SCHED_FIFO, "rr": os.SCHED_RR, "other": os.SCHED_OTHER}
POLICY_NAMES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO",
                os.SCHED_RR: "SCHED_RR", os.SCHED_BATCH: "SCHED_BATCH",
                os.SCHED_IDLE: "SCHED_IDLE"}  # fmt: skip
RT = (os.SCHED_FIFO, os.SCHED_RR)
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_NAME = 15
IO_THREAD_PREFIX = "ZMQbg/IO/"  # libzmq's name for its I/O threads
_libc = ctypes.CDLL(None, use_errno=True)


# -- reading the OS -------------------------------------------------------------------------
def _kb(key: str, status: dict[str, str] | None = None) -> int:
    return int((status or permissions.proc_status()).get(key, "0 kB").split()[0])


def _tasks() -> list[tuple[int, str]]:
    """(tid, name) of every thread: Python's name where it is a Python thread, else the OS's."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = []
    for entry in sorted(os.listdir("/proc/self/task"), key=int):
        tid = int(entry)
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # it exited meanwhile
            continue
        out.append((tid, names.get(tid, comm) if comm in ("python", "python3") else comm))
    return out


def policy_of(tid: int) -> tuple[str, int]:
    """A thread's scheduling policy (its name) and real-time priority, as the OS has them."""
    policy = os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK
    return POLICY_NAMES.get(policy, str(policy)), os.sched_getparam(tid).sched_priority


def in_effect(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (what :func:`apply` returned) with every thread, the CPUs and the locked
    memory read again now: ``ddpg status`` shows this."""
    threads = []
    for tid, name in _tasks():
        with contextlib.suppress(OSError):
            policy, priority = policy_of(tid)
            cpus = sorted(os.sched_getaffinity(tid))
            threads.append({"tid": tid, "name": name, "sched_policy": policy,
                            "sched_priority": priority, "cpus": cpus})  # fmt: skip
    status = permissions.proc_status()
    return {**settings, "cpus": sorted(os.sched_getaffinity(0)), "threads": threads,
            "vmlck_kb": _kb("VmLck", status), "vmrss_kb": _kb("VmRSS", status)}  # fmt: skip


def _tasks_with_io_thread(timeout_s: float = 1.0) -> list[tuple[int, str]]:
    """:func:`_tasks` once ZeroMQ's I/O thread has named itself (every caller has a context
    with a socket): libzmq names the thread from inside it, so right after the first socket
    is made it may still carry the process's name, and would be missed (a bridge that applied
    its settings at once missed it in about half its starts)."""
    end = time.monotonic() + timeout_s
    while True:
        tasks = _tasks()
        if any(name.startswith(IO_THREAD_PREFIX) for _, name in tasks) or time.monotonic() > end:
            return tasks
        time.sleep(0.001)


# -- applying -------------------------------------------------------------------------------
def io_priority(policy: int, priority: int, role: str) -> int:
    """ZeroMQ's I/O threads' real-time priority: a bridge's one above its loop thread, the
    node's the same as its loop's.

    A bridge's loop busy-waits for a lockstep answer; at its own priority its I/O thread, on
    the same CPU, could read that answer only once the spin gave up (2.3 ms per round trip
    instead of 0.2). One above, it preempts the spin. The node's loop never spins by default,
    and at its own priority its I/O thread sends a tick's actions when the tick is done and
    the loop sleeps; one above, every send preempted the tick (1 kHz, one bridge, 30 s: tick
    work p50 64 -> 100 us, misses 0.023% -> 0.163%; ten bridges at 100 Hz 0.095% -> 0.212%).
    A lockstep answer, sent outside a tick, is handed over at once instead (the clock
    yields after it, ``Clock.hold``). Either way their work is bounded by the loop's: the
    receive high-water mark stops them reading once the loop falls behind."""
    if policy not in RT:
        return 0
    return min(priority + (role == "bridge"), os.sched_get_priority_max(policy))


def _set_policy(cfg: RealtimeConfig, hints: set[str], role: str) -> str | None:
    """The loop thread's policy, then ZeroMQ's I/O threads'; any other thread at a real-time
    policy (a process started under chrt) goes back to SCHED_OTHER. What could not be set, or
    None."""
    policy, priority = POLICIES[cfg.sched_policy], cfg.sched_priority
    if policy == os.SCHED_OTHER:
        flags, priority = policy, 0
    else:
        flags = policy | os.SCHED_RESET_ON_FORK
    me = threading.get_native_id()
    try:
        os.sched_setscheduler(me, flags, os.sched_param(priority))
    except OSError as e:
        what = f"{POLICY_NAMES[policy]} priority {priority}"
        if e.errno != errno.EPERM:
            return f"{what} ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"
        may = permissions.facts()
        need, why = permissions.fifo_refusal(may["cap_sys_nice"], may["rlimit_rtprio"][0])
        hints.add(need)
        return f"{what} (EPERM: {why})"
    for tid, name in _tasks_with_io_thread():
        with contextlib.suppress(OSError):  # a thread that exited meanwhile
            if name.startswith(IO_THREAD_PREFIX):
                os.sched_setscheduler(
                    tid, flags, os.sched_param(io_priority(policy, priority, role))
                )
            elif tid != me and os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK in RT:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))  # chrt's, say
    return None


def _lock_memory(hints: set[str]) -> str | None:
    """mlockall: every page mapped now is faulted in and locked (MCL_CURRENT), and every page
    mapped later is locked when first touched (MCL_FUTURE | MCL_ONFAULT). Without ONFAULT a
    later mapping is faulted in whole at once: pyarrow's allocator reserves 1 GiB at the first
    log chunk, and zero-filling it stalled the loop (1-18% misses at 1 kHz; 0.03% with it).
    Under a finite memlock limit without CAP_IPC_LOCK it is not tried: every allocation past
    the limit would fail later, and the process with it."""
    may = permissions.facts()
    refused = permissions.memlock_refusal(may["rlimit_memlock"][0], may["cap_ipc_lock"])
    if refused is not None:
        hints.add("memlock")
        return f"locked memory ({refused}; the process maps {_kb('VmSize') >> 10} MiB)"
    for flags in (MCL_CURRENT, MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT):
        if _libc.mlockall(flags) != 0:
            code = ctypes.get_errno()
            hints.add("memlock")
            return f"locked memory ({errno.errorcode.get(code, code)}: {os.strerror(code)})"
    return None


_held_latency_requests: list[Any] = []
"""Open PM QoS requests (/dev/cpu_dma_latency): the kernel keeps one while its file is open,
so these stay open until the process exits."""


def _hold_cpus_awake(hints: set[str]) -> str | None:
    """Ask the kernel for a CPU wake-up latency of 0 us for as long as the process lives (PM
    QoS, what cyclictest does): idle CPUs then poll instead of halting. On this VM a message to
    a halted vCPU took 41 us to be read at the median and 277 us at the 99th percentile; with
    the request held, 23 and 59 us (1 kHz node and HalfCheetah bridge, 20 s)."""
    if _held_latency_requests:
        return None
    f = None
    try:
        f = open(permissions.CPU_LATENCY, "wb", buffering=0)  # noqa: SIM115 (held open)
        f.write(struct.pack("i", 0))
    except OSError as e:
        if f is not None:
            f.close()
        hints.add("cpu_latency")
        code = errno.errorcode.get(e.errno, e.errno) if e.errno else type(e).__name__
        return f"idle CPUs polling ({permissions.CPU_LATENCY}: {code}: {e.strerror})"
    _held_latency_requests.append(f)
    return None


def _set_cpus(cpus: list[int]) -> str | None:
    """The calling thread's CPUs first (its error is the one reported), then every thread's."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        allowed = sorted(os.sched_getaffinity(0))
        return f"CPUs {cpus} ({errno.errorcode.get(e.errno, e.errno)}: allowed are {allowed})"
    for tid, _ in _tasks():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)
    return None


def apply(cfg: RealtimeConfig, role: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Apply ``cfg`` to this process from its loop thread; return the settings in effect, read
    back from the OS. ``role`` is ``node`` (its clock collects garbage in slack time, so
    automatic collection goes off) or ``bridge`` (automatic collection stays on). Anything not
    permitted is said in one line through ``log``; the process carries on without it."""
    hints: set[str] = set()
    not_set = [_set_policy(cfg, hints, role)]
    locked = False
    if cfg.lock_memory:
        not_set.append(_lock_memory(hints))
        locked = not_set[-1] is None
    if isinstance(cfg.cpus, list):
        not_set.append(_set_cpus(cfg.cpus))
    idle_poll = False
    if cfg.cpu_idle_poll:
        not_set.append(_hold_cpus_awake(hints))
        idle_poll = not_set[-1] is None
    if cfg.gc == "freeze":
        gc.collect()  # what start-up left as garbage is freed, not frozen forever
        gc.freeze()
        if role == "node":
            gc.disable()
    failed = [n for n in not_set if n is not None]
    policy, priority = policy_of(threading.get_native_id())
    settings = {
        "requested": asdict(cfg),
        "sched_policy": policy,
        "sched_priority": priority,
        "memory_locked": locked,
        "vmlck_kb": _kb("VmLck"),  # locked mappings: reserved address space counts in full
        "vmrss_kb": _kb("VmRSS"),  # resident, and so locked, memory
        "cpus": sorted(os.sched_getaffinity(0)),
        "cpu_idle_poll": idle_poll,
        "gc": {"policy": cfg.gc, "automatic": gc.isenabled(), "frozen": gc.get_freeze_count()},
        "not_set": failed,
    }
    if failed:
        memory = "" if locked or not cfg.lock_memory else ", memory not locked"
        permit = f"; {permissions.permit(hints)}" if hints else ""
        log(
            f"real-time: not set: {', '.join(failed)}{permit}; serving on with {policy}{memory}, "
            f"CPUs {settings['cpus']}"
        )
    return settings


def describe(settings: dict[str, Any]) -> str:
    """Settings in effect as one line: ``SCHED_FIFO 50, CPUs [1], memory locked (380 MiB
    resident), idle CPUs polling, gc freeze``."""
    gc_policy = settings["gc"]["policy"] if isinstance(settings["gc"], dict) else settings["gc"]
    locked = settings["memory_locked"]
    rss = settings.get("vmrss_kb", 0) >> 10
    memory = f"memory locked ({rss} MiB resident)" if locked else "memory unlocked"
    not_set = settings.get("not_set") or []
    idle = ", idle CPUs polling" if settings.get("cpu_idle_poll") else ""
    return (
        f"{settings['sched_policy']} {settings['sched_priority']}, CPUs {settings['cpus']}, "
        f"{memory}{idle}, gc {gc_policy}" + (f"; not set: {', '.join(not_set)}" if not_set else "")
    )


def helper_thread() -> None:
    """First call of a helper thread (log writer, deploy loader): SCHED_OTHER whatever it
    inherited, so it can never starve the loop; and its Python name as its OS name (ps -L)."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_OTHER, os.sched_param(0))
    _libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def assign_cpus(node: RealtimeConfig, bridges: list[RealtimeConfig], available: set[int]) -> None:
    """The launcher's ``cpus: auto``, resolved in place: with two CPUs or more the node gets
    the last one (CPU 0 takes most interrupts) alone, and the bridges the others, one each when
    there are enough, else sharing them; with one CPU nothing is pinned."""
    cpus = sorted(available)
    named = {c for b in bridges if isinstance(b.cpus, list) for c in b.cpus}
    if node.cpus == "auto":
        free = [c for c in cpus if c not in named]
        node.cpus = [free[-1]] if len(cpus) >= 2 and free else "all"
    ours = set(node.cpus) if isinstance(node.cpus, list) else set()
    rest = [c for c in cpus if c not in ours] if ours else []
    auto = [b for b in bridges if b.cpus == "auto"]
    for i, b in enumerate(auto):
        b.cpus = "all" if not rest else [rest[i]] if len(rest) >= len(auto) else list(rest)


# -- the node's garbage collection ------------------------------------------------------------
class SlackGC:
    """gc ``freeze`` on the node: automatic collection is off, and :meth:`collect` (called from
    the clock's wait) collects the generation that is due, by Python's own thresholds, only
    while the time left before the deadline is comfortably more than that collection's
    measured cost. An older generation that does not fit waits (a younger one goes instead)
    while its cost estimate eases, so that it is tried again later: its garbage is freed late,
    never kept for good."""

    MARGIN = 2  # the slack must exceed MARGIN x the estimated cost ...
    FLOOR_NS = 50_000  # ... plus this
    FORCE = 10  # with FORCE x the gen-0 threshold pending and no slack, collect gen 0 anyway

    def __init__(self) -> None:
        gc.disable()
        self.thresholds = [t or 700 for t in gc.get_threshold()]
        self.cost_ns = [max(self._timed(g), 20_000) for g in range(3)]
        self.collections = [0, 0, 0]
        self.max_ns = [0, 0, 0]
        self.forced = 0

    @staticmethod
    def _timed(generation: int) -> int:
        t = time.perf_counter_ns()
        gc.collect(generation)
        return time.perf_counter_ns() - t

    def _fits(self, generation: int, remaining_ns: int) -> bool:
        return remaining_ns > self.MARGIN * self.cost_ns[generation] + self.FLOOR_NS

    def collect(self, remaining_ns: int) -> bool:
        """Collect if a generation is due and fits in ``remaining_ns``; True if it did."""
        count, threshold = gc.get_count(), self.thresholds
        if count[0] < threshold[0]:
            return False
        if not self._fits(0, remaining_ns):
            if count[0] < self.FORCE * threshold[0]:
                return False
            self.forced += 1
        gen = 2 if count[2] >= threshold[2] else 1 if count[1] >= threshold[1] else 0
        while gen and not self._fits(gen, remaining_ns):
            self.cost_ns[gen] -= self.cost_ns[gen] // 16  # ease it, so it is tried again later
            gen -= 1
        cost = self._timed(gen)
        self.cost_ns[gen] = max(cost, self.cost_ns[gen] * 15 // 16)  # a slowly decaying max
        self.collections[gen] += 1
        self.max_ns[gen] = max(self.max_ns[gen], cost)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "forced": self.forced,
            "cost_estimate_us": [round(c / 1e3, 1) for c in self.cost_ns],
            "max_us": [round(c / 1e3, 1) for c in self.max_ns],
        }
