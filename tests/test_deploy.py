"""Deploying into a running node: the swap, refusals while serving goes on, shadow, rollback,
and the transition log surviving kill -9 at 1 kHz."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
import torch
from loop_helpers import (
    DDPG,
    ENV,
    ROOT,
    Node,
    start_bridge,
    start_node,
    stop_bridge,
    wait_for,
    write_launch,
)
from onnx import numpy_helper

from control_node.translog.reader import read_logs
from models.export import export_actor
from models.networks import Actor
from training.logged_data import load_transitions

LIVE = "2ff52a327c6e434c"


def _export(path: Path, env_id: str, obs_dim: int, bound: float, seed: int) -> Path:
    torch.manual_seed(seed)
    actor = Actor(obs_dim, [-bound], [bound], (32, 32))
    export_actor(
        actor, path, env_id=env_id, preset="td3", run_name="candidate", train_steps=0,
        seed=seed, eval_seed=10_000 + seed,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another InvertedPendulum-v5 actor (untrained: it must differ from the live one)."""
    return _export(tmp_path_factory.mktemp("cand") / "cand.onnx", "InvertedPendulum-v5", 4, 3.0, 1)


def deploy(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DDPG, "deploy", *args, "--node", node.admin, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def model_sequence(log_dir: Path) -> list[str]:
    """The model ids of the logged actions in time order, consecutive repeats collapsed."""
    table = read_logs([log_dir]).table.sort_by("t_obs_ns")
    ids = [m for m in table.column("model_id").to_pylist() if m]
    return [m for i, m in enumerate(ids) if i == 0 or ids[i - 1] != m]


def test_deploy_swaps_the_model_without_a_missed_deadline(tmp_path: Path, candidate: Path) -> None:
    node = start_node(tmp_path, rate_hz=100)
    bridge = start_bridge(node.bind, "--rate-hz", "100")
    wait_for("transitions", lambda: node.status()["transitions_seen"] > 50)
    done = deploy(node, str(candidate))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    new = record["model_id"]
    assert new != LIVE and record["previous"] == LIVE and record["misses_during_load"] == 0
    seen = node.status()["transitions_seen"]
    wait_for("transitions by the new model", lambda: node.status()["transitions_seen"] > seen + 50)
    status = node.status()
    assert status["model_id"] == new and status["previous_model_id"] == LIVE
    assert status["deploys"][0]["request_to_first_action_ms"] > 0
    stop_bridge(bridge)
    final = node.stop()
    assert model_sequence(node.log_dir) == [LIVE, new]  # type: ignore[arg-type]
    assert set(final["model_ids"]) == {LIVE, new}


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[:5000])
    return dst


def _nan_weights(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    init = model.graph.initializer[0]
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(dst))
    return dst


def _no_metadata(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save(model, str(dst))
    return dst


def test_bad_models_are_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, candidate: Path
) -> None:
    node = start_node(tmp_path, rate_hz=100, log=False)
    bridge = start_bridge(node.bind, "--rate-hz", "100")
    wait_for("observations", lambda: (b := node.status()["bridges"]) and b[0]["answered"] > 20)
    bad = {
        "truncated or corrupt": _truncated(candidate, tmp_path / "cut.onnx"),
        "non-finite": _nan_weights(candidate, tmp_path / "nan.onnx"),
        "'format_version' is missing": _no_metadata(candidate, tmp_path / "bare.onnx"),
        "exported for env 'Pendulum-v1'": _export(tmp_path / "pend.onnx", "Pendulum-v1", 3, 2, 2),
    }
    for words, path in bad.items():
        before = node.status()["bridges"][0]["answered"]
        done = deploy(node, str(path))
        assert done.returncode == 1 and words in done.stderr, (words, done.stderr)
        status = node.status()
        assert status["model_id"] == LIVE
        wait_for("serving to go on", lambda b=before: node.status()["bridges"][0]["answered"] > b)
    missing = deploy(node, str(tmp_path / "nowhere.onnx"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
    stop_bridge(bridge)
    final = node.stop()
    assert [d["ok"] for d in final["deploys"]] == [False] * 4 and final["model_ids"] == [LIVE]


def test_shadow_logs_both_actions_and_rollback_returns(tmp_path: Path, candidate: Path) -> None:
    node = start_node(tmp_path, rate_hz=100)
    bridge = start_bridge(node.bind, "--rate-hz", "100")
    wait_for("transitions", lambda: node.status()["transitions_seen"] > 20)
    done = deploy(node, str(candidate), "--shadow")
    assert done.returncode == 0, done.stderr
    cand_id = json.loads(done.stdout)["model_id"]
    wait_for("shadow actions", lambda: (node.status()["shadow"] or {}).get("actions", 0) > 30)
    shadow = node.status()["shadow"]
    assert shadow["model_id"] == cand_id and shadow["mean_abs_diff"] > 0
    assert node.status()["model_id"] == LIVE  # only the live actor acts
    assert deploy(node, str(candidate)).returncode == 0  # promote
    seen = node.status()["transitions_seen"]
    wait_for("new-model transitions", lambda: node.status()["transitions_seen"] > seen + 20)
    back = deploy(node, "--rollback")
    assert back.returncode == 0 and json.loads(back.stdout)["model_id"] == LIVE
    seen = node.status()["transitions_seen"]
    wait_for("rolled-back transitions", lambda: node.status()["transitions_seen"] > seen + 20)
    stop_bridge(bridge)
    node.stop()
    table = read_logs([node.log_dir]).table  # type: ignore[list-item]
    shadowed = [r for r in table.to_pylist() if r["shadow_model_id"]]
    assert shadowed and all(r["shadow_model_id"] == cand_id for r in shadowed)
    assert all(r["model_id"] == LIVE and r["shadow_action"] is not None for r in shadowed)
    assert model_sequence(node.log_dir) == [LIVE, cand_id, LIVE]  # type: ignore[arg-type]


def test_kill_9_at_1khz_loses_at_most_the_open_chunk(tmp_path: Path) -> None:
    node = start_node(tmp_path, rate_hz=1000)  # the default chunk_seconds: 1 s
    bridge = start_bridge(node.bind, "--rate-hz", "1000", "--max-episode-steps", "300")
    wait_for("three committed chunks", lambda: node.status()["log"]["chunks"] >= 3)
    committed = node.status()["transitions_logged"]
    killed_ns = time.monotonic_ns()  # the node's clock too: CLOCK_MONOTONIC, one machine
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=10)
    sent = stop_bridge(bridge)["transitions_sent"]
    contents = read_logs([node.log_dir])  # type: ignore[list-item]
    assert not contents.unreadable
    rows = contents.table.num_rows
    assert rows == sum(pq.ParquetFile(c).metadata.num_rows for c in contents.chunks)
    assert committed <= rows <= sent
    # what is on disk is exactly a prefix of what was sent: every episode's steps run 0, 1, ...
    table = contents.table.sort_by("t_obs_ns")
    episodes = table.column("episode").to_numpy()
    steps = table.column("step").to_numpy()
    for e in np.unique(episodes):
        assert np.array_equal(steps[episodes == e], np.arange((episodes == e).sum()))
    # lost: only the open chunk, what the writer took in during the last chunk_seconds (plus
    # its 50 ms poll and one write; the bridge's own count goes on after the kill, so time it)
    open_s = (killed_ns - max(table.column("t_logged_ns").to_pylist())) / 1e9
    assert 0 <= open_s <= 1.0 + 0.5, open_s
    # and what is there is retrainable: every committed row loads into the replay's arrays
    loaded = load_transitions([node.log_dir])  # type: ignore[list-item]
    assert len(loaded.obs) == rows and loaded.valid.all()
    # a node started again on the same directory appends and touches nothing already there
    before = {c.name: c.read_bytes() for c in contents.chunks}
    again = start_node(tmp_path, rate_hz=200)
    bridge = start_bridge(again.bind, "--rate-hz", "200", "--seed", "7")
    wait_for("new transitions", lambda: again.status()["transitions_seen"] > 50)
    stop_bridge(bridge)
    again.stop()
    after = read_logs([node.log_dir])  # type: ignore[list-item]
    assert after.table.num_rows > rows
    assert {c.name: c.read_bytes() for c in after.chunks if c.name in before} == before


def test_continual_mode_retrains_gates_and_deploys(tmp_path: Path) -> None:
    launch = write_launch(
        tmp_path,
        bridge__max_episode_steps=100,
        continual={
            "enabled": True,
            "every_transitions": 150,
            "updates": 50,
            "init": str(ROOT / "models" / "zoo" / "inverted_pendulum"),
            "eval_episodes": 1,
            "margin": 50.0,  # as launch.yaml: a candidate continued from the shipped run passes
            "out_dir": str(tmp_path / "continual"),
            "max_rounds": 1,
        },
    )
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "40", "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    (decision,) = summary["continual"]
    assert decision["deploy"] and decision["live_model_id"] == LIVE
    assert decision["candidate_return"] >= decision["live_return"] - 50.0
    assert decision["transitions"] >= 150 and decision["retrain"]["updates"] == 50
    assert set(summary["model_ids"]) == {LIVE, decision["candidate_model_id"]}
    (swap,) = [d for d in summary["deploys"] if d["ok"]]
    assert swap["model_id"] == decision["candidate_model_id"]
    models = read_logs([tmp_path / "logs"]).table.column("model_id").to_pylist()
    assert decision["candidate_model_id"] in models and LIVE in models


def test_continual_gate_keeps_the_live_actor_when_the_candidate_is_worse(tmp_path: Path) -> None:
    # The init run's config says Adam at lr 1.0: 50 updates wreck the shipped actor (it scores
    # about 2 against the live actor's 1,000), and a margin of 0 must refuse it.
    init = tmp_path / "init"
    init.mkdir()
    zoo = ROOT / "models" / "zoo" / "inverted_pendulum"
    for name in ("checkpoint.pt", "actor.onnx", "replay.pt"):
        (init / name).symlink_to(zoo / name)
    config = (zoo / "config.yaml").read_text().splitlines()
    config = [f"{k}: 1.0" if (k := line.split(":")[0]) in ("actor_lr", "critic_lr") else line
              for line in config]  # fmt: skip
    (init / "config.yaml").write_text("\n".join(config) + "\n")
    launch = write_launch(
        tmp_path,
        bridge__max_episode_steps=100,
        continual={"enabled": True, "every_transitions": 150, "updates": 50, "init": str(init),
                   "eval_episodes": 1, "margin": 0.0, "out_dir": str(tmp_path / "continual"),
                   "max_rounds": 1},
    )  # fmt: skip
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "25", "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    (decision,) = summary["continual"]
    assert not decision["deploy"] and decision["live_model_id"] == LIVE, decision
    assert decision["candidate_return"] < decision["live_return"] - 0.0
    assert decision["reason"].startswith(f"candidate {decision['candidate_return']:.1f} < live")
    assert summary["model_ids"] == [LIVE] and not [d for d in summary["deploys"] if d["ok"]]
    assert set(read_logs([tmp_path / "logs"]).table.column("model_id").to_pylist()) <= {LIVE, ""}
