"""``ddpg bridge``: run a Gymnasium MuJoCo environment as a robot served by a control node.

Runs until Ctrl-C, SIGTERM, ``--episodes`` or ``--duration``, then says goodbye to the node and
prints a summary (returns, steps, action delivery latency; ``--json`` for all of it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict, fields
from typing import Any

from control_node.argv import (
    NOT_FLAGS,
    PIXEL_FLAGS,
    PIXELS_FLAG,
    REALTIME,
    add_realtime_arguments,
    flag,
    realtime_values,
)
from control_node.config import BridgeConfig, ConfigError, field_docs, from_mapping
from models.spec import PixelSpec

EXAMPLES = """\
examples:
  ddpg bridge --env InvertedPendulum-v5 --mode realtime       # 25 Hz: its dt 40 ms, real time
  ddpg bridge --env InvertedPendulum-v5 --real-time-factor 2  # twice real time: 50 Hz
  ddpg bridge --env HalfCheetah-v5 --rate-hz 1000             # a fixed rate, whatever its dt
  ddpg bridge --env InvertedPendulum-v5 --mode lockstep --episodes 10 --seed 10000 --json
  ddpg bridge --env InvertedPendulum-v5 --pixels --pixel-size 64 --frame-stack 3 --action-repeat 3
"""


def _camera(text: str) -> str | int:
    """A camera id when the text is an integer (-1 is the free camera), else a camera name."""
    try:
        return int(text)
    except ValueError:
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    docs = field_docs(BridgeConfig)
    for f in fields(BridgeConfig):
        if f.name in NOT_FLAGS:
            continue
        kind = {float: float, int: int}.get(type(f.default), str)  # type: ignore[arg-type]
        if f.name == "rate_hz":  # null by default: the environment's own rate
            kind = float
        parser.add_argument(
            flag(f.name),
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"{docs[f.name]} (default: {'null' if f.default is None else f.default})",
        )
    parser.add_argument(
        PIXELS_FLAG,
        action="store_true",
        help="observe rendered frames instead of the state: uint8 (3 * stack, size, size), "
        "oldest frame first; the model must have been trained on the same spec",
    )
    pixel_docs = field_docs(PixelSpec)
    for f in fields(PixelSpec):
        parser.add_argument(
            PIXEL_FLAGS[f.name],
            dest=f"pixel_{f.name}",
            type={"camera": _camera, "view": str}.get(f.name, int),
            default=None,
            metavar=f.name.upper(),
            help=f"{pixel_docs[f.name]} Implies --pixels. (default: {f.default})",
        )
    add_realtime_arguments(parser, BridgeConfig().realtime, "bridges[].realtime")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def bridge_config(args: argparse.Namespace) -> BridgeConfig:
    """The bridge's config from its flags (the launcher writes them with ``control_node.argv``);
    ConfigError names a bad value."""
    values: dict[str, Any] = {
        f.name: getattr(args, f.name)
        for f in fields(BridgeConfig)
        if f.name not in NOT_FLAGS and getattr(args, f.name) is not None
    }
    pixels = {
        f.name: getattr(args, f"pixel_{f.name}")
        for f in fields(PixelSpec)
        if getattr(args, f"pixel_{f.name}") is not None
    }
    if args.pixels or pixels:
        values["pixels"] = pixels
    values[REALTIME] = {**asdict(BridgeConfig().realtime), **realtime_values(args)}
    return from_mapping(BridgeConfig, values, "bridge")


def run(args: argparse.Namespace) -> int:
    from sim_bridge.bridge import Bridge
    from sim_bridge.client import ClientError
    from sim_bridge.envs import EnvError

    try:
        bridge = Bridge(bridge_config(args))
    except (ConfigError, EnvError) as e:
        print(f"ddpg bridge: error: {e}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: bridge.request_stop())
    try:
        summary = bridge.run(args.duration)
    except (ClientError, EnvError) as e:  # EnvError: off-screen rendering failed at the reset
        print(f"ddpg bridge: error: {e}", file=sys.stderr)
        return 1
    finally:
        bridge.close()
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    else:
        mean = summary["mean_return"]
        print(
            f"ddpg bridge {summary['bridge']}: {summary['episodes']} episodes, mean return "
            f"{'-' if mean is None else f'{mean:.1f}'}, {summary['steps']} steps at "
            f"{summary['steps_per_s']} steps/s, action delivery p50 "
            f"{summary['action_delivery_us']['p50']} us",
            flush=True,
        )
    return 0
