"""What this process may do for real-time control, and how to permit what it may not.

One home for the OS facts and the words about them: the capabilities (``CapEff`` in
``/proc/self/status``), the RLIMIT_RTPRIO and RLIMIT_MEMLOCK limits, why SCHED_FIFO or mlockall
is refused, and the "to permit" clause (limits.conf, systemd, docker, the cgroup's real-time
budget). The node's one line (``realtime.py``) and ``ddpg doctor``'s advice (``doctor.py``) both
say them from here. Standard library only: the doctor must run where the node cannot start yet.
"""

from __future__ import annotations

import os
import pwd
import resource
from collections.abc import Iterable
from typing import Any

CAP_IPC_LOCK, CAP_SYS_NICE = 14, 23

# What permits each need, on a host (limits.conf line, systemd unit key) and in a container
# (docker flags); the order is the order they are said in.
_PERMITS = {
    "rtprio": ("rtprio 99", "LimitRTPRIO=99", "--cap-add=sys_nice --ulimit rtprio=99"),
    "rt_runtime": (None, None, "--cpu-rt-runtime=950000"),
    "memlock": ("memlock unlimited", "LimitMEMLOCK=infinity", "--ulimit memlock=-1"),
    "cpu_latency": (None, None, "--device=/dev/cpu_dma_latency"),
}
_RT_BUDGET = "a real-time budget for the cgroup (cpu.rt_runtime_us)"
CPU_LATENCY = "/dev/cpu_dma_latency"
_CPU_LATENCY_ACCESS = (
    f"write access to {CPU_LATENCY} (a udev rule: "
    '`KERNEL=="cpu_dma_latency", GROUP="realtime", MODE="0660"`)'
)


def proc_status() -> dict[str, str]:
    """``/proc/self/status`` as key -> value (``VmLck`` -> ``"1234 kB"``, ``CapEff`` -> hex)."""
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def capabilities() -> int:
    """This process's effective capability mask (0 where /proc does not say)."""
    try:
        return int(proc_status().get("CapEff", "0"), 16)
    except OSError:
        return 0


def limit(value: int) -> int | str:
    """A resource limit as JSON has it: the number, or ``"unlimited"``."""
    return "unlimited" if value == resource.RLIM_INFINITY else value


def size(value: int | str) -> str:
    """A memory limit (a number of bytes or ``"unlimited"``, as :func:`limit` gives it) as a
    person reads it: ``8 MiB``, ``64 KiB``, else exactly, ``100000 bytes``."""
    if isinstance(value, str) or value == resource.RLIM_INFINITY:
        return "unlimited"
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift} {unit}"
    return f"{value} bytes"


def facts() -> dict[str, Any]:
    """CAP_SYS_NICE, CAP_IPC_LOCK, and the soft and hard RLIMIT_RTPRIO and RLIMIT_MEMLOCK (as
    :func:`limit` gives them): what decides whether SCHED_FIFO and mlockall are permitted."""
    caps = capabilities()
    return {
        "cap_sys_nice": bool(caps >> CAP_SYS_NICE & 1),
        "cap_ipc_lock": bool(caps >> CAP_IPC_LOCK & 1),
        "rlimit_rtprio": [limit(v) for v in resource.getrlimit(resource.RLIMIT_RTPRIO)],
        "rlimit_memlock": [limit(v) for v in resource.getrlimit(resource.RLIMIT_MEMLOCK)],
    }


def fifo_refusal(cap_sys_nice: bool, rtprio: int | str) -> tuple[str, str]:
    """Why SCHED_FIFO was refused (EPERM), and the need that permits it (for :func:`permit`):
    with CAP_SYS_NICE only a cgroup without real-time time refuses it, else RLIMIT_RTPRIO is
    below the priority asked for."""
    if cap_sys_nice:
        return "rt_runtime", "this cgroup gives real-time tasks no time, despite CAP_SYS_NICE"
    return "rtprio", f"no CAP_SYS_NICE and RLIMIT_RTPRIO is {rtprio}"


def memlock_refusal(memlock: int | str, cap_ipc_lock: bool) -> str | None:
    """Why mlockall is not tried, or None where it may be: under a finite memlock limit without
    CAP_IPC_LOCK every allocation past the limit would fail later, and the process with it."""
    if memlock == "unlimited" or cap_ipc_lock:
        return None
    return f"RLIMIT_MEMLOCK is {size(memlock)}, not unlimited, and no CAP_IPC_LOCK"


def _user() -> str:
    """Who the limits.conf lines are for (`*` there does not cover root, so name the user)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "USER"


def permit(needs: Iterable[str]) -> str:
    """How to permit ``needs`` (``rtprio``, ``memlock``, ``rt_runtime``, ``cpu_latency``), as
    one clause: on a host (limits.conf, or a systemd unit, which does not read limits.conf;
    plus the cgroup's real-time budget and the PM QoS device's access), or in a container
    (docker flags)."""
    chosen = set(needs)
    wanted = [_PERMITS[k] for k in _PERMITS if k in chosen]
    user = _user()
    conf = [f"`{user} - {line}`" for line, _, _ in wanted if line]
    unit = [key for _, key, _ in wanted if key]
    host = []
    if conf:
        host.append(
            f"{' and '.join(conf)} in /etc/security/limits.conf or limits.d/ (then log in "
            f"again) or {' and '.join(unit)} in a systemd unit"
        )
    if "rt_runtime" in chosen:
        host.append(_RT_BUDGET)
    if "cpu_latency" in chosen:
        host.append(_CPU_LATENCY_ACCESS)
    docker = " ".join(flags for _, _, flags in wanted)
    return f"to permit: {', plus '.join(host)}, or in a container `docker run {docker}`"
