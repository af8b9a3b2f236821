"""``ddpg retrain``: real transition logs from real InvertedPendulum-v5 rollouts of the shipped
actor, written with the control node's TransitionLog, then retrained fresh and from the shipped
run, with the run directory, offline metrics, determinism, resume and refusals checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from control_node.cli import main as ddpg_main
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog
from models.policy import OnnxPolicy
from sim_bridge.envs import env_spec, make_env
from training.agent import DDPGAgent
from training.config import load_config, make_config
from training.logged_data import LoggedTransitions, RetrainError
from training.metrics import read_csv
from training.offline_metrics import discounted_returns
from training.retrain import retrain
from training.rundir import resume_config
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models/zoo/inverted_pendulum"
ENV = "InvertedPendulum-v5"
SHIPPED_ID = "2ff52a327c6e434c"
EVAL_KEYS = {  # the trainer's eval.json keys (tests/test_trainer.py) and retrain's own
    "env",
    "preset",
    "seed",
    "steps",
    "updates",
    "episodes",
    "eval_seed",
    "eval_return_mean",
    "eval_return_std",
    "eval_returns",
    "wall_s",
    "steps_per_s",
    "device",
    "run_dir",
    "model",
    "source",
    "logs",
    "transitions",
    "init",
}
# Tiny networks for the fresh runs: a few hundred updates in about a second.
TINY = {
    "actor_hidden": (16, 16),
    "critic_hidden": (16, 16),
    "batch_size": 32,
    "log_every": 50,
    "device": "cpu",
}


def _ip_spec() -> LogSpec:
    env = make_env(ENV)
    spec = env_spec(ENV, env)
    env.close()
    return LogSpec(ENV, spec.obs_shape, "float32", spec.act_low, spec.act_high)


def _row(
    session: str,
    episode: int,
    step: int,
    obs: np.ndarray,
    action: np.ndarray,
    reward: float,
    next_obs: np.ndarray,
    terminated: bool,
    truncated: bool,
    model: str,
    i: int,
) -> Transition:
    return Transition(
        "bridge0",
        session,
        episode,
        step,
        obs.astype(np.float32),
        action,
        reward,
        next_obs.astype(np.float32),
        terminated,
        truncated,
        model,
        False,
        i,
        i,
        i + 1,
        i + 2,
    )


@pytest.fixture(scope="module")
def ip_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A log of the shipped actor on InvertedPendulum-v5: two episodes with the trainer's
    exploration noise (sigma 0.3 = 10 % of the half-range) truncated at 150 steps, one with
    sigma 3 that falls (terminated), one still running (no terminal row), one short episode of
    another session with a NaN observation, and a crashed writer's temp file."""
    d = tmp_path_factory.mktemp("logs") / "ip"
    policy = OnnxPolicy(ZOO / "actor.onnx")
    env = gym.make(ENV, max_episode_steps=150)
    rng = np.random.default_rng(0)
    i = 0
    lengths: list[int] = []
    with TransitionLog(d, _ip_spec(), chunk_rows=100, fsync=False) as log:
        for episode, (sigma, limit) in enumerate([(0.3, 999), (0.3, 999), (3.0, 999), (0.3, 30)]):
            obs, _ = env.reset(seed=episode)
            for step in range(limit):
                noise = sigma * rng.standard_normal(1)
                action = np.clip(policy(obs) + noise, -3.0, 3.0).astype(np.float32)
                next_obs, reward, terminated, truncated, _ = env.step(action)
                log.append(
                    _row(
                        "s0",
                        episode,
                        step,
                        obs,
                        action,
                        float(reward),
                        next_obs,
                        terminated,
                        truncated,
                        policy.model_id,
                        i,
                    )
                )
                i += 1
                obs = next_obs
                if terminated or truncated:
                    break
            lengths.append(step + 1)
        obs = np.zeros(4, np.float32)
        bad = np.array([np.nan, 0, 0, 0], np.float32)
        zero = np.zeros(1, np.float32)
        log.append(_row("s1", 0, 0, obs, zero, 1.0, obs, False, False, "", i))
        log.append(_row("s1", 0, 1, obs, zero, 1.0, bad, True, False, "", i + 1))
        assert log.flush()
    env.close()
    (d / ".tmp-crashed-1.parquet").write_bytes(b"PAR1 half a chunk")
    assert lengths[:2] == [150, 150] and lengths[2] < 150 and lengths[3] == 30, lengths
    return {"dir": d, "rows": sum(lengths) + 2, "lengths": lengths}


@pytest.fixture(scope="module")
def fresh_run(ip_log: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fresh") / "run"
    lines: list[str] = []
    summary = retrain(
        [ip_log["dir"]],
        out,
        updates=200,
        eval_episodes=1,
        seed=3,
        log=lines.append,
        learning_starts=0,
        save_replay=True,
        **TINY,
    )
    return {"out": out, "summary": summary, "lines": lines}


def _model_id(path: Path) -> str:
    return OnnxPolicy(path).model_id


def test_fresh_retrain_writes_a_checked_run(
    ip_log: dict[str, Any], fresh_run: dict[str, Any]
) -> None:
    out, summary = fresh_run["out"], fresh_run["summary"]
    assert any("warning:" in ln and ".tmp-crashed-1.parquet" in ln for ln in fresh_run["lines"])
    for name in (
        "config.yaml",
        "checkpoint.pt",
        "replay.pt",
        "train.csv",
        "eval.csv",
        "retrain.json",
        "eval.json",
        "actor.onnx",
    ):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((out / "eval.json").read_text())
    assert saved == summary and set(saved) >= EVAL_KEYS
    n_log = ip_log["rows"] - 1  # the NaN row is dropped
    assert saved["source"] == "retrain" and saved["init"] is None
    assert saved["transitions"] == n_log and saved["updates"] == saved["updates_total"] == 200
    assert saved["steps"] == n_log and saved["eval_seed"] == 3 + 10_000
    assert saved["logs"] == [str(ip_log["dir"])] and len(saved["eval_returns"]) == 1
    policy = OnnxPolicy(saved["model"], expect=env_spec(ENV, gym.make(ENV)))
    assert policy(np.zeros(4, np.float32)).shape == (1,)

    report = json.loads((out / "retrain.json").read_text())
    t = report["transitions"]
    assert t["log_rows"] == ip_log["rows"] and t["dropped_non_finite"] == 1
    assert t["from_logs"] == t["replay"] == n_log and t["from_init_replay"] == 0
    assert [Path(p).name for p in t["leftovers_skipped"]] == [".tmp-crashed-1.parquet"]
    qr = report["q_vs_logged_returns"]
    # Whole: the two truncated and the terminated episode; not the running one nor the NaN one.
    assert (qr["episodes"], qr["episodes_terminated"], qr["episodes_skipped"]) == (3, 1, 2)
    assert qr["all"]["rows"] == sum(ip_log["lengths"][:3])
    assert qr["terminated"]["rows"] == ip_log["lengths"][2]
    for group in (qr["all"], qr["terminated"]):
        assert np.isfinite(group["g_mean"]) and group["g_mean"] > 0
        for when in ("before", "after"):
            assert all(np.isfinite(v) for v in group[when].values()), group
    loss = report["critic_loss"]
    assert np.isfinite(loss["start"]) and np.isfinite(loss["end"]) and loss["end"] < loss["start"]

    # Updates happened: the weights moved away from the seed's initial networks.
    cfg = load_config(out / "config.yaml")
    assert cfg.seed == 3 and cfg.actor_hidden == (16, 16) and cfg.buffer_size >= n_log
    torch.manual_seed(cfg.seed)
    spec = _ip_spec()
    initial = DDPGAgent(
        cfg, 4, np.array(spec.act_low), np.array(spec.act_high), torch.device("cpu")
    )
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["agent"]["updates"] == 200 and state["step"] == n_log
    for k, v in initial.actor.state_dict().items():
        if k.endswith("weight"):
            assert not torch.equal(state["agent"]["actor"][k], v), k
    rows = read_csv(out / "train.csv")
    assert [r["updates"] for r in rows] == [50, 100, 150, 200]
    assert all(np.isfinite(r["critic_loss"]) and np.isfinite(r["q"]) for r in rows)


def test_same_inputs_and_seed_give_the_same_actor(
    ip_log: dict[str, Any], fresh_run: dict[str, Any], tmp_path: Path
) -> None:
    args = {
        "updates": 200,
        "eval_episodes": 1,
        "log": lambda _: None,
        "learning_starts": 0,
        "save_replay": True,
        **TINY,
    }
    again = retrain([ip_log["dir"]], tmp_path / "again", seed=3, **args)
    first = fresh_run["summary"]
    assert _model_id(Path(again["model"])) == _model_id(Path(first["model"]))
    assert again["eval_returns"] == first["eval_returns"]
    keys = ("step", "critic_loss", "actor_loss", "q")  # all but the timing
    rows = [read_csv(run / "train.csv") for run in (tmp_path / "again", fresh_run["out"])]
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    other = retrain([ip_log["dir"]], tmp_path / "other", seed=4, **{**args, "eval_episodes": 0})
    assert _model_id(Path(other["model"])) != _model_id(Path(first["model"]))


def test_a_retrain_run_resumes_and_chains(
    ip_log: dict[str, Any], fresh_run: dict[str, Any], tmp_path: Path
) -> None:
    # `ddpg train --resume` continues it: same networks, counters and replay.
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(fresh_run["out"]), str(run)], check=True)
    n_log = ip_log["rows"] - 1
    cfg = resume_config(run, steps=n_log + 20, eval_every=0, eval_episodes=0, export=False)
    trainer = Trainer(cfg, resume=True, progress=False)
    try:
        assert trainer.step == n_log and len(trainer.replay) == n_log
        assert trainer.agent.updates == 200
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == n_log + 20 and summary["updates"] == 220

    # Another retrain --init it: the saved replay comes first, then the log again.
    lines: list[str] = []
    chained = retrain(
        [ip_log["dir"]],
        tmp_path / "chained",
        init=fresh_run["out"],
        updates=10,
        eval_episodes=0,
        log=lines.append,
        actor_lr=1e-4,  # an update knob may change; the optimiser then runs with it
    )
    report = json.loads((tmp_path / "chained/retrain.json").read_text())
    assert report["transitions"]["from_init_replay"] == n_log
    assert report["transitions"]["replay"] == 2 * n_log
    assert chained["updates_total"] == 210 and chained["steps"] == 2 * n_log
    cfg = load_config(tmp_path / "chained/config.yaml")
    assert cfg.actor_hidden == (16, 16) and cfg.actor_lr == 1e-4
    state = torch.load(tmp_path / "chained/checkpoint.pt", weights_only=True)
    assert state["agent"]["actor_opt"]["param_groups"][0]["lr"] == 1e-4
    with pytest.raises(RetrainError, match="cannot change critic_hidden"):
        retrain([ip_log["dir"]], tmp_path / "x", init=fresh_run["out"], critic_hidden=(8, 8))


def test_init_from_the_shipped_run_starts_from_its_weights(
    ip_log: dict[str, Any], tmp_path: Path
) -> None:
    summary = retrain(
        [ip_log["dir"]],
        tmp_path / "same",
        init=ZOO,
        updates=0,
        eval_episodes=0,
        log=lambda _: None,
    )
    assert _model_id(Path(summary["model"])) == SHIPPED_ID  # the shipped actor, bit for bit
    assert summary["updates_total"] == 25_001 and summary["steps"] == 30_000 + ip_log["rows"] - 1
    report = json.loads((tmp_path / "same/retrain.json").read_text())
    assert report["critic_loss"]["start"] == report["critic_loss"]["end"]  # no update ran
    assert report["transitions"]["from_init_replay"] == 30_000  # the run's replay came along


def test_init_retrain_keeps_the_return_high(ip_log: dict[str, Any], tmp_path: Path) -> None:
    lines: list[str] = []
    summary = retrain(
        [ip_log["dir"]],
        tmp_path / "ip",
        init=ZOO,
        updates=200,
        eval_episodes=2,
        log=lines.append,
        device="cpu",
    )
    assert summary["updates_total"] == 25_201 and summary["init"] == str(ZOO)
    assert min(summary["eval_returns"]) > 500, summary["eval_returns"]
    assert _model_id(Path(summary["model"])) != SHIPPED_ID
    assert any(line.startswith("Q vs logged returns") for line in lines), lines
    assert any(line.startswith("critic loss") for line in lines), lines


def test_discounted_returns_match_a_plain_loop() -> None:
    # Rows out of order, two whole episodes (one terminated, one truncated), one with a gap.
    eps = np.array([1, 0, 0, 1, 0, 2, 2, 1])
    steps = np.array([1, 2, 0, 0, 1, 0, 2, 2])
    term = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    trunc = np.array([0, 0, 0, 0, 0, 0, 1, 1], bool)
    reward = np.arange(8, dtype=np.float64) + 1
    n = len(eps)
    data = LoggedTransitions(
        spec=_ip_spec(),
        obs=np.zeros((n, 4), np.float32),
        action=np.zeros((n, 1), np.float32),
        reward=reward,
        next_obs=np.zeros((n, 4), np.float32),
        terminated=term,
        truncated=trunc,
        episode=eps,
        step=steps,
        valid=np.ones(n, bool),
    )
    got = discounted_returns(data, 0.9)
    expected: dict[int, float] = {}
    for ep in (0, 1):
        rows = sorted(np.flatnonzero(eps == ep), key=lambda r: steps[r])
        g = 0.0
        for r in reversed(rows):
            g = reward[r] + 0.9 * g
            expected[int(r)] = g
    assert sorted(got.rows.tolist()) == sorted(expected)
    for r, g in zip(got.rows, got.returns, strict=True):
        assert g == pytest.approx(expected[int(r)], rel=1e-12)
    assert (got.episodes, got.episodes_terminated, got.episodes_skipped) == (2, 1, 1)
    assert got.terminated.tolist() == [eps[r] == 0 for r in got.rows]


def test_logs_of_two_robots_are_refused(ip_log: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "pend"
    _pendulum_log(other)
    with pytest.raises(RetrainError, match="different robots"):
        retrain([ip_log["dir"], other], tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_cli_json(
    ip_log: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = ddpg_main(
        [
            "retrain",
            "--logs",
            str(ip_log["dir"]),
            "--out",
            str(out),
            "--updates",
            "20",
            "--batch-size",
            "16",
            "--eval-episodes",
            "0",
            "--json",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["updates"] == 20 and summary["preset"] == "td3" and summary["model"]
    assert "warning:" in captured.err  # the crashed writer's temp file, even with --no-progress


def _pendulum_log(d: Path) -> None:
    spec = LogSpec("Pendulum-v1", (3,), "float32", (-2.0,), (2.0,))
    with TransitionLog(d, spec, fsync=False) as log:
        for i in range(5):
            obs = np.full(3, i, np.float32)
            log.append(
                _row("s", 0, i, obs, np.zeros(1, np.float32), -1.0, obs, False, i == 4, "m", i)
            )


def _ddpg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_node", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no committed transitions in"),
        ("other_env", "the logs do not match the init run's env"),
        ("out_exists", "already holds a run (checkpoint.pt)"),
    ],
)
def test_cli_refuses_with_one_line(
    case: str, message: str, ip_log: dict[str, Any], tmp_path: Path
) -> None:
    logs, out = ip_log["dir"], tmp_path / "out"
    if case == "empty":
        logs = tmp_path / "empty"
        logs.mkdir()
    elif case == "other_env":
        logs = tmp_path / "pend"
        _pendulum_log(logs)
    else:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"a run")
    proc = _ddpg(
        "retrain",
        "--logs",
        str(logs),
        "--init",
        str(ZOO),
        "--out",
        str(out),
        "--updates",
        "10",
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("ddpg retrain: error: "), proc.stderr
    assert message in lines[0], lines[0]
    if case == "out_exists":
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
    else:
        assert not out.exists()
    if case == "other_env":
        assert "'Pendulum-v1' != 'InvertedPendulum-v5'" in lines[0]


def test_obs_norm_statistics_carry_on_from_init_and_stay_fixed(
    ip_log: dict[str, Any], fresh_run: dict[str, Any], tmp_path: Path
) -> None:
    """A retrain --init of an --obs-norm run keeps its statistics bit for bit (through every
    round of continual mode too), and its exported actor holds them; a fresh --obs-norm retrain
    fits them once to the logged observations; an init run's setting cannot be changed."""
    from training.trainer import train

    init = tmp_path / "init"
    train(
        make_config(
            "td3", env=ENV, steps=300, learning_starts=100, eval_every=0, eval_episodes=0,
            obs_norm=True, out=str(init), **TINY,
        ),
        progress=False,
    )  # fmt: skip
    saved = torch.load(init / "checkpoint.pt", weights_only=True)["agent"]["obs_norm"]
    log = lambda _: None  # noqa: E731
    summary = retrain(
        [ip_log["dir"]], tmp_path / "rt", init=init, updates=30, eval_episodes=0, log=log
    )
    chained = retrain(
        [ip_log["dir"]],
        tmp_path / "rt2",
        init=tmp_path / "rt",
        updates=10,
        eval_episodes=0,
        log=log,
    )
    for run in ("rt", "rt2"):
        state = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["agent"]
        for k in ("count", "mean", "m2"):
            assert torch.equal(state["obs_norm"][k], saved[k]), (run, k)
    assert summary["updates_total"] == 201 + 30 and chained["updates_total"] == 241
    graph = onnx.load(summary["model"])
    mean = next(i for i in graph.graph.initializer if i.dims == [4] and "mean" in i.name)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(mean), saved["mean"].numpy().astype(np.float32)
    )
    assert OnnxPolicy(summary["model"]).metadata.obs_norm == "standardize"

    fresh = retrain(
        [ip_log["dir"]], tmp_path / "fresh", updates=20, eval_episodes=0, log=log,
        obs_norm=True, learning_starts=0, save_replay=True, **TINY,
    )  # fmt: skip
    state = torch.load(tmp_path / "fresh/checkpoint.pt", weights_only=True)["agent"]["obs_norm"]
    logged = torch.load(tmp_path / "fresh/replay.pt", weights_only=True)["obs"].double().numpy()
    assert int(state["count"]) == len(logged) == fresh["transitions"]
    np.testing.assert_allclose(state["mean"].numpy(), logged.mean(axis=0), rtol=0, atol=1e-12)
    with pytest.raises(RetrainError, match="cannot change obs_norm"):
        retrain([ip_log["dir"]], tmp_path / "x", init=fresh_run["out"], obs_norm=True)
