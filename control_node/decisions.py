"""Continual mode's record, ``OUT_DIR/decisions.jsonl``: one JSON object a line per retraining
round (what the gate measured, whether it deployed and why).

The continual trainer (``python -m training.continual``) appends; the launcher reads the lines
into its summary. The file is the only thing they share, so the launcher starts the trainer by
module name and imports nothing of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DECISIONS = "decisions.jsonl"


def append_decision(out_dir: Path, decision: dict[str, Any]) -> None:
    with (out_dir / DECISIONS).open("a") as f:
        f.write(json.dumps(decision) + "\n")


def read_decisions(out_dir: Path, since: str | None = None) -> list[dict[str, Any]]:
    """The decisions in ``out_dir/decisions.jsonl`` (those at or after ``since``, an ISO time)."""
    path = out_dir / DECISIONS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if since is None or r["time"] >= since]
