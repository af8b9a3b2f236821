"""A config dataclass as the command line of the process that takes it.

The launcher (and the benchmarks) start ``ddpg serve`` and ``ddpg bridge`` with their
``NodeConfig`` and ``BridgeConfig`` as flags, and ``ddpg bridge`` builds its parser from the same
table, so the flags one writes are the flags the other reads.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any

from control_node.config import BridgeConfig, NodeConfig
from models.spec import PixelSpec

LAUNCH_ONLY = ("restart", "max_restarts")
"""BridgeConfig fields that only the launcher reads (its restart policy): not bridge flags."""
NOT_FLAGS = (*LAUNCH_ONLY, "pixels")  # pixels has flags of its own, one per PixelSpec field
PIXELS_FLAG = "--pixels"
PIXEL_FLAGS = {
    "size": "--pixel-size",
    "stack": "--frame-stack",
    "repeat": "--action-repeat",
    "camera": "--camera",
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


def bridge_flags(cfg: BridgeConfig) -> list[str]:
    """Every ``ddpg bridge`` flag of one bridge: its fields, then its pixel spec."""
    return [*config_flags(cfg, skip=NOT_FLAGS), *pixel_flags(cfg.pixels)]


def ddpg(*args: str) -> list[str]:
    """``ddpg ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "control_node", *args]


def serve_argv(cfg: NodeConfig, *extra: str) -> list[str]:
    """``ddpg serve`` with every field of ``cfg`` as a flag, then ``extra``."""
    return ddpg("serve", *config_flags(cfg), *extra)


def bridge_argv(cfg: BridgeConfig, *extra: str) -> list[str]:
    """``ddpg bridge`` with every bridge flag of ``cfg``, then ``extra``."""
    return ddpg("bridge", *bridge_flags(cfg), *extra)
