"""Parallel environments (``--num-envs N``): every environment's transitions are exactly those
of a plain Gymnasium environment driven with the same actions (final observations, terminated
apart from truncated, resets), one environment is the single-environment trainer transition for
transition, the schedules count environment steps, and equal seeds and N give equal runs,
stepped in this process or in worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from control_node.config import ConfigError
from models.policy import OnnxPolicy
from sim_bridge.envs import make_env
from training.config import make_config
from training.metrics import read_csv
from training.replay import ReplayBuffer, Transitions
from training.rundir import resume_config
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "eval_every": 0,
    "eval_episodes": 0,
    "export": False,
    "save_replay": True,
    "batch_size": 16,
    "actor_hidden": (16, 16),
    "critic_hidden": (16, 16),
    "log_every": 100,
}


def _run(tmp_path: Path, name: str, **overrides: Any) -> Path:
    run = tmp_path / name
    trainer = Trainer(make_config("td3", **{**TINY, **overrides, "out": str(run)}), progress=False)
    try:
        trainer.run()
    finally:
        trainer.close()  # also stops AsyncVectorEnv's worker processes
    return run


def _replay(run: Path) -> dict[str, np.ndarray]:
    saved = torch.load(run / "replay.pt", weights_only=True)
    size, pos = int(saved["size"]), int(saved["pos"])
    assert pos in (0, size), "rows in the order they were stored"
    return {k: v.numpy() for k, v in saved.items() if isinstance(v, torch.Tensor)}


def _replay_in_plain_env(
    env_id: str, rows: dict[str, np.ndarray], env_index: int, n_envs: int, seed: int
) -> tuple[int, int]:
    """Drive one plain environment with environment ``env_index``'s stored actions (its rows
    are every ``n_envs``-th) and check every stored field against what it returns; returns the
    terminations and truncations seen."""
    env = make_env(env_id)
    obs, _ = env.reset(seed=seed + env_index)
    ends = [0, 0]
    try:
        for r in range(env_index, len(rows["reward"]), n_envs):
            np.testing.assert_array_equal(rows["obs"][r], obs.astype(np.float32), err_msg=f"{r}")
            next_obs, reward, terminated, truncated, _ = env.step(rows["action"][r])
            np.testing.assert_array_equal(rows["next_obs"][r], next_obs.astype(np.float32))
            assert rows["reward"][r] == np.float32(reward), r
            assert (rows["terminated"][r], rows["truncated"][r]) == (terminated, truncated), r
            ends[0] += int(terminated)
            ends[1] += int(truncated)
            obs = env.reset()[0] if terminated or truncated else next_obs
    finally:
        env.close()
    return ends[0], ends[1]


@pytest.mark.parametrize("n_envs", [1, 3])
def test_each_environment_is_a_plain_env_with_its_own_ends(tmp_path: Path, n_envs: int) -> None:
    """InvertedPendulum terminates (random actions drop it in a few steps); every episode's
    last transition keeps its own final observation and ``terminated``, not the next reset.
    With one environment this is the single-environment trainer's loop: the same env seed,
    reset and actions. Learning starts half-way, so the policy's actions are checked too."""
    seed, steps = 4, 600
    run = _run(
        tmp_path, "ip", env="InvertedPendulum-v5", steps=steps, learning_starts=300,
        num_envs=n_envs, seed=seed,
    )  # fmt: skip
    rows = _replay(run)
    assert len(rows["reward"]) == steps
    ends = [
        _replay_in_plain_env("InvertedPendulum-v5", rows, i, n_envs, seed) for i in range(n_envs)
    ]
    assert all(term > 3 for term, _ in ends)  # every environment had episodes end in it
    episodes = read_csv(run / "episodes.csv")
    assert len(episodes) == sum(term + trunc for term, trunc in ends) == _ckpt(run)["episode"]
    assert rows["terminated"].sum() == sum(term for term, _ in ends)
    # The random phase is the trainer's stream: seed + 2, one uniform action per step.
    rng = np.random.default_rng(seed + 2)
    low, high = np.float32(-3.0), np.float32(3.0)
    random_actions = np.stack([rng.uniform(low, high, (1,)) for _ in range(300)])
    np.testing.assert_array_equal(rows["action"][:300], random_actions.astype(np.float32))
    assert _ckpt(run)["agent"]["updates"] == steps - 300 + 1


def test_time_limits_truncate_per_environment_and_are_not_terminations(tmp_path: Path) -> None:
    seed = 1
    run = _run(
        tmp_path, "pd", env="Pendulum-v1", steps=1000, learning_starts=1000, num_envs=2, seed=seed
    )
    rows = _replay(run)
    ends = [_replay_in_plain_env("Pendulum-v1", rows, i, 2, seed) for i in range(2)]
    assert ends == [(0, 2), (0, 2)]  # 500 steps each: truncated at 200 and 400, never terminated
    truncated_rows = np.flatnonzero(rows["truncated"])
    assert list(truncated_rows) == [398, 399, 798, 799]  # step 200 of each: rows 2 * 199 + i
    lengths = [r["length"] for r in read_csv(run / "episodes.csv")]
    assert lengths == [200, 200, 200, 200]
    assert [r["step"] for r in read_csv(run / "episodes.csv")] == [399, 400, 799, 800]


def _ckpt(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def test_schedules_count_environment_steps(tmp_path: Path) -> None:
    """Three environments: 3 steps per iteration. Updates keep the update-to-data ratio
    (updates_per_step / update_every per environment step), logs fire once per period passed,
    and the last iteration keeps only the steps still wanted."""
    run = _run(
        tmp_path, "s", env="Pendulum-v1", steps=601, learning_starts=200, num_envs=3,
        update_every=2, updates_per_step=3, log_every=100, eval_every=250, eval_episodes=1,
    )  # fmt: skip
    state = _ckpt(run)
    assert state["step"] == 601 and len(_replay(run)["reward"]) == 601
    # update times: even steps 200..600, 201 of them, 3 updates each
    assert state["agent"]["updates"] == 201 * 3
    steps = [r["step"] for r in read_csv(run / "train.csv")]
    assert steps == [102, 201, 300, 402, 501, 600]  # the first iteration past each 100
    rows = read_csv(run / "train.csv")
    assert rows[1]["updates"] == 3 and rows[2]["updates"] == 3 * 51  # 200, 202, ..., 300
    assert [r["step"] for r in read_csv(run / "eval.csv")] == [252, 501, 601]  # and the final


def test_same_seed_and_n_give_the_same_run_sync_or_async(tmp_path: Path) -> None:
    common = {"env": "Pendulum-v1", "steps": 400, "learning_starts": 100, "num_envs": 2}
    a = _run(tmp_path, "a", **common)
    b = _run(tmp_path, "b", **common, async_envs=True)  # worker processes: the same transitions
    ra, rb = _replay(a), _replay(b)
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    ca, cb = _ckpt(a)["agent"], _ckpt(b)["agent"]
    for net in ("actor", "critic"):
        for k in ca[net]:
            assert torch.equal(ca[net][k], cb[net][k]), (net, k)
    keys = ("step", "critic_loss", "actor_loss", "q")
    rows = [read_csv(r / "train.csv") for r in (a, b)]
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    other = _replay(_run(tmp_path, "c", **{**common, "num_envs": 3}))
    assert not np.array_equal(other["obs"], ra["obs"])


def test_a_run_with_n_environments_resumes(tmp_path: Path) -> None:
    run = _run(tmp_path, "r", env="Pendulum-v1", steps=300, learning_starts=100, num_envs=4)
    assert _ckpt(run)["step"] == 300
    trainer = Trainer(resume_config(run, steps=500), resume=True, progress=False)
    try:
        assert trainer.step == 300 and len(trainer.replay) == 300
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 500 and summary["updates"] == 500 - 100 + 1
    assert len(_replay(run)["reward"]) == 500


def test_bad_num_envs_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"num_envs = 0 must be in 1\.\.4096"):
        make_config("td3", num_envs=0)
    with pytest.raises(ConfigError, match="num_envs = 2 must be 1 with --pixels"):
        make_config(None, env="InvertedPendulum-v5", pixels=True, num_envs=2)


def test_train_summary_counts_every_environment(tmp_path: Path) -> None:
    cfg = make_config(
        "td3",
        **{**TINY, "save_replay": False},
        env="Pendulum-v1",
        steps=240,
        learning_starts=240,
        num_envs=8,
        out=str(tmp_path / "sum"),
    )
    summary = train(cfg, progress=False)
    assert summary["steps"] == summary["env_steps"] == 240 and summary["updates"] == 1


def test_ou_noise_resets_only_the_environment_whose_episode_ended() -> None:
    from training.noise import OUNoise

    noise, single = OUNoise(2, seed=0, num_envs=3), OUNoise(2, seed=0)
    rows = noise()
    assert rows.shape == (3, 2) and np.array_equal(rows[0], single())  # the same stream
    noise.reset(np.array([False, True, False]))
    assert np.array_equal(noise.x[1], [0.0, 0.0]) and (noise.x[[0, 2]] != 0).all()
    restored = OUNoise(2, seed=5, num_envs=3)
    restored.load_state_dict(noise.state_dict())
    assert np.array_equal(restored.x, noise.x) and np.array_equal(restored(), noise())


def test_cli_trains_n_environments_with_obs_norm_exports_and_resumes(tmp_path: Path) -> None:
    """``ddpg train --num-envs 2 --obs-norm`` trains and exports a raw-observation actor, and
    ``--resume`` may continue it with another number of environments."""
    run = tmp_path / "cli"
    tiny = ["--env", "Pendulum-v1", "--learning-starts", "100", "--batch-size", "16"]
    tiny += ["--actor-hidden", "16,16", "--critic-hidden", "16,16", "--eval-every", "0"]
    tiny += ["--eval-episodes", "1", "--no-progress", "--json"]
    args = ["--steps", "300", "--num-envs", "2", "--obs-norm", "--out", str(run)]
    first = _train_cli(*tiny, *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["steps"] == 300 and summary["model"] == str(run / "actor.onnx")
    assert OnnxPolicy(run / "actor.onnx").metadata.obs_norm == "standardize"
    again = _train_cli("--resume", str(run), "--steps", "450", "--num-envs", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    state = _ckpt(run)
    assert state["step"] == 450 and int(state["agent"]["obs_norm"]["count"]) == 450


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m training`` (``ddpg train``) in a child process, stopped on a timeout."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_replay_extend_wraps_around_and_its_device_path_stores_the_same() -> None:
    """Rows of N environments go into the ring in row order, wrapping; the path a CUDA replay
    takes (torch indexing instead of numpy views) is run here on the CPU and stores the same."""
    rng = np.random.default_rng(0)
    host, device = ReplayBuffer(7, 3, 2), ReplayBuffer(7, 3, 2)
    device._host = None  # as on CUDA
    one = ReplayBuffer(7, 3, 2)
    for _ in range(4):  # 4 x 3 rows into 7: wraps twice
        cols = Transitions(
            rng.standard_normal((3, 3)),
            rng.standard_normal((3, 2)).astype(np.float32),
            rng.standard_normal(3),
            rng.standard_normal((3, 3)),
            rng.random(3) < 0.3,
            rng.random(3) < 0.3,
        )
        host.extend(cols)
        device.extend(cols)
        for r in range(3):
            one.add(*(c[r] for c in cols))
    assert host.pos == device.pos == one.pos == 12 % 7 and len(host) == 7
    for k in host.data:
        assert torch.equal(host.data[k], device.data[k]), k
        assert torch.equal(host.data[k], one.data[k]), k
    with pytest.raises(ValueError, match="8 rows do not fit a replay of capacity 7"):
        host.extend(Transitions(*(np.zeros((8, *v.shape[1:])) for v in host.data.values())))


def test_ctrl_c_to_the_process_group_checkpoints_a_run_with_async_workers(tmp_path: Path) -> None:
    """The terminal sends SIGINT to every process of the foreground group, the workers too:
    they ignore it, and the trainer finishes its step, checkpoints and says how to resume."""
    out = tmp_path / "run"
    args = ["--env", "Pendulum-v1", "--learning-starts", "100", "--batch-size", "16"]
    args += ["--actor-hidden", "16,16", "--critic-hidden", "16,16", "--eval-every", "0"]
    args += ["--log-every", "100", "--num-envs", "2", "--async-envs", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *args, "--steps", "1000000", "--out", str(out)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group, as a shell job has
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "train.csv").exists() or len(read_csv(out / "train.csv")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert f"ddpg train --resume {out}" in stderr
        assert _ckpt(out)["step"] >= 300
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
