"""``ddpg export`` on a real (tiny) run and ``ddpg eval`` on its actor.onnx: the ONNX policy
reproduces the trainer's deterministic evaluation, without torch, and can record a video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from control_node.cli import main
from models.export import export_actor
from models.networks import Actor
from training.config import make_config
from training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper-preset run (batch-norm input, Pendulum's ±2 action bounds), trained briefly."""
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = make_config(
        "paper",
        env="Pendulum-v1",
        steps=300,
        learning_starts=100,
        eval_every=0,
        eval_episodes=2,
        log_every=100,
        batch_size=32,
        actor_hidden=(32, 32),
        critic_hidden=(32, 32),
        out=str(out),
        threads=1,  # tiny networks: a second intra-op thread only adds contention
    )
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)  # the trainer sets it process-wide
    return out


def test_export_command_writes_checked_actor(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(run_dir / "actor.onnx") and (run_dir / "actor.onnx").exists()
    assert summary["parity_probes"] >= 1000 and summary["parity_max_abs_diff"] <= 1e-5
    meta = summary["metadata"]
    assert meta["env_id"] == "Pendulum-v1" and meta["preset"] == "paper"
    assert meta["train_steps"] == 300 and meta["run_name"] == "run"
    assert meta["eval_seed"] == json.loads((run_dir / "eval.json").read_text())["eval_seed"]
    assert meta["obs_norm"] == "batch_norm" and meta["act_high"] == [2.0]
    assert meta["obs_high"] == [1.0, 1.0, 8.0]


def test_export_command_refuses_a_non_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpg export: error:") and "config.yaml is missing" in err


def test_eval_reproduces_trainer_evaluation_without_torch(run_dir: Path) -> None:
    model = run_dir / "actor.onnx"
    if not model.exists():
        main(["export", str(run_dir)])
    code = (
        "import sys\n"
        "from control_node.cli import main\n"
        f"rc = main(['eval', {str(model)!r}, '--env', 'Pendulum-v1', '--episodes', '2', '--json'])\n"
        "assert 'torch' not in sys.modules, 'ddpg eval imported torch'\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    trainer = json.loads((run_dir / "eval.json").read_text())
    assert result["seed"] == trainer["eval_seed"]  # the model's eval_seed is the default
    np.testing.assert_allclose(result["returns"], trainer["eval_returns"], rtol=1e-5, atol=1e-3)
    assert result["return_mean"] == pytest.approx(trainer["eval_return_mean"], rel=1e-5)


def test_eval_refuses_model_for_another_env(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = run_dir / "actor.onnx"
    if not model.exists():
        main(["export", str(run_dir)])
    capsys.readouterr()
    assert main(["eval", str(model), "--env", "InvertedPendulum-v5", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "exported for env 'Pendulum-v1', not 'InvertedPendulum-v5'" in err


def test_eval_video_records_first_episode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = tmp_path / "ip.onnx"
    export_actor(
        Actor(4, [-3.0], [3.0], (16, 16)),
        model,
        env_id="InvertedPendulum-v5",
        preset="td3",
        run_name="video",
        train_steps=0,
        seed=0,
        eval_seed=0,
    )
    video = tmp_path / "v" / "ep0.mp4"
    args = ["eval", str(model), "--episodes", "2", "--seed", "5", "--json"]
    assert main([*args, "--video", str(video), "--video-size", "160x128"]) == 0
    with_video = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    without = json.loads(capsys.readouterr().out)
    assert with_video["returns"] == without["returns"]  # rendering does not change the episode
    with imageio.get_reader(str(video)) as reader:  # len() is inf for ffmpeg: no list(reader)
        frames = [frame for frame in reader.iter_data()]
    assert len(frames) == with_video["lengths"][0] + 1  # the reset frame plus one per step
    assert frames[0].shape == (128, 160, 3) and frames[0].max() > 0
