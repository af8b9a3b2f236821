"""``ddpg serve``: run the control node until Ctrl-C, SIGTERM, an admin shutdown or --duration.

Flags override the ``node:`` section of ``--config launch.yaml`` (or the defaults without it).
At the end the node says goodbye to its bridges, commits the transition log and prints its
final status (``--json`` for the whole of it, or a one-line summary). It exits 1 when the log
failed to write or lost transitions, unless ``--tolerate-log-errors true``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from control_node.argv import REALTIME, _bool, add_realtime_arguments, realtime_values
from control_node.config import (
    ConfigError,
    NodeConfig,
    RealtimeConfig,
    field_docs,
    from_mapping,
    load_launch,
)

EXAMPLES = """\
examples:
  ddpg serve --model models/zoo/inverted_pendulum/actor.onnx --rate-hz 100
  ddpg serve --config launch.yaml                  # the node section of a launch file
  ddpg serve --model actor.onnx --rate-hz 1000 --log-dir logs/fast --duration 60 --json
  ddpg serve --model actor.onnx --rate-hz 1000 --cpus 1 --sched-priority 60   # real-time
"""


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field (``--rate-hz``), documented from the field's docstring."""
    docs = field_docs(NodeConfig)
    for f in fields(NodeConfig):
        if f.name == REALTIME:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.name != "model" else None
        help_text = f"{docs[f.name]} (default: {default})"
        if f.name == "safe_action":
            parser.add_argument(flag, metavar="A,B,..", help=help_text + "; comma-separated")
        elif f.name == "log_dir":
            parser.add_argument(flag, metavar="DIR", help=help_text + "; 'none' turns it off")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, type=_bool, metavar="{true,false}", help=help_text)
        else:
            kind = {float: float, int: int}.get(type(f.default), str)  # type: ignore[arg-type]
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), help=help_text)
    add_realtime_arguments(parser, RealtimeConfig(), "node.realtime")


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    base: dict[str, Any] = {}
    if args.config is not None:
        base = asdict(load_launch(args.config).node)
    base[REALTIME] = {**base.get(REALTIME, {}), **realtime_values(args)}
    for f in fields(NodeConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "safe_action":
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                raise ConfigError(f"--safe-action {value!r}: expected numbers A,B,...") from None
        if f.name == "log_dir" and value.lower() == "none":
            value = None
        base[f.name] = value
    if "model" not in base:
        raise ConfigError("--model is required (or --config with a node.model)")
    cfg = from_mapping(NodeConfig, base, "node")
    if not Path(cfg.model).is_file():
        raise ConfigError(f"--model {cfg.model}: no such file")
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument(
        "--config", type=Path, metavar="LAUNCH.yaml", help="take node settings from a launch file"
    )
    add_node_arguments(parser)
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--json", action="store_true", help="print the final status as JSON")


def run(args: argparse.Namespace) -> int:
    from control_node.node.loop import ControlNode, NodeError
    from control_node.node.status import log_trouble, summary_line

    try:
        cfg = node_config_from_args(args)
        node = ControlNode(cfg)
    except (ConfigError, NodeError) as e:
        print(f"ddpg serve: error: {e}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.request_stop())
    print(
        f"ddpg serve: serving {node.server.model_id} ({node.server.policy.metadata.env_id}) at "
        f"{cfg.rate_hz:g} Hz on {cfg.bind}, admin {cfg.admin}, log {cfg.log_dir}",
        file=sys.stderr,
        flush=True,
    )
    final = node.run(args.duration)
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        print(f"ddpg serve: {summary_line(final)}")
    trouble = log_trouble(final.get("log"))
    if trouble and not cfg.tolerate_log_errors:
        print(
            f"ddpg serve: error: the transition log failed ({trouble.split(': ', 1)[1]}; last: "
            f"{final['log']['last_error'][:300]}); exit 1 (--tolerate-log-errors true: exit 0)",
            file=sys.stderr,
        )
        return 1
    return 0
