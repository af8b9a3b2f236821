"""Shared test helpers: small, fast trainer configs on real Gymnasium environments."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import kill_started

os.environ.setdefault("MUJOCO_GL", "egl")
# One torch thread for every run the suite starts (threads auto takes OMP_NUM_THREADS): same-seed
# runs compare bit for bit, which needs the same thread count whatever else the machine runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> dict[str, Any]:
    """A run that goes past learning_starts and updates a few hundred times in seconds."""
    return {
        "env": "Pendulum-v1",
        "steps": 600,
        "learning_starts": 200,
        "eval_every": 300,
        "eval_episodes": 2,
        "log_every": 100,
        "batch_size": 32,
        "actor_hidden": (32, 32),
        "critic_hidden": (32, 32),
        "export": False,  # export is tested in test_export and the smoke run
        "out": str(tmp_path / "run"),
    }


@pytest.fixture(autouse=True)
def _kill_leftover_processes() -> Iterator[None]:
    """A failing test must not leave a node or bridge running (they hold ports and CPU)."""
    yield
    kill_started()
