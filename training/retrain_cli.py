"""``ddpg retrain``: continue DDPG from logged transitions and export the new actor.

Torch is imported only when the command runs (``ddpg --help`` stays fast); the work is
:func:`training.retrain.retrain`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.logged_data import LoggedTransitions, PixelLog

EXAMPLES = """\
examples:
  ddpg retrain --logs logs --init models/zoo/inverted_pendulum --updates 5000 --out runs/ip-rt1
  ddpg retrain --logs logs/a logs/b --preset td3 --updates 20000 --out runs/from-logs --json
  ddpg train --resume runs/ip-rt1 --steps 60000   # a retrain run resumes like any other
  MINARI_DATASETS_PATH=datasets ddpg retrain --minari robot/pendulum-v0 --out runs/from-minari
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--logs",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="transition log directories (ddpg serve --log-dir); all of one robot",
    )
    source.add_argument(
        "--minari",
        metavar="DATASET_ID",
        help="a local Minari dataset instead (found by MINARI_DATASETS_PATH, else "
        "~/.minari/datasets; never downloaded): one ddpg logs --to-minari wrote, or any of a "
        "state robot with a bounded Box action space (needs the minari extra)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        metavar="RUN_DIR",
        help="continue from this run's checkpoint and config, with its replay.pt first in the "
        "buffer when it has one (default: fresh networks)",
    )
    parser.add_argument(
        "--updates", type=int, default=5000, metavar="N", help="gradient updates (default: 5000)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="RUN_DIR2", help="new run directory to write"
    )
    parser.add_argument(
        "--preset",
        choices=("paper", "td3"),
        default=None,
        help="networks and update knobs for a fresh start (default: td3; with --init, the run's)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="minibatch size per update"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for sampling and evaluation (default: the config's; 0 when fresh)",
    )
    parser.add_argument(
        "--device", default=None, metavar="S", help="'auto', 'cpu', 'cuda' or 'cuda:N'"
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch intra-op threads"
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=10,
        metavar="N",
        help="deterministic evaluation episodes at the end, seeds SEED+10000+i; 0 skips "
        "(default: 10)",
    )
    parser.add_argument(
        "--log-every", type=int, default=None, metavar="N", help="train.csv row every N updates"
    )
    parser.add_argument(
        "--save-replay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write replay.pt (init replay + logs), for a later --init or --resume",
    )
    parser.add_argument("--json", action="store_true", help="print eval.json to stdout at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")


def run(args: argparse.Namespace) -> int:
    from control_node.config import ConfigError
    from models.export import ExportError
    from models.policy import PolicyError
    from sim_bridge.envs import EnvError
    from training.retrain import retrain

    def log(line: str) -> None:
        if not args.no_progress or line.startswith("warning:"):
            print(line, file=sys.stderr)

    logs, load = args.logs, None
    if args.minari is not None:
        from control_node.minari_export import minari_default_root
        from training.minari_data import load_minari

        root = os.environ.get("MINARI_DATASETS_PATH") or minari_default_root()
        logs = [Path(root) / args.minari]

        def load(warn: Callable[[str], None]) -> LoggedTransitions | PixelLog:
            return load_minari(args.minari, warn)

    overrides = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
        "log_every": args.log_every,
        "save_replay": args.save_replay,
    }
    try:
        summary = retrain(
            logs,
            args.out,
            init=args.init,
            updates=args.updates,
            eval_episodes=args.eval_episodes,
            seed=args.seed,
            progress=not args.no_progress,
            log=log,
            load=load,
            **overrides,
        )
    except (ConfigError, EnvError, ExportError, PolicyError) as e:
        print(f"ddpg retrain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nddpg retrain: interrupted; {args.out} is incomplete: remove it before retrying",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        mean = summary["eval_return_mean"]
        shown = "n/a" if mean is None else f"{mean:.1f} ± {summary['eval_return_std']:.1f}"
        print(
            f"{summary['env']} {summary['preset']}: {summary['updates']} updates on "
            f"{summary['transitions']} logged transitions; eval return {shown} over "
            f"{summary['episodes']} episodes; run in {summary['run_dir']}"
        )
    if summary.get("export_error"):
        print(f"ddpg retrain: error: export failed: {summary['export_error']}", file=sys.stderr)
        return 1
    return 0
