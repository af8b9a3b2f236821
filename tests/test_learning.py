"""Learning tests: the recommended preset (td3, the default) reaches a return on real tasks.

Minutes each on 2 cores; part of the default run (the issue's bar), marked so they can be
skipped with ``-m 'not learning'`` while iterating.
"""

import json
from pathlib import Path

import pytest

from training.config import make_config
from training.metrics import read_csv
from training.trainer import train

pytestmark = pytest.mark.learning


def test_pendulum_reaches_minus_250_within_20k_steps(tmp_path: Path) -> None:
    # It stops at the first evaluation past the bar: seed 0 evaluated every 1,000 steps had
    # -639 at 5k, -154 at 6k and -110 at 10k, so this takes a third of the 20k steps' minutes.
    cfg = make_config(
        "td3",
        env="Pendulum-v1",
        steps=20_000,
        seed=0,
        eval_every=2_000,
        stop_at_return=-250,
        out=str(tmp_path / "run"),
    )
    summary = train(cfg, progress=False)
    assert summary["updates"] > 0 and summary["stopped_at_return"], summary
    assert summary["eval_return_mean"] >= -250, summary
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["eval_return_mean"] >= -250


def test_inverted_pendulum_reaches_950_within_30k_steps(tmp_path: Path) -> None:
    # Evaluating every 2,500 steps samples the curve finely; it does not change training.
    # 1,000 random steps before learning, as the TD3 paper uses for InvertedPendulum (10,000
    # only for HalfCheetah and Ant): with the default 5,000, seed 0 reached 1,000 between 25k and
    # 30k steps, and a change in float rounding alone (the hand-written update) moved it past
    # 30k. With 1,000, seeds 0-3 reached 1,000 at 25k, 30k, 22.5k and 17.5k steps. It stops at
    # the first evaluation past the bar.
    cfg = make_config(
        "td3",
        env="InvertedPendulum-v5",
        steps=30_000,
        seed=0,
        learning_starts=1_000,
        eval_every=2_500,
        stop_at_return=950,
        out=str(tmp_path / "run"),
    )
    summary = train(cfg, progress=False)
    assert summary["updates"] > 0
    evals = read_csv(tmp_path / "run" / "eval.csv")
    assert max(r["return_mean"] for r in evals) >= 950, evals
