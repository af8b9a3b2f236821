import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from loop_helpers import STARTED

from control_node.config import ConfigError
from training.config import make_config
from training.metrics import read_csv
from training.rundir import resume_config
from training.trainer import Trainer, train

EVAL_KEYS = {
    "env",
    "preset",
    "steps",
    "eval_return_mean",
    "eval_return_std",
    "episodes",
    "wall_s",
    "steps_per_s",
}


# A tiny Pendulum run on the command line: past learning_starts in a second or two.
TINY_CLI = [
    "--env",
    "Pendulum-v1",
    "--learning-starts",
    "100",
    "--log-every",
    "100",
    "--batch-size",
    "16",
    "--actor-hidden",
    "16,16",
    "--critic-hidden",
    "16,16",
    "--eval-every",
    "0",
    "--no-progress",
]


def _ckpt(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("preset", ["paper", "td3"])
def test_smoke_run_updates_and_writes_run_dir(preset: str, tiny_overrides: dict[str, Any]) -> None:
    cfg = make_config(preset, **{**tiny_overrides, "export": True})
    summary = train(cfg, progress=False)
    run = Path(tiny_overrides["out"])
    expected_updates = cfg.steps - cfg.learning_starts + 1
    assert summary["updates"] == expected_updates > 0
    assert _ckpt(run)["agent"]["updates"] == expected_updates
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved) >= EVAL_KEYS and saved["steps"] == 600 and saved["episodes"] == 2
    assert isinstance(saved["eval_return_mean"], float)
    assert saved["model"] == str(run / "actor.onnx")
    for name in (
        "config.yaml",
        "train.csv",
        "eval.csv",
        "episodes.csv",
        "learning_curve.png",
        "actor.onnx",
    ):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    train_rows = read_csv(run / "train.csv")
    assert [r["step"] for r in train_rows] == [100, 200, 300, 400, 500, 600]
    assert train_rows[-1]["updates"] == expected_updates
    assert [r["step"] for r in read_csv(run / "eval.csv")] == [300, 600]  # no duplicate final row
    episodes = read_csv(run / "episodes.csv")
    assert [r["length"] for r in episodes] == [200, 200, 200]  # Pendulum truncates at 200


def test_same_seed_gives_identical_runs(tmp_path: Path, tiny_overrides: dict[str, Any]) -> None:
    results = []
    for name in ("a", "b"):
        cfg = make_config("td3", **{**tiny_overrides, "out": str(tmp_path / name)})
        summary = train(cfg, progress=False)
        results.append(
            (summary, _ckpt(tmp_path / name)["agent"], read_csv(tmp_path / name / "train.csv"))
        )
    (sa, agent_a, rows_a), (sb, agent_b, rows_b) = results
    assert sa["eval_returns"] == sb["eval_returns"]
    for net in ("actor", "critic", "actor_target", "critic_target"):
        for k in agent_a[net]:
            assert torch.equal(agent_a[net][k], agent_b[net][k]), (net, k)
    assert [str(r["critic_loss"]) for r in rows_a] == [str(r["critic_loss"]) for r in rows_b]
    other = make_config("td3", **{**tiny_overrides, "out": str(tmp_path / "c"), "seed": 1})
    assert train(other, progress=False)["eval_returns"] != sa["eval_returns"]


def test_resume_continues_from_checkpoint(tiny_overrides: dict[str, Any]) -> None:
    run = Path(tiny_overrides["out"])
    cfg = make_config("paper", **{**tiny_overrides, "steps": 400, "save_replay": True})
    train(cfg, progress=False)
    first = _ckpt(run)
    assert first["step"] == 400 and (run / "replay.pt").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, progress=False)
    trainer = Trainer(resume_config(run, steps=700), resume=True, progress=False)
    assert trainer.step == 400 and len(trainer.replay) == 400
    assert trainer.agent.updates == first["agent"]["updates"]
    assert trainer.noise.state_dict() == first["noise"]
    for k, v in first["agent"]["actor"].items():
        assert torch.equal(trainer.agent.actor.state_dict()[k], v)
    summary = trainer.run()
    trainer.close()
    assert summary["steps"] == 700
    assert summary["updates"] == first["agent"]["updates"] + 300
    assert [r["step"] for r in read_csv(run / "train.csv")][-3:] == [500, 600, 700]
    assert "steps: 700" in (run / "config.yaml").read_text()


def test_a_run_stops_at_the_first_evaluation_that_reaches_stop_at_return(
    tiny_overrides: dict[str, Any],
) -> None:
    run = Path(tiny_overrides["out"])
    # tiny_overrides evaluates every 300 of 600 steps; Pendulum's returns are all above -1e9
    cfg = make_config("td3", **{**tiny_overrides, "stop_at_return": -1e9})
    summary = train(cfg, progress=False)
    assert summary["stopped_at_return"] and summary["steps"] == 300, summary
    assert summary["updates"] == 300 - 200 + 1  # past learning_starts (200), then it stopped
    assert [r["step"] for r in read_csv(run / "eval.csv")] == [300]  # that one, not another
    assert json.loads((run / "eval.json").read_text())["steps"] == _ckpt(run)["step"] == 300
    assert resume_config(run).stop_at_return == -1e9  # saved, and read back as a number
    # from below: a threshold no evaluation reaches trains every step
    unreached = {**tiny_overrides, "stop_at_return": 1e9, "out": str(run.parent / "all")}
    summary = train(make_config("td3", **unreached), progress=False)
    assert not summary["stopped_at_return"] and summary["steps"] == 600, summary


def test_stop_at_return_without_evaluations_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"stop_at_return = -200.0 needs periodic evaluations"):
        make_config("td3", env="Pendulum-v1", stop_at_return=-200, eval_every=0)


def _ddpg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_node", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "NoSuchEnv-v0"], "unknown environment 'NoSuchEnv-v0'"),
        (["--env", "CartPole-v1"], "Discrete action space"),
        (["--steps", "-10"], "steps = -10 must be positive"),
        (["--preset", "fast"], "invalid choice: 'fast'"),
        (["--tau", "abc"], "tau = 'abc' is not a valid float"),
    ],
)
def test_bad_input_stops_with_one_line_before_any_work(
    args: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _ddpg("train", "--env", "Pendulum-v1", *args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_cli_train_json_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _ddpg(
        "train",
        *TINY_CLI,
        "--eval-episodes",
        "1",
        "--no-export",
        "--steps",
        "300",
        "--out",
        str(out),
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 300
    proc = _ddpg(
        "train", "--resume", str(out), "--steps", "400", "--json", "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 400
    proc = _ddpg("train", "--resume", str(out), "--tau", "0.1", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot change --tau" in proc.stderr


def test_help_documents_every_flag_with_default() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "control_node", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    from dataclasses import fields

    from training.config import TrainConfig

    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert text.count("(default:") >= len(fields(TrainConfig))
    assert "td3: 100, paper: 64, crossq: 256, td3 --pixels: 256" in text  # per preset


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY_CLI, "--steps", "1000000", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "control_node", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(proc)  # a 1M-step run: killed after the test if an assertion stops it
    deadline = time.monotonic() + 120
    while not (out / "train.csv").exists() or len(read_csv(out / "train.csv")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"ddpg train --resume {out}" in stderr
    step = _ckpt(out)["step"]
    assert step >= 300 and _ckpt(out)["agent"]["updates"] == step - 100 + 1
    trainer = Trainer(
        resume_config(out, steps=step + 50, eval_episodes=0, export=False),
        resume=True,
        progress=False,
    )
    assert trainer.run()["steps"] == step + 50
    trainer.close()
