"""What machine a benchmark ran on, and how its JSON is written: every script records the same
machine fields, under ``machine``, next to any of its own."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
    """The fields every benchmark records about the machine, then the script's own
    (``extra``: load averages, library versions, ...)."""
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **extra,
    }


def write_result(out: Path, result: dict[str, Any], indent: int = 2, **extra: Any) -> None:
    """``result`` as indented JSON at ``out`` (its folder made), with ``machine(**extra)``
    under ``machine``; says where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine(**extra)}, indent=indent) + "\n")
    print(f"wrote {out}")
