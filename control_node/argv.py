"""A config dataclass as the command line of the process that takes it.

The launcher (and the benchmarks) start ``ddpg serve`` and ``ddpg bridge`` with their
``NodeConfig`` and ``BridgeConfig`` as flags, and ``ddpg bridge`` builds its parser from the same
table, so the flags one writes are the flags the other reads.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from control_node.config import BridgeConfig, NodeConfig, RealtimeConfig, field_docs
from models.spec import PixelSpec

LAUNCH_ONLY = ("restart", "max_restarts")
"""BridgeConfig fields that only the launcher reads (its restart policy): not bridge flags."""
REALTIME = "realtime"  # a section whose keys are flags of their own: --sched-policy, --cpus ...
NOT_FLAGS = (*LAUNCH_ONLY, "pixels", REALTIME)  # pixels: one flag per PixelSpec field
PIXELS_FLAG = "--pixels"
PIXEL_FLAGS = {
    "size": "--pixel-size",
    "stack": "--frame-stack",
    "repeat": "--action-repeat",
    "camera": "--camera",
    "view": "--view",
}


def flag(name: str) -> str:
    """A config field's flag: ``rate_hz`` -> ``--rate-hz``."""
    return "--" + name.replace("_", "-")


def config_flags(cfg: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """A config dataclass as command-line flags for the process that takes it."""
    out: list[str] = []
    for f in fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            if f.name == "log_dir":
                out += [flag(f.name), "none"]
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out += [flag(f.name), str(value)]
    return out


def pixel_flags(pixels: PixelSpec | None) -> list[str]:
    """A bridge's pixel spec as ``ddpg bridge`` flags (the launcher starts bridges with them)."""
    if pixels is None:
        return []
    out = [PIXELS_FLAG]
    for name, pixel_flag in PIXEL_FLAGS.items():
        value = getattr(pixels, name)
        if value is not None:
            out += [pixel_flag, str(value)]
    return out


def realtime_flags(cfg: RealtimeConfig) -> list[str]:
    """A realtime section as flags: its keys' names (``--sched-policy fifo --cpus 1``)."""
    out: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out += [flag(f.name), str(value)]
    return out


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def _cpus(text: str) -> str | list[int]:
    if text in ("auto", "all"):
        return text
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, all or CPUs 0,1,..") from None


def add_realtime_arguments(
    parser: argparse.ArgumentParser, defaults: RealtimeConfig, section: str
) -> None:
    """One flag per RealtimeConfig key, documented from its docstring, in their own group."""
    group = parser.add_argument_group(f"real-time settings (launch.yaml: {section})")
    docs = field_docs(RealtimeConfig)
    kinds = {"sched_priority": int, "lock_memory": _bool, "cpu_idle_poll": _bool, "cpus": _cpus}
    metavars = {"sched_policy": "{fifo,rr,other}", "lock_memory": "{true,false}",
                "cpu_idle_poll": "{true,false}", "cpus": "auto|all|0,1,..",
                "gc": "{freeze,default}"}  # fmt: skip
    for f in fields(RealtimeConfig):
        default = getattr(defaults, f.name)
        group.add_argument(
            flag(f.name),
            dest=f"rt_{f.name}",
            type=kinds.get(f.name, str),
            metavar=metavars.get(f.name, f.name.upper()),
            help=f"{docs[f.name]} (default: {str(default).lower()})",
        )


def realtime_values(args: argparse.Namespace) -> dict[str, Any]:
    """The realtime keys given on the command line (to lay over a file's or the defaults)."""
    values = {f.name: getattr(args, f"rt_{f.name}") for f in fields(RealtimeConfig)}
    return {k: v for k, v in values.items() if v is not None}


def bridge_flags(cfg: BridgeConfig) -> list[str]:
    """Every ``ddpg bridge`` flag of one bridge: its fields, its pixel spec, its realtime."""
    return [
        *config_flags(cfg, skip=NOT_FLAGS),
        *pixel_flags(cfg.pixels),
        *realtime_flags(cfg.realtime),
    ]


def ddpg(*args: str) -> list[str]:
    """``ddpg ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "control_node", *args]


def serve_argv(cfg: NodeConfig, *extra: str) -> list[str]:
    """``ddpg serve`` with every field of ``cfg`` as a flag, then ``extra``."""
    return ddpg(
        "serve", *config_flags(cfg, skip=(REALTIME,)), *realtime_flags(cfg.realtime), *extra
    )


def bridge_argv(cfg: BridgeConfig, *extra: str) -> list[str]:
    """``ddpg bridge`` with every bridge flag of ``cfg``, then ``extra``."""
    return ddpg("bridge", *bridge_flags(cfg), *extra)
