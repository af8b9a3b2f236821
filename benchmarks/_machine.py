"""What machine a benchmark ran on, for its JSON: every script records the same fields."""

from __future__ import annotations

import json
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


def write_result(out: Path, result: dict[str, Any]) -> None:
    """``result`` and the CPU it ran on as indented JSON at ``out`` (its folder made); says
    where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": cpu_model()}, indent=2) + "\n")
    print(f"wrote {out}")
