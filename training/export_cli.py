"""``ddpg export RUN_DIR``: the run's actor as ``actor.onnx``, checked for parity before writing.

Arguments only; the run directory is :mod:`training.rundir`'s (:func:`~training.rundir.export_run`)
and the export itself (graph, metadata, parity) :func:`models.export.export_actor`. Torch is
imported only when the command runs (``ddpg --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  ddpg export runs/pendulum                      # writes runs/pendulum/actor.onnx
  ddpg export runs/pendulum --out /tmp/pend.onnx --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a ddpg train run directory")
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="where to write (default: RUN_DIR/actor.onnx)"
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=None,
        metavar="N",
        help="probe observations for the parity check (default: 1024; at least 1000)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary to stdout")


def run(args: argparse.Namespace) -> int:
    from control_node.config import ConfigError
    from models.export import ExportError
    from models.policy import OnnxPolicy, PolicyError
    from sim_bridge.envs import EnvError
    from training.rundir import describe_export, export_run_report

    try:
        report = export_run_report(args.run_dir, args.out, args.probes)
        meta = OnnxPolicy(report.path).metadata
    except (ConfigError, EnvError, ExportError, PolicyError) as e:
        print(f"ddpg export: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        summary = {
            "path": str(report.path),
            "size_bytes": report.size_bytes,
            "parity_max_abs_diff": report.max_abs_diff,
            "parity_probes": report.probes,
            "nodes": report.nodes,
            "metadata": meta.to_dict(),
        }
        print(json.dumps(summary, indent=2))
    else:
        print(describe_export(report))
    return 0
