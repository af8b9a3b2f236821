"""``ddpg logs DIR --to-minari`` and ``ddpg retrain --minari``: a transition log written as a
Minari dataset (Minari's own API and loader), exact to the value, state and pixels, split at
episode ends and gaps; and DDPG continued from that dataset learning exactly what it learns from
the log itself; and a dataset made with Minari alone read by its spaces and environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import minari
import numpy as np
import pytest
import torch
from gymnasium import spaces
from loop_helpers import PENDULUM, ROOT, start_bridge, start_node, stop_bridge

from control_node import cli
from control_node.translog.reader import read_pixel_segments
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog
from models.policy import OnnxPolicy
from training.logged_data import LoggedTransitions, PixelLog, RetrainError, load_logs
from training.minari_data import load_minari
from training.retrain import retrain

SPEC = LogSpec("InvertedPendulum-v5", (4,), "float32", (-3.0,), (3.0,))
PIXEL_ACTOR = ROOT / "models" / "zoo" / "inverted_pendulum_pixels" / "actor.onnx"
BRIDGES = ("b0", "b1")


def _obs(bridge: str, episode: int, step: int) -> np.ndarray:
    return np.array([BRIDGES.index(bridge), episode, step, 0.5 * step], np.float32)


def _row(
    bridge: str, episode: int, step: int, model: str, end: str = "", obs: Any = None
) -> Transition:
    """Every value derived from where the row stands, so a read-back can be checked exactly."""
    return Transition(
        bridge, f"s{bridge[1]}", episode, step,
        _obs(bridge, episode, step) if obs is None else obs,
        np.array([step / 10 - 0.2], np.float32), 10.0 * episode + step + 0.5 * BRIDGES.index(bridge),
        _obs(bridge, episode, step + 1), end == "terminated", end == "truncated",
        model, model == "", 100 * episode + step, step, step + 1, step + 2,
    )  # fmt: skip


def _written_log(d: Path) -> list[dict[str, Any]]:
    """A log of two bridges, written interleaved across chunks of 3 rows, and the Minari
    episodes it must become, in order: b0's episode 0 (terminated), b0's episode 1 cut at the
    missing step 3 (its observations chain on) and truncated at step 6 (step 5 the robot's own
    safe action), and b1's episode 0 cut where its step-2 observation is not the previous
    next_obs, then left open."""
    rows = [_row("b0", 0, k, "m1", "terminated" if k == 4 else "") for k in range(5)]
    rows += [_row("b0", 1, k, "m2") for k in range(3)]
    rows += [_row("b0", 1, k, "" if k == 5 else "m2", "truncated" if k == 6 else "") for k in (4, 5, 6)]  # fmt: skip
    rows[8].obs = _obs("b0", 1, 3)  # the robot stood still: only the step number shows the gap
    moved = np.array([9, 9, 9, 9], np.float32)
    rows += [_row("b1", 0, k, "m1", obs=moved if k == 2 else None) for k in range(4)]
    order = sorted(range(len(rows)), key=lambda i: (rows[i].step, rows[i].bridge_id))
    with TransitionLog(d, SPEC, chunk_rows=3, fsync=False) as log:
        for i in order:
            log.append(rows[i])
        assert log.flush()
    runs = [rows[0:5], rows[5:8], rows[8:11], rows[11:13], rows[13:15]]
    ends = ["terminated", "gap", "truncated", "gap", "gap"]
    return [{"rows": run, "end": end} for run, end in zip(runs, ends, strict=True)]


def _export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["logs", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_state_log_exports_to_minari_exactly_one_episode_per_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _written_log(tmp_path / "log")
    root = tmp_path / "datasets"
    args = [str(tmp_path / "log"), "--to-minari", "robot/ip-logged-v0", "--out", str(root)]
    code, out, err = _export([*args, "--json"], capsys)
    assert code == 0, err
    done = json.loads(out)
    assert done["transitions_logged"] == done["total_steps"] == 15
    assert done["total_episodes"] == 5
    assert done["episode_ends"] == {"terminated": 1, "truncated": 1, "gap": 3}

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    dataset = minari.load_dataset("robot/ip-logged-v0")
    assert dataset.total_steps == 15 and dataset.total_episodes == 5
    assert dataset.observation_space == spaces.Box(-np.inf, np.inf, (4,), np.float32)
    assert dataset.action_space == spaces.Box(-3.0, 3.0, (1,), np.float32)
    metadata = list(dataset.storage.get_episode_metadata(range(5)))
    for ep, meta, want in zip(dataset.iterate_episodes(), metadata, expected, strict=True):
        rows = want["rows"]
        first = rows[0]
        np.testing.assert_array_equal(
            ep.observations, np.stack([first.obs, *(r.next_obs for r in rows)])
        )
        np.testing.assert_array_equal(ep.actions, np.stack([r.action for r in rows]))
        assert ep.rewards.tolist() == [r.reward for r in rows]
        assert ep.terminations.tolist() == [r.terminated for r in rows]
        assert ep.truncations.tolist() == [r.truncated for r in rows]
        assert ep.infos["model_id"].tolist() == ["", *(r.model_id for r in rows)]
        assert ep.infos["safe_action"].tolist() == [False, *(r.safe_action for r in rows)]
        assert (
            meta["bridge_id"] == first.bridge_id and meta["bridge_session"] == first.bridge_session
        )
        assert (meta["log_episode"], meta["first_step"]) == (first.episode, first.step)
        assert meta["model_ids"] == sorted({r.model_id for r in rows} - {""})
        assert meta["end"] == want["end"] and meta["total_steps"] == len(rows)

    # a dataset is never overwritten, and the refusal leaves it as it was
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    code, out, err = _export(args, capsys)
    assert code == 1 and "exists: a Minari dataset is never overwritten" in err, err
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    (tmp_path / "empty").mkdir()
    code, _, err = _export([str(tmp_path / "empty"), "--to-minari", "x-v0", "--out", str(root)], capsys)  # fmt: skip
    assert code == 1 and err.strip() == (
        f"ddpg logs: error: {tmp_path / 'empty'}: no committed transitions to export"
    )


def test_a_served_pixel_log_exports_bit_for_bit_and_reads_back_as_its_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node(tmp_path, model=PIXEL_ACTOR, rate_hz=100, extra=("--chunk-seconds", "0.1"))
    bridge = start_bridge(
        node.bind, "--pixels", "--mode", "lockstep", "--episodes", "2", "--max-episode-steps", "30"
    )  # 30 physics steps: 10 bridge steps an episode
    bridge.wait(120)  # it stops by itself after its episodes
    sent = stop_bridge(bridge)
    node.stop()
    assert sent["transitions_sent"] == 20 and sent["episodes"] == 2
    root = tmp_path / "datasets"
    assert node.log_dir is not None
    code, out, err = _export(
        [str(node.log_dir), "--to-minari", "ip-pixels-v0", "--out", str(root), "--json"], capsys
    )
    assert code == 0, err
    done = json.loads(out)
    assert done["pixels"] == {"size": 64, "stack": 3, "repeat": 3, "camera": None}

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    dataset = minari.load_dataset("ip-pixels-v0")
    assert dataset.total_steps == 20 == done["transitions_logged"]
    assert dataset.total_episodes == 2
    assert dataset.observation_space == spaces.Box(0, 255, (9, 64, 64), np.uint8)
    segments = read_pixel_segments([node.log_dir])
    model_id = OnnxPolicy(PIXEL_ACTOR).model_id
    for ep, seg in zip(dataset.iterate_episodes(), segments, strict=True):
        assert ep.observations.dtype == np.uint8
        np.testing.assert_array_equal(ep.observations, seg.observations())
        np.testing.assert_array_equal(ep.actions, seg.action)
        assert ep.truncations.tolist() == [False] * 9 + [True]
        assert ep.infos["model_id"].tolist() == ["", *[model_id] * 10]

    # and back: the frames the frame replay takes, as the log itself gives them
    from_minari, from_log = load_minari("ip-pixels-v0"), load_logs([node.log_dir])
    assert isinstance(from_minari, PixelLog) and isinstance(from_log, PixelLog)
    assert from_minari.spec == from_log.spec and from_minari.kept == from_log.kept == 20
    for a, b in zip(from_minari.segments, from_log.segments, strict=True):
        np.testing.assert_array_equal(a.obs0, b.obs0)
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.action, b.action)
        assert a.model_id.tolist() == b.model_id.tolist()


def test_retrain_from_an_exported_dataset_learns_what_it_learns_from_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node(tmp_path, model=PENDULUM, rate_hz=100)
    bridge = start_bridge(
        node.bind, "--mode", "lockstep", "--episodes", "2", "--max-episode-steps", "60"
    )
    bridge.wait(120)  # it stops by itself after its episodes
    sent = stop_bridge(bridge)
    node.stop()
    assert node.log_dir is not None and sent["transitions_sent"] == 120
    root = tmp_path / "datasets"
    code, _, err = _export([str(node.log_dir), "--to-minari", "ip-v0", "--out", str(root)], capsys)
    assert code == 0, err
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    data = load_minari("ip-v0")
    assert isinstance(data, LoggedTransitions) and len(data) == 120 and data.spec == SPEC

    common = ["--updates", "60", "--eval-episodes", "0", "--seed", "0", "--no-progress"]
    code = cli.main(["retrain", "--minari", "ip-v0", "--out", str(tmp_path / "m"), *common])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "retrain.json").read_text())
    assert report["transitions"]["from_logs"] == 120 and report["updates"] == 60
    assert (tmp_path / "m" / "actor.onnx").exists()
    args: dict[str, Any] = {"updates": 60, "eval_episodes": 0, "seed": 0, "log": lambda _: None}
    retrain([node.log_dir], tmp_path / "l", **args)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("m", "l"))
    for key, value in a["agent"]["actor"].items():
        assert torch.equal(value, b["agent"]["actor"][key]), key

    code = cli.main(["retrain", "--minari", "no-such-v0", "--out", str(tmp_path / "x"), *common])
    _, err = capsys.readouterr()
    assert (
        code == 1
        and "ddpg retrain: error: --minari no-such-v0: Dataset no-such-v0 not found" in err
    )
    assert not (tmp_path / "x").exists()


def test_an_offline_rl_users_own_dataset_is_read_by_its_spaces_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    rng = np.random.default_rng(0)
    lengths = (7, 5)
    episodes = [
        minari.data_collector.EpisodeBuffer(
            observations=rng.standard_normal((n + 1, 4)).astype(np.float32),
            actions=rng.uniform(-3, 3, (n, 1)).astype(np.float32),
            rewards=list(rng.standard_normal(n)),
            terminations=[False] * (n - 1) + [True],
            truncations=[False] * n,
        )
        for n in lengths
    ]
    obs_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
    act_space = spaces.Box(-3.0, 3.0, (1,), np.float32)
    with pytest.warns(UserWarning):  # Minari's reminders: no author, e-mail, permalink
        minari.create_dataset_from_buffers(
            "theirs-v0", episodes, eval_env="InvertedPendulum-v5",
            observation_space=obs_space, action_space=act_space, data_format="arrow",
        )  # fmt: skip
    data = load_minari("theirs-v0")
    assert isinstance(data, LoggedTransitions) and data.spec == SPEC and len(data) == 12
    np.testing.assert_array_equal(data.obs[:7], episodes[0].observations[:-1])
    np.testing.assert_array_equal(data.next_obs[7:], episodes[1].observations[1:])
    assert data.terminated.tolist() == [False] * 6 + [True] + [False] * 4 + [True]
    assert data.step.tolist() == [*range(7), *range(5)] and len(set(data.episode)) == 2

    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(
            "discrete-v0",
            [minari.data_collector.EpisodeBuffer(
                observations=np.zeros((3, 4), np.float32), actions=[0, 1], rewards=[0.0, 0.0],
                terminations=[False, True], truncations=[False, False],
            )],
            eval_env="InvertedPendulum-v5", observation_space=obs_space,
            action_space=spaces.Discrete(2), data_format="arrow",
        )  # fmt: skip
    with pytest.raises(RetrainError, match=r"actions are Discrete.*DDPG needs a 1-D Box"):
        load_minari("discrete-v0")


def test_out_goes_with_to_minari(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _export([str(tmp_path), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and err == "ddpg logs: error: --out goes with --to-minari\n"
