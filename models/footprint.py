"""What a candidate model costs to serve, measured in a process of its own: batch-1 inference
time on probe observations and the memory its checks and runs need.

The node's deploy loader runs ``python -m models.footprint`` with the model's bytes on stdin,
so a model that would build a gigantic tensor or run for minutes harms only this process: its
address space is capped at ``--max-memory-mb`` above what it holds before loading, its CPU time
at ``--cpu-s``, and the loader kills it at its deadline. It prints one JSON line:
``{"ok": true, "infer_us_p50": .., "infer_us_p99": .., "peak_mb": .., "stage": ..}`` or
``{"ok": false, "error": .., "stage": .., "peak_mb": ..}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import sys
from typing import Any

import numpy as np

from models.policy import OnnxPolicy, PolicyError, time_batch1

_PAGE = resource.getpagesize()
_ALLOC = re.compile(r"buffer of size (\d+)")
"""How onnxruntime names an allocation it could not make."""
_SLACK_MB = 64
"""Address space beyond the limit for the runtime's own small allocations."""


def _statm() -> tuple[int, int]:
    """(virtual size, resident size) of this process in bytes."""
    with open("/proc/self/statm") as f:
        size, resident = f.read().split()[:2]
    return int(size) * _PAGE, int(resident) * _PAGE


def _peak_mb(base_rss: int) -> float:
    """Peak resident memory above ``base_rss``, MB: VmHWM, this process image's own high-water
    mark (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(max(kb * 1024 - base_rss, 0) / 2**20, 1)


def measure(
    data: bytes, max_memory_mb: float, cpu_s: float, give_up_us: float, provider: str = "cpu"
) -> dict[str, Any]:
    """Load and check the model from ``data`` under the limits; time batch 1, then run the full
    runtime checks (a batch of probes) as the node's loader will."""
    soft = max(1, int(cpu_s))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    vsize, base_rss = _statm()
    cap = vsize + int((max_memory_mb + _SLACK_MB) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    stage = "load and first probe"
    try:
        policy = OnnxPolicy("candidate", data=data, probes=1, provider=provider)
        stage = "batch-1 inference"
        times = time_batch1(policy, give_up_ns=round(give_up_us * 1e3))
        p50, p99 = (float(np.percentile(times, q)) / 1e3 for q in (50, 99))
        out: dict[str, Any] = {"infer_us_p50": round(p50, 1), "infer_us_p99": round(p99, 1)}
        out["runs"] = len(times)
        if p50 <= give_up_us:
            stage = "probe batch"
            OnnxPolicy("candidate", data=data, provider=provider)  # the loader's checks, in full
        return {"ok": True, **out, "peak_mb": _peak_mb(base_rss), "stage": "done"}
    except MemoryError:
        return {"ok": False, "memory": True, "error": "out of memory", "stage": stage,
                "peak_mb": _peak_mb(base_rss)}  # fmt: skip
    except Exception as e:  # onnxruntime reports a failed allocation as its own error
        full = str(e)
        text = full.splitlines()[0][:300] if full else type(e).__name__
        alloc = _ALLOC.search(full)
        return {"ok": False, "memory": bool(alloc) or "memory" in full.lower(), "error": text,
                "alloc_bytes": int(alloc.group(1)) if alloc else None, "stage": stage,
                "peak_mb": _peak_mb(base_rss), "policy_error": isinstance(e, PolicyError)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.footprint", description=__doc__)
    parser.add_argument("--max-memory-mb", type=float, required=True)
    parser.add_argument("--cpu-s", type=float, required=True)
    parser.add_argument("--give-up-us", type=float, required=True,
                        help="stop timing once the median is over this")  # fmt: skip
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--cpus", default="", help="CPUs to run on (default: as inherited)")
    parser.add_argument("--provider", default="cpu", help="onnxruntime provider, as the node's")
    args = parser.parse_args(argv)
    with contextlib.suppress(OSError, ValueError):  # off the node's CPU, below its priority
        if args.cpus:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        os.nice(10)
    data = sys.stdin.buffer.read(args.max_bytes + 1)
    if len(data) > args.max_bytes:
        print(json.dumps({"ok": False, "error": "model larger than --max-bytes", "stage": "read"}))
        return 0
    fp = measure(data, args.max_memory_mb, args.cpu_s, args.give_up_us, args.provider)
    print(json.dumps(fp), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
