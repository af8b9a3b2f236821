"""``ddpg logs DIR [DIR ...]``: what a transition log holds, without torch or pandas.

Reads every committed chunk (see :mod:`control_node.translog`) and prints counts, episodes and
returns per model: the first look at a robot's log before retraining on it. A crashed writer's
temp files and unreadable chunks are reported on stderr and skipped; directories of different
robots are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  ddpg logs logs/pendulum                      # counts, episodes, returns per model
  ddpg logs logs/robot-a logs/robot-b --json   # several directories of one robot, as JSON
  ddpg logs logs --to-minari robot/pendulum-v0 --out datasets   # a Minari dataset (minari extra)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="transition log directories"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON to stdout")
    parser.add_argument(
        "--to-minari",
        metavar="DATASET_ID",
        help="write the log as this Minari dataset (one episode per run of consecutive steps; "
        "needs the minari extra) instead of summarising it",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="ROOT",
        help="with --to-minari: the datasets root, as MINARI_DATASETS_PATH names it (default: "
        "MINARI_DATASETS_PATH, else ~/.minari/datasets)",
    )


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pixel_lines(s: dict[str, Any]) -> list[str]:
    """Pixel logs: the spec and how many frames are stored per transition (each frame once:
    about 1; obs and next_obs on every row would be 2 * stack)."""
    p = s["pixels"]
    if p is None:
        return []
    camera = "default" if p.get("camera") is None else p["camera"]
    view = "" if p.get("view") is None else f", view {p['view']}"
    return [
        f"{'pixels':<12} {p['size']}x{p['size']}, stack {p['stack']}, repeat {p['repeat']}, "
        f"camera {camera}{view}",
        f"{'frames':<12} {s['frames_stored']:,} stored ({_size(s['frame_bytes'])} each), "
        f"{s['frames_per_transition']:.3f} per transition, {s['segment_starts']:,} segment "
        f"starts (obs + next_obs per row: {2 * p['stack']})",
    ]


def format_summary(s: dict[str, Any]) -> str:
    """The human view of :func:`control_node.translog.summary.summarize`: a few aligned lines."""
    lines = [f"{'log':<12} {', '.join(s['dirs'])}"]
    if not s["transitions"]:
        lines.append(f"{'':<12} holds no transitions ({s['chunks']} readable chunks)")
    else:
        shape = (
            "(" + ", ".join(map(str, s["obs_shape"])) + ("," if len(s["obs_shape"]) == 1 else "")
        )
        lines += [
            f"{'env':<12} {s['env_id']}   obs {shape}) {s['obs_dtype']}   "
            f"act_dim {s['act_dim']}   schema v{s['schema_version']}",
            f"{'chunks':<12} {s['chunks']}   {_size(s['bytes'])}   "
            f"{_size(round(s['bytes_per_transition']))} per transition",
            *_pixel_lines(s),
            f"{'transitions':<12} {s['transitions']:,} from {len(s['bridges'])} bridges "
            f"({s['bridge_sessions']} sessions) over {s['span_s']:.1f} s, "
            f"{s['first_chunk_utc']} .. {s['last_chunk_utc']}",
            f"{'episodes':<12} {s['episodes_completed']:,} completed, "
            f"{s['mixed_model_episodes']['episodes']} under several models, "
            f"{s['episodes_partial']} with rows missing",
            f"{'safe':<12} {s['safe_actions']:,} safe actions",
            "",
        ]
        header = ("model", "transitions", "safe", "episodes", "return mean", "std", "min", "max")
        table = [header]
        rows = [(model or "(bridge)", m) for model, m in s["models"].items()]
        rows.append(("(mixed)", {"transitions": None, "safe_actions": None}))
        rows[-1][1].update(s["mixed_model_episodes"])
        for name, m in rows:
            table.append(
                (
                    name,
                    _num(m["transitions"], ","),
                    _num(m["safe_actions"], ","),
                    _num(m["episodes"], ","),
                    _num(m["return_mean"]),
                    _num(m["return_std"]),
                    _num(m["return_min"]),
                    _num(m["return_max"]),
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells).rstrip())
    if s["unreadable"] or s["leftovers"]:
        lines.append(
            f"skipped      {len(s['unreadable'])} unreadable chunks, "
            f"{len(s['leftovers'])} temp files of crashed writers (listed on stderr)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from control_node.translog.reader import read_logs
    from control_node.translog.schema import LogError
    from control_node.translog.summary import summarize

    def warn(line: str) -> None:
        print(f"ddpg logs: warning: {line}", file=sys.stderr)

    if args.to_minari is not None:
        return _to_minari(args, warn)
    if args.out is not None:
        print("ddpg logs: error: --out goes with --to-minari", file=sys.stderr)
        return 2
    try:
        contents = read_logs(args.dirs, warn=warn)
    except (LogError, OSError) as e:
        print(f"ddpg logs: error: {e}", file=sys.stderr)
        return 1
    summary = summarize(contents)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def _to_minari(args: argparse.Namespace, warn: Callable[[str], None]) -> int:
    """``--to-minari``: the export (:mod:`control_node.minari_export`) and one line about it."""
    from control_node.minari_export import ExportError, to_minari

    try:
        done = to_minari(args.dirs, args.to_minari, args.out, warn=warn)
    except (ExportError, OSError) as e:
        print(f"ddpg logs: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # Minari's own refusals (a malformed dataset id)
        print(f"ddpg logs: error: minari: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        ends = ", ".join(f"{n} {end}" for end, n in done["episode_ends"].items())
        print(
            f"minari dataset {done['dataset_id']} in {done['path']}: {done['total_episodes']} "
            f"episodes ({ends}), {done['total_steps']} steps of {done['transitions_logged']} "
            f"logged transitions; load it with MINARI_DATASETS_PATH={done['root']}"
        )
    return 0
