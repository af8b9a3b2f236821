"""``ddpg doctor``: what this machine allows for real-time control, like cyclictest plus a checklist.

It reads what the kernel and this process's limits say (PREEMPT_RT, permission for SCHED_FIFO,
the locked-memory limit, isolated CPUs, SMT, the frequency governor, irqbalance), then times a
bare Python absolute-deadline loop (``next += period``; a passed deadline is counted and skipped,
as the node's loop does) once per scheduling policy: SCHED_OTHER, and where permitted SCHED_FIFO
with and without a short busy-wait before each deadline. The misses measured decide whether the
asked rate is held here; every problem found comes with the line that fixes it.

Standard library only (so is ``permissions.py``, the facts and words it shares with the node's
real-time settings): the doctor must run where the node cannot start yet. Each loop runs on its
own thread, because Linux applies a scheduling policy per thread. Priorities are capped at 80,
below the kernel's own real-time threads, and the busy-wait is bounded per period (at most half
of it), so a SCHED_FIFO loop always sleeps and can never starve the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control_node import permissions

FIFO_PRIORITY = 50  # the node's default, as ros2_control uses
MAX_PRIORITY = 80  # below the kernel's own real-time threads (migration and watchdog at 99)
MISS_TARGET = 0.001  # issue 13's target for the node at 1 kHz: at most 0.1% missed deadlines

EXAMPLES = """\
examples:
  ddpg doctor                          # 1 kHz, about 5 s per scheduling policy, as a table
  ddpg doctor --rate-hz 500 --json     # the verdict for 500 Hz, as JSON
  ddpg doctor --seconds 20             # longer loops resolve rarer misses
"""


def _bounded(kind: type, low: float, high: float, low_open: bool = True) -> Callable[[str], Any]:
    """An argparse type: a number in (low, high] (or [low, high]), else one error line."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > low if low_open else value >= low) or value > high:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and <= {high:,.0f}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument(
        "--seconds",
        type=_bounded(float, 0, 600),
        default=5.0,
        metavar="S",
        help="how long each loop runs (default: 5; three loops where SCHED_FIFO is permitted)",
    )
    parser.add_argument(
        "--rate-hz",
        type=_bounded(float, 0, 1_000_000),
        default=1000.0,
        metavar="R",
        help="the loop rate to measure and judge (default: 1000)",
    )
    parser.add_argument(
        "--priority",
        type=_bounded(int, 1, MAX_PRIORITY, low_open=False),
        default=FIFO_PRIORITY,
        metavar="P",
        help=f"SCHED_FIFO priority of the real-time loops, 1-{MAX_PRIORITY} "
        f"(default: {FIFO_PRIORITY})",
    )
    parser.add_argument(
        "--spin-us",
        type=_bounded(float, 0, 10_000, low_open=False),
        default=200.0,
        metavar="US",
        help="busy-wait before each deadline in the spin loop, at most half a period "
        "(default: 200)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


# -- what the system says -------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpulist(text: str | None) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8] (the kernel's cpulist format; empty or missing -> [])."""
    cpus: list[int] = []
    for part in (text or "").split(","):
        low, _, high = part.strip().partition("-")
        if low.isdigit() and (high.isdigit() or not high):  # skips "(null)" and isolcpus flags
            cpus += range(int(low), int(high or low) + 1)
    return cpus


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> ``"0-2,5"``; [] -> ``"none"``."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and c == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out) or "none"


def _cmdline_value(cmdline: str, key: str) -> str | None:
    for token in cmdline.split():
        if token.startswith(f"{key}="):
            return token.split("=", 1)[1]
    return None


def kernel_facts() -> dict[str, Any]:
    """Release, preemption model (PREEMPT_RT or not) and the kernel's RT throttling."""
    uname = os.uname()
    tokens = uname.version.split()
    preempt_rt = _read("/sys/kernel/realtime") == "1" or "PREEMPT_RT" in tokens
    model = next((t for t in tokens if t.startswith("PREEMPT")), "none or voluntary")
    mode = _read("/sys/kernel/debug/sched/preempt")  # "none voluntary (full) lazy"
    if mode and "(" in mode:
        mode = mode.split("(")[1].split(")")[0]
    else:
        mode = _cmdline_value(_read("/proc/cmdline") or "", "preempt")
    runtime = _read("/proc/sys/kernel/sched_rt_runtime_us")
    period = _read("/proc/sys/kernel/sched_rt_period_us")
    return {
        "kernel": uname.release,
        "kernel_version": uname.version,
        "preempt_rt": preempt_rt,
        "preempt": model + (f" ({mode})" if mode and model == "PREEMPT_DYNAMIC" else ""),
        "rt_throttle_us": None if runtime is None else [int(runtime), int(period or 0)],
    }


def _probe_fifo(priority: int) -> str | None:
    """None when a thread of this process may take SCHED_FIFO ``priority``, else the OS's reason.
    Tried for real on a short-lived thread, which drops back to SCHED_OTHER at once."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except (OSError, AttributeError) as e:
            result.append(getattr(e, "strerror", None) or str(e))
            return
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        result.append(None)

    thread = threading.Thread(target=attempt, name="doctor-probe", daemon=True)
    thread.start()
    thread.join()
    return result[0]


def realtime_facts(priority: int) -> dict[str, Any]:
    """May this process run SCHED_FIFO (CAP_SYS_NICE or RLIMIT_RTPRIO), and lock its memory?"""
    may = permissions.facts()
    rt_soft = may["rlimit_rtprio"][0]
    if not may["cap_sys_nice"] and rt_soft != "unlimited" and 0 < rt_soft < priority:
        priority = rt_soft  # the most the rtprio limit allows without the capability
    refused = _probe_fifo(priority)
    return {
        "realtime_permitted": refused is None,
        "realtime": {
            "fifo_priority": priority if refused is None else None,
            "refused": refused,
            "cap_sys_nice": may["cap_sys_nice"],
            "rlimit_rtprio": may["rlimit_rtprio"],
        },
        "memlock_limit": may["rlimit_memlock"][0],
        "memlock": {"hard": may["rlimit_memlock"][1], "cap_ipc_lock": may["cap_ipc_lock"]},
    }


def _running(name: str) -> bool:
    return any(_read(comm) == name for comm in glob.glob("/proc/[0-9]*/comm"))


def cpu_facts() -> dict[str, Any]:
    """CPUs online and ours, isolation, SMT siblings, frequency governors, idle driver."""
    cmdline = _read("/proc/cmdline") or ""
    base = "/sys/devices/system/cpu"
    governors: dict[str, list[int]] = {}
    for path in sorted(glob.glob(f"{base}/cpu[0-9]*/cpufreq/scaling_governor")):
        cpu = int(path.split("/")[5][3:])
        governors.setdefault(_read(path) or "?", []).append(cpu)
    siblings = {
        _read(p) or "" for p in glob.glob(f"{base}/cpu[0-9]*/topology/thread_siblings_list")
    }
    return {
        "count": os.cpu_count() or 0,
        "affinity": sorted(os.sched_getaffinity(0)),
        "isolated": _cpulist(_read(f"{base}/isolated")),
        "isolcpus": _cpulist(_cmdline_value(cmdline, "isolcpus")),  # "domain,2-3" too
        "nohz_full": _cpulist(_read(f"{base}/nohz_full") or _cmdline_value(cmdline, "nohz_full")),
        "smt_active": _read(f"{base}/smt/active") == "1",
        "smt_siblings": sorted(s for s in siblings if len(_cpulist(s)) > 1),
        "governors": governors,
        "cpuidle": _read(f"{base}/cpuidle/current_driver"),
        "cpu_latency": cpu_latency_facts(),
    }


def cpu_latency_facts() -> dict[str, Any]:
    """The PM QoS device the node holds at 0 (``cpu_idle_poll``): may this user write it, and
    the kernel's latency target now (2000000000 us: no process asks for one)."""
    path = permissions.CPU_LATENCY
    current = None
    try:
        with open(path, "rb") as f:
            current = struct.unpack("i", f.read(4))[0]
    except (OSError, struct.error):
        pass
    return {"path": path, "writable": os.access(path, os.W_OK), "current_us": current}


def rt_threads() -> list[dict[str, Any]]:
    """Other processes' user-space threads under SCHED_FIFO or SCHED_RR: whenever one at the
    loop's priority or above is ready, it runs first. (Kernel threads are left out: the
    migration and irq threads are meant to be there.)"""
    found = []
    for path in glob.glob("/proc/[0-9]*/task/[0-9]*/stat"):
        parts = path.split("/")
        text = _read(path)
        if text is None or int(parts[2]) == os.getpid():
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        flags, rt_priority, policy = int(rest[6]), int(rest[37]), int(rest[38])
        if policy in (1, 2) and not flags & 0x00200000:  # SCHED_FIFO/RR, not PF_KTHREAD
            found.append(
                {
                    "pid": int(parts[2]),
                    "tid": int(parts[4]),
                    "comm": comm,
                    "policy": "SCHED_FIFO" if policy == 1 else "SCHED_RR",
                    "priority": rt_priority,
                }
            )
    return sorted(found, key=_by_priority)


def _by_priority(thread: dict[str, Any]) -> tuple[int, int, int]:
    return -thread["priority"], thread["pid"], thread["tid"]


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (idle and iowait are idle)."""
    fields = [int(x) for x in (_read("/proc/stat") or "cpu 0 0 0 1").splitlines()[0].split()[1:]]
    idle = sum(fields[3:5])
    return sum(fields) - idle, sum(fields)


def system_facts(priority: int) -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo") or ""
    return {
        **kernel_facts(),
        **realtime_facts(priority),
        "cpus": cpu_facts(),
        "irqbalance": _running("irqbalance"),
        "rt_threads": rt_threads(),
        "virtual_machine": " hypervisor" in cpuinfo or _read("/sys/hypervisor/type") is not None,
    }


# -- the loops ------------------------------------------------------------------------------------
def _set_timer_slack(ns: int) -> None:
    """As the node does: ask Linux to wake this thread within ``ns`` of its timeouts (the default
    50 us slack of a SCHED_OTHER thread is a twentieth of a 1 kHz period)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK


def _percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] / 1e3, 1)


def deadline_loop(
    rate_hz: float,
    seconds: float,
    spin_us: float = 0.0,
    stall: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The bare loop: sleep until ``spin_us`` before each absolute deadline, busy-wait the rest,
    note the lateness; ``next += period``; a deadline already passed is counted and skipped, never
    caught up. ``stall(ticks)`` runs after each tick (a test's way to force overruns)."""
    now, sleep = time.monotonic_ns, time.sleep
    period = round(1e9 / rate_hz)
    spin = min(round(spin_us * 1e3), period // 2)  # bounded: the loop sleeps at least half
    late: list[int] = []
    ticks = misses = 0
    start = now()
    end = start + round(seconds * 1e9)
    next_tick = start + period
    while True:
        wake = next_tick - spin
        while (remaining := wake - now()) > 0:
            sleep(remaining / 1e9)
        while now() < next_tick:  # at most ``spin`` ns: the sleep ended at or after ``wake``
            pass
        late.append(now() - next_tick)
        ticks += 1
        if stall is not None:
            stall(ticks)
        next_tick += period
        t = now()
        if t > next_tick:  # overran one or more deadlines: count them and skip them
            missed = (t - next_tick) // period + 1
            misses += missed
            next_tick += missed * period
        if t >= end:
            break
    late.sort()
    elapsed = (now() - start) / 1e9
    return {
        "rate_hz": rate_hz,
        "spin_us": spin / 1e3,
        "seconds": round(elapsed, 3),
        "ticks": ticks,
        "misses": misses,
        "miss_ratio": misses / (ticks + misses),
        "achieved_hz": round(ticks / elapsed, 1),
        "lateness_us": {q: _percentile(late, v) for q, v in (("p50", 0.5), ("p99", 0.99))}
        | {"max": round(late[-1] / 1e3, 1)},
    }


def run_loop(
    policy: str,
    priority: int,
    rate_hz: float,
    seconds: float,
    spin_us: float,
    idle_poll: bool = False,
) -> dict[str, Any]:
    """:func:`deadline_loop` on a thread of its own scheduled under ``policy``; ``idle_poll``:
    with a PM QoS request of 0 us held meanwhile, as the node holds it (``cpu_idle_poll``)."""
    out: dict[str, Any] = {
        "policy": policy,
        "priority": priority if policy != "SCHED_OTHER" else 0,
        "idle_poll": idle_poll,
    }
    failed: list[OSError] = []

    def body() -> None:
        try:
            os.sched_setscheduler(0, getattr(os, policy), os.sched_param(out["priority"]))
        except OSError as e:
            failed.append(e)
            return
        _set_timer_slack(1000)
        if not idle_poll:
            out.update(deadline_loop(rate_hz, seconds, spin_us))
            return
        with open(permissions.CPU_LATENCY, "wb", buffering=0) as request:
            request.write(struct.pack("i", 0))
            out.update(deadline_loop(rate_hz, seconds, spin_us))

    thread = threading.Thread(target=body, name=f"doctor-{policy}", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise OSError(f"could not set {policy} {out['priority']}: {failed[0].strerror}")
    spin = f" + spin {out['spin_us']:g} us" if out.get("spin_us") else ""
    idle = " + idle poll" if idle_poll else ""
    out["label"] = f"{policy}" + (f" {priority}" if out["priority"] else "") + idle + spin
    return out


def measure(
    facts: dict[str, Any], rate_hz: float, seconds: float, spin_us: float
) -> list[dict[str, Any]]:
    """SCHED_OTHER, then (where permitted) SCHED_FIFO, SCHED_FIFO with idle CPUs polling (where
    the PM QoS device is writable: the node's default), then SCHED_FIFO with the bounded spin.
    Adds to ``facts`` what only shows while they run: how busy the CPUs were, and other real-time
    threads, looked for again after each loop (they come and go)."""
    specs = [("SCHED_OTHER", 0, 0.0, False)]
    if facts["realtime_permitted"]:
        priority = facts["realtime"]["fifo_priority"]
        specs.append(("SCHED_FIFO", priority, 0.0, False))
        if facts["cpus"]["cpu_latency"]["writable"]:
            specs.append(("SCHED_FIFO", priority, 0.0, True))
        if spin_us > 0:
            specs.append(("SCHED_FIFO", priority, spin_us, False))
    seen = {(t["pid"], t["tid"]): t for t in facts["rt_threads"]}
    busy0, total0 = _cpu_times()
    loops = []
    for policy, priority, spin, idle_poll in specs:
        loops.append(run_loop(policy, priority, rate_hz, seconds, spin, idle_poll))
        seen.update({(t["pid"], t["tid"]): t for t in rt_threads()})
    busy1, total1 = _cpu_times()
    facts["rt_threads"] = sorted(seen.values(), key=_by_priority)
    facts["load"] = {
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpu_busy_ratio": round((busy1 - busy0) / max(total1 - total0, 1), 3),
    }
    return loops


# -- what to do about it --------------------------------------------------------------------------
def _pct(ratio: float) -> str:
    return f"{100 * ratio:.3f}%"


def _figures(lp: dict[str, Any]) -> str:
    late = lp["lateness_us"]
    return f"{lp['label']}: {_pct(lp['miss_ratio'])} misses, lateness p99 {late['p99']:g} us"


def verdict(loops: list[dict[str, Any]], rate_hz: float, permitted: bool) -> dict[str, Any]:
    """Does a loop here hold ``rate_hz`` within the miss target, and which is the simplest that
    does? (The loops come simplest first: SCHED_OTHER, SCHED_FIFO, with idle polling, with the
    spin.)"""
    held = [lp for lp in loops if lp["miss_ratio"] <= MISS_TARGET]
    best = min(loops, key=lambda lp: (lp["miss_ratio"], lp["lateness_us"]["p99"]))
    other, target = loops[0], f"target <= {_pct(MISS_TARGET)}"
    if other in held:
        line = f"{rate_hz:g} Hz is held even by the default scheduler ({_figures(other)})"
    elif held:
        line = (
            f"{rate_hz:g} Hz needs real-time scheduling here ({_figures(other)}; "
            + "; ".join(map(_figures, held))
            + "): keep the node's realtime settings on"
            + (", with spin_us" if held[0].get("spin_us") else "")
        )
    elif not permitted:
        line = (
            f"{rate_hz:g} Hz is not held ({_figures(other)}, {target}) and SCHED_FIFO is not "
            "permitted: permit it (see above) and run ddpg doctor again, or lower the rate"
        )
    else:
        line = (
            f"{rate_hz:g} Hz is not held here (best {_figures(best)}, {target}): act on the "
            "advice above, or lower the rate"
        )
    periods = best["ticks"] + best["misses"]
    if periods < 2 / MISS_TARGET:
        line += (
            f" (only {periods} periods measured: a longer --seconds resolves {_pct(MISS_TARGET)})"
        )
    return {
        "rate_hz": rate_hz,
        "target_miss_ratio": MISS_TARGET,
        "held": bool(held),
        "loop": (held[0] if held else best)["label"],
        "line": line,
    }


def _realtime_advice(f: dict[str, Any]) -> list[str]:
    """SCHED_FIFO refused (the node wants its memory locked too, so that is permitted with it),
    capped below the node's priority, or mlockall not tried: why, and how to permit it."""
    rt, lines = f["realtime"], []
    if not f["realtime_permitted"]:
        need, why = permissions.fifo_refusal(rt["cap_sys_nice"], rt["rlimit_rtprio"][0])
        needs = {need, "memlock"} if need == "rtprio" else {need}
        lines.append(
            f"SCHED_FIFO is not permitted ({rt['refused']}; {why}); {permissions.permit(needs)}"
        )
    elif not rt["cap_sys_nice"] and rt["fifo_priority"] < FIFO_PRIORITY:
        lines.append(
            f"RLIMIT_RTPRIO {rt['rlimit_rtprio'][0]} caps SCHED_FIFO at priority "
            f"{rt['fifo_priority']} (the node asks for {FIFO_PRIORITY}); "
            + permissions.permit({"rtprio"})
        )
    refused = permissions.memlock_refusal(f["memlock_limit"], f["memlock"]["cap_ipc_lock"])
    if refused is not None:
        lines.append(
            f"{refused}, so the node does not lock its memory (mlockall); "
            + permissions.permit({"memlock"})
        )
    return lines


def _kernel_advice(f: dict[str, Any]) -> list[str]:
    if f["preempt_rt"]:
        return []
    line = (
        f"kernel {f['kernel']} is not PREEMPT_RT ({f['preempt']}): its worst-case latency has no "
        "bound; for hard real time boot a PREEMPT_RT kernel (CONFIG_PREEMPT_RT, mainline since "
        "6.12; Debian linux-image-rt-amd64, Ubuntu `pro enable realtime-kernel`)"
    )
    if f["preempt"].startswith("PREEMPT_DYNAMIC") and "(full)" not in f["preempt"]:
        line += "; short of that, `preempt=full` on the kernel command line"
    return [line]


def _cpu_advice(f: dict[str, Any]) -> list[str]:
    c, lines = f["cpus"], []
    slow = {g: cpus for g, cpus in c["governors"].items() if g != "performance"}
    for gov, cpus in slow.items():
        lines.append(
            f"cpufreq governor is {gov} on CPUs {_ranges(cpus)}: frequency changes add latency; "
            "`cpupower frequency-set -g performance` (or write performance to "
            "/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor)"
        )
    if not (c["isolated"] or c["isolcpus"] or c["nohz_full"]):
        last = c["affinity"][-1] if c["affinity"] else 1
        lines.append(
            f"no isolated CPUs: boot with `isolcpus={last} nohz_full={last} rcu_nocbs={last}` "
            f"and pin the node there (realtime affinity in launch.yaml, or `taskset -c {last}`)"
            + (
                f"; with {c['count']} CPUs that leaves {c['count'] - 1} for everything else"
                if c["count"] <= 2
                else ""
            )
        )
    elif not set(c["affinity"]) <= set(c["isolated"] or c["isolcpus"] or c["nohz_full"]):
        iso = c["isolated"] or c["isolcpus"] or c["nohz_full"]
        lines.append(f"CPUs {_ranges(iso)} are isolated: pin the node to them (taskset -c)")
    if c["smt_siblings"]:
        lines.append(
            f"SMT is on (siblings {', '.join(c['smt_siblings'])}): a busy sibling slows the "
            "real-time core; `nosmt` on the kernel command line or `echo off > "
            "/sys/devices/system/cpu/smt/control`, or keep the node's sibling idle"
        )
    latency = c["cpu_latency"]
    if not latency["writable"]:
        lines.append(
            f"{latency['path']} is not writable here, so the node and bridges cannot keep idle "
            "CPUs polling (cpu_idle_poll): a halted CPU wakes tens to hundreds of us late for a "
            f"message (a VM's vCPU above all); {permissions.permit({'cpu_latency'})}"
        )
    elif c["cpuidle"] in ("intel_idle", "acpi_idle", "haltpoll"):
        lines.append(
            f"cpuidle driver {c['cpuidle']}: waking an idle CPU costs up to hundreds of us; the "
            f"node and bridges hold {latency['path']} at 0 while they run (cpu_idle_poll, as "
            "cyclictest does); for everything else boot with `processor.max_cstate=1 "
            "intel_idle.max_cstate=0` (a VM: `idle=poll`)"
        )
    return lines


def _processes(threads: list[dict[str, Any]], most: int = 4) -> str:
    """Real-time threads by process: ``python (pid 12, 2 threads, FIFO 50), ...``."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for t in threads:
        by_pid.setdefault(t["pid"], []).append(t)
    named = [
        f"{ts[0]['comm']} (pid {pid}, {len(ts)} thread{'s' * (len(ts) > 1)}, "
        f"{ts[0]['policy'][6:]} {max(t['priority'] for t in ts)})"
        for pid, ts in by_pid.items()
    ]
    more = f" and {len(named) - most} more processes" if len(named) > most else ""
    return ", ".join(named[:most]) + more


def advice(f: dict[str, Any], v: dict[str, Any]) -> list[str]:
    """Lines a user can act on, most important first, ending with the verdict."""
    lines = _realtime_advice(f) + _kernel_advice(f) + _cpu_advice(f)
    if f["irqbalance"]:
        lines.append(
            "irqbalance is running: it may move interrupts onto the real-time CPU; set "
            "IRQBALANCE_BANNED_CPUS to it or `systemctl disable --now irqbalance`"
        )
    rivals = [t for t in f["rt_threads"] if t["priority"] >= (f["realtime"]["fifo_priority"] or 1)]
    if rivals:
        lines.append(
            f"{len(rivals)} real-time threads of other processes ran at the loop's priority or "
            f"above ({_processes(rivals)}): the loop waits while one of them runs; give the "
            "node a higher priority than theirs or keep them on other CPUs"
        )
    load = f["load"]
    if load["cpu_busy_ratio"] > 0.5:
        lines.append(
            f"the CPUs were {100 * load['cpu_busy_ratio']:.0f}% busy while the loops ran (load "
            f"average {load['loadavg_1m']:g}, these loops included): other work competes with "
            "the loop; move it to other CPUs, or measure again on a quiet machine"
        )
    if f["virtual_machine"]:
        lines.append(
            "this is a virtual machine: the host schedules its vCPUs, so some latency comes from "
            "outside; pin the vCPUs on the host, or measure on the robot computer itself"
        )
    return [*lines, f"verdict: {v['line']}"]


# -- the report -----------------------------------------------------------------------------------
def report(rate_hz: float, seconds: float, priority: int, spin_us: float) -> dict[str, Any]:
    facts = system_facts(priority)
    loops = measure(facts, rate_hz, seconds, spin_us)
    v = verdict(loops, rate_hz, facts["realtime_permitted"])
    return {**facts, "loops": loops, "verdict": v, "advice": advice(facts, v)}


def _fact_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rt, c = r["realtime"], r["cpus"]
    fifo = (
        f"permitted, loops at priority {rt['fifo_priority']}"
        if r["realtime_permitted"]
        else f"not permitted ({rt['refused']})"
    )
    throttle = r["rt_throttle_us"]
    governors = ", ".join(f"{g} on {_ranges(cpus)}" for g, cpus in c["governors"].items())
    return [
        (
            "kernel",
            f"{r['kernel']}  {r['preempt']}  PREEMPT_RT {'yes' if r['preempt_rt'] else 'no'}",
        ),
        (
            "SCHED_FIFO",
            f"{fifo}; CAP_SYS_NICE {'yes' if rt['cap_sys_nice'] else 'no'}, "
            f"RLIMIT_RTPRIO {rt['rlimit_rtprio'][0]} (hard {rt['rlimit_rtprio'][1]})",
        ),
        (
            "memlock",
            f"RLIMIT_MEMLOCK {permissions.size(r['memlock_limit'])}, CAP_IPC_LOCK "
            f"{'yes' if r['memlock']['cap_ipc_lock'] else 'no'}",
        ),
        (
            "cpus",
            f"{c['count']} online, affinity {_ranges(c['affinity'])}, isolated "
            f"{_ranges(c['isolated'] or c['isolcpus'])}, nohz_full {_ranges(c['nohz_full'])}",
        ),
        (
            "SMT",
            f"{'on' if c['smt_active'] else 'off'}"
            + (f", siblings {' '.join(c['smt_siblings'])}" if c["smt_siblings"] else ""),
        ),
        ("cpufreq", governors or "not exposed (no governor to set)"),
        ("cpuidle", c["cpuidle"] or "-"),
        (
            "cpu latency",
            f"{c['cpu_latency']['path']} "
            f"{'writable' if c['cpu_latency']['writable'] else 'not writable'}, target now "
            f"{c['cpu_latency']['current_us']} us",
        ),
        ("irqbalance", "running" if r["irqbalance"] else "not running"),
        (
            "RT throttle",
            "-"
            if throttle is None
            else "off"
            if throttle[0] < 0
            else f"SCHED_FIFO gets {throttle[0]} of every {throttle[1]} us",
        ),
        ("virtual", "yes (hypervisor)" if r["virtual_machine"] else "no"),
        (
            "RT threads",
            _processes(r["rt_threads"]) or "none in user space, before or between the loops",
        ),
        (
            "load",
            f"CPUs {100 * r['load']['cpu_busy_ratio']:.0f}% busy during the loops, load "
            f"average {r['load']['loadavg_1m']:g}",
        ),
    ]


def format_report(r: dict[str, Any]) -> str:
    """The table form: the same facts as the JSON, a row per loop, then the advice."""
    lines = [f"{k:<12} {v}" for k, v in _fact_rows(r)]
    head = f"{'loop':<30}{'rate Hz':>9}{'ticks':>8}{'misses':>8}{'miss ratio':>12}"
    lines += ["", head + f"{'late p50':>10}{'p99':>8}{'max (us)':>10}"]
    for lp in r["loops"]:
        late = lp["lateness_us"]
        lines.append(
            f"{lp['label']:<30}{lp['rate_hz']:>9g}{lp['ticks']:>8}{lp['misses']:>8}"
            f"{_pct(lp['miss_ratio']):>12}{late['p50']:>10.1f}{late['p99']:>8.1f}{late['max']:>10.1f}"
        )
    lines += ["", "advice:"] + [f"  - {line}" for line in r["advice"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.json:
        n = 4 if args.spin_us else 3  # other, FIFO, FIFO + idle poll, FIFO + spin
        print(
            f"ddpg doctor: timing up to {n} loops of {args.seconds:g} s at {args.rate_hz:g} Hz ...",
            file=sys.stderr,
        )
    try:
        r = report(args.rate_hz, args.seconds, args.priority, args.spin_us)
    except KeyboardInterrupt:
        print("ddpg doctor: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"ddpg doctor: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
