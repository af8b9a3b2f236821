"""The control loop with real processes and sockets: ``ddpg serve`` and ``ddpg bridge`` as
subprocesses on free ports, a raw DEALER socket sending real bytes where a test needs to send
what no correct bridge would, and the Parquet log read back from disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from loop_helpers import (
    CHEETAH,
    DDPG,
    ENV,
    PENDULUM,
    STARTED,
    Node,
    RawBridge,
    start_bridge,
    start_node,
    stop_bridge,
    wait_for,
    write_launch,
)

from control_node import protocol as P
from control_node.admin import request
from control_node.config import free_tcp_endpoint
from control_node.translog.reader import read_logs
from models.policy import OnnxPolicy
from sim_bridge.envs import make_env
from training.evaluation import evaluate


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return start_node(tmp_path)


# -- protocol with a real node ------------------------------------------------------------------
def test_hello_observation_action_round_trip(node: Node) -> None:
    raw = RawBridge(node.bind)
    welcome = raw.hello()
    assert welcome.type == P.WELCOME and welcome["model_id"] == "2ff52a327c6e434c"
    np.testing.assert_array_equal(welcome.arrays["safe_action"], [0.0])
    obs = np.array([0.01, -0.02, 0.03, 0.1], np.float32)
    raw.send(raw.obs(obs))
    action = raw.recv()
    assert action.type == P.ACTION and (action["episode"], action["step"]) == (0, 0)
    assert action["model_id"] == welcome["model_id"] and not action["safe"]
    np.testing.assert_allclose(action.arrays["action"], OnnxPolicy(PENDULUM)(obs), atol=1e-6)
    raw.send(raw.obs(obs * 2, step=1, applied_seq=action["seq"]))
    assert raw.recv()["step"] == 1
    raw.close()
    final = node.stop()
    assert final["transitions_logged"] == 1 and final["rejected_messages"] == 0
    table = read_logs([node.log_dir]).table  # type: ignore[list-item]
    row = table.to_pylist()[0]
    assert row["model_id"] == welcome["model_id"] and row["action_seq"] == action["seq"]
    np.testing.assert_array_equal(row["next_obs"], obs * 2)


def test_malformed_messages_are_rejected_counted_and_serving_goes_on(node: Node) -> None:
    raw = RawBridge(node.bind)
    raw.hello()
    before = node.status()
    t0 = time.monotonic()
    good = np.zeros(4, np.float32)
    header_v2 = [b"\x82\xa1v\x02\xa4type\xa3obs"]  # {"v": 2, "type": "obs"}
    cases: list[tuple[list[Any], str]] = [
        ([b"\x00garbage\xff"], "bad_header"),
        (header_v2, "bad_version"),
        (raw.obs(np.zeros(4, np.uint8)), "bad_shape"),  # wrong dtype
        (raw.obs(np.zeros(5, np.float32)), "bad_shape"),  # wrong shape
        ([*raw.obs(good, step=2)[:1], b""], "bad_array"),  # header says 2 arrays, 1 follows
        (P.encode(P.ACTION, {}), "bad_field"),  # a node does not take actions
    ]
    stranger = RawBridge(node.bind, "stranger")  # never says hello
    other = RawBridge(node.bind, "other")  # another robot
    rounds = 0
    while time.monotonic() - t0 < 1.0 or rounds < 3:  # a sustained barrage, not one burst
        rounds += 1
        for frames, code in cases:
            raw.send(frames)
            reply = raw.recv()
            assert reply.type == P.ERROR and reply["code"] == code, reply.fields
        # NaN: answered with the safe action, flagged and counted
        raw.send(raw.obs(np.array([np.nan, 0, 0, 0], np.float32)))
        reply = raw.recv()
        assert reply.type == P.ACTION and reply["safe"] and reply.arrays["action"].tolist() == [0.0]
        stranger.send(stranger.obs(good))
        reply = stranger.recv()
        assert reply.type == P.ERROR and reply["code"] == "unknown_bridge"
        reply = other.hello(env_id="Hopper-v5", obs_shape=(11,))
        assert reply["code"] == "spec_mismatch" and "Hopper-v5" in reply["reason"]
    # serving went on: the node still answers good observations and kept its clock
    raw.send(raw.obs(good))
    assert raw.recv().type == P.ACTION
    after = node.status()
    wall = time.monotonic() - t0
    counted = after["rejected_by_code"]
    assert counted.get("bad_header") == rounds and counted.get("bad_version") == rounds
    assert counted.get("bad_shape") == 2 * rounds and counted.get("unknown_bridge") == rounds
    assert counted.get("spec_mismatch") == rounds and counted.get("non_finite") == rounds
    assert after["safe_actions"] == rounds and after["non_finite_observations"] == rounds
    assert after["rejected_messages"] == before["rejected_messages"] + 9 * rounds
    ticks = after["ticks"] + after["deadline_misses"] - before["ticks"] - before["deadline_misses"]
    assert ticks >= 0.8 * 200 * wall, (ticks, wall)
    assert after["deadline_misses"] - before["deadline_misses"] <= 0.05 * ticks
    for r in (raw, stranger, other):
        r.close()


def test_watchdog_marks_a_silent_bridge_stale_and_it_resumes(tmp_path: Path) -> None:
    node = start_node(tmp_path, log=False, extra=("--watchdog-ms", "50"))
    try:
        raw = RawBridge(node.bind)
        raw.hello()
        raw.send(raw.obs(np.zeros(4, np.float32)))
        raw.recv()

        def bridge_state() -> str:
            return node.status()["bridges"][0]["state"]

        wait_for("the bridge to go stale", lambda: bridge_state() == "stale")
        raw.send(raw.obs(np.zeros(4, np.float32)))
        assert raw.recv().type == P.ACTION
        assert bridge_state() == "live" and node.status()["stale_events"] == 1
        raw.close()
    finally:
        node.stop()


# -- bridges ------------------------------------------------------------------------------------
def test_lockstep_through_node_and_bridge_equals_ddpg_eval(tmp_path: Path) -> None:
    node = start_node(tmp_path, model=CHEETAH, rate_hz=100)
    bridge = start_bridge(
        node.bind,
        *("--env", "HalfCheetah-v5", "--mode", "lockstep", "--episodes", "2"),
        *("--seed", "10000", "--max-episode-steps", "200"),
    )
    out, err = bridge.communicate(timeout=120)
    assert bridge.returncode == 0, err
    served = json.loads(out)
    env = make_env("HalfCheetah-v5", max_episode_steps=200)
    direct = evaluate(OnnxPolicy(CHEETAH), env, episodes=2, seed=10000)
    assert served["returns"] == direct.returns  # exactly: same seeds, same actions
    final = node.stop()
    assert final["transitions_logged"] == served["transitions_sent"] == 400
    assert final["returns_by_model"]["3c953696f74e2775"]["episodes"] == 2


def test_several_realtime_bridges_at_once(node: Node) -> None:
    ids = ["a", "b", "c"]
    bridges = [
        start_bridge(node.bind, "--id", i, "--rate-hz", "100", "--max-episode-steps", "50")
        for i in ids
    ]
    wait_for(
        "three bridges through an episode each",
        lambda: len([b for b in node.status()["bridges"] if b["episodes"] >= 1]) == 3,
    )
    summaries = {s["bridge"]: s for s in map(stop_bridge, bridges)}
    final = node.stop()
    table = read_logs([node.log_dir]).table  # type: ignore[list-item]
    per_bridge = {i: table.column("bridge_id").to_pylist().count(i) for i in ids}
    assert per_bridge == {i: summaries[i]["transitions_sent"] for i in ids}
    assert final["transitions_logged"] == sum(per_bridge.values())
    assert final["rejected_messages"] == 0 and final["episodes"] >= 3


def test_sigterm_commits_every_transition_that_was_sent(tmp_path: Path) -> None:
    # chunks of 60 s: nothing is committed before the stop, so the stop itself must commit it
    node = start_node(tmp_path, rate_hz=200, extra=("--chunk-seconds", "60"))
    bridge = start_bridge(node.bind, "--rate-hz", "200")
    wait_for("transitions", lambda: node.status()["transitions_seen"] > 200)
    assert node.status()["transitions_logged"] == 0
    final = node.stop()  # SIGTERM while the bridge streams
    sent = stop_bridge(bridge)["transitions_sent"]
    rows = read_logs([node.log_dir]).table.num_rows  # type: ignore[list-item]
    assert rows == sent == final["transitions_logged"] > 200
    assert final["bridges"][0]["reported_sent"] == sent


def test_bridge_reconnects_after_the_node_restarts(tmp_path: Path) -> None:
    first = start_node(tmp_path, log=False)
    bridge = start_bridge(first.bind, "--rate-hz", "100")
    try:
        wait_for(
            "observations",
            lambda: (b := first.status()["bridges"]) and b[0]["observations"] > 10,
        )
        first.stop()
        second = start_node(tmp_path, log=False, bind=first.bind, admin=first.admin)
        wait_for(
            "the bridge back on the new node",
            lambda: (b := second.status()["bridges"]) and b[0]["observations"] > 10,
        )
        assert second.status()["bridges"][0]["state"] == "live"
        second.stop()
    finally:
        summary = stop_bridge(bridge)
    assert summary["safe_steps"] > 0  # the robot held still (safe action) while no node ran


def test_a_bridge_for_another_robot_is_refused_with_the_reason(node: Node) -> None:
    bridge = start_bridge(node.bind, "--env", "Pendulum-v1")
    _, err = bridge.communicate(timeout=60)
    assert bridge.returncode == 1
    assert "refused" in err and "InvertedPendulum-v5" in err and "Pendulum-v1" in err


def test_status_command(node: Node) -> None:
    out = subprocess.run(
        [*DDPG, "status", "--node", node.admin, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    status = json.loads(out.stdout)
    for key in ("model_id", "rate_hz", "ticks", "deadline_misses", "rejected_messages"):
        assert key in status
    for key in ("safe_actions", "bridges", "latency_us", "transitions_logged", "endpoints", "pid"):
        assert key in status
    assert set(status["latency_us"]) >= {"p50", "p99", "max"}
    text = subprocess.run(
        [*DDPG, "status", "--node", node.admin],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    ).stdout
    assert "2ff52a327c6e434c" in text and "misses" in text


# -- launch -------------------------------------------------------------------------------------
def test_launch_runs_the_loop_end_to_end(tmp_path: Path) -> None:
    launch = write_launch(tmp_path)
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "4", "--summary-json", str(summary_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(summary_path.read_text())
    for key in ("ticks", "deadline_misses", "miss_ratio", "latency_us", "episodes"):
        assert key in summary
    assert summary["model_ids"] == ["2ff52a327c6e434c"] and "mean_return" in summary
    assert summary["ticks"] > 200 and summary["transitions_logged"] == summary["transitions_sent"]
    logs = subprocess.run(
        [*DDPG, "logs", str(tmp_path / "logs"), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert json.loads(logs.stdout)["transitions"] == summary["transitions_logged"] > 100
    assert "transitions logged" in done.stdout
    # the log a real launch wrote is what ddpg retrain learns from
    retrain = [*DDPG, "retrain", "--logs", str(tmp_path / "logs"), "--init", str(PENDULUM.parent)]
    retrain += ["--updates", "20", "--eval-episodes", "0", "--out", str(tmp_path / "re")]
    retrained = subprocess.run(
        [*retrain, "--json", "--no-progress"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert retrained.returncode == 0, retrained.stderr
    assert json.loads(retrained.stdout)["transitions"] >= summary["transitions_logged"]
    assert OnnxPolicy(tmp_path / "re" / "actor.onnx").model_id != "2ff52a327c6e434c"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"node__rate": 100}, "node.rate: unknown key"),
        ({"node__rate_hz": "fast"}, "node.rate_hz = 'fast': expected float"),
        ({"node__model": "missing.onnx"}, "node.model = 'missing.onnx': no such file"),
        ({"bridge__mode": "sometimes"}, "mode = 'sometimes'"),
        ({"node__rate_hz": -5}, "rate_hz = -5.0: must be > 0"),
        ({"extra": 1}, "extra: unknown key"),
    ],
)
def test_a_bad_launch_file_is_refused_naming_the_key(
    tmp_path: Path, changes: dict[str, Any], words: str
) -> None:
    launch = write_launch(tmp_path, **changes)
    done = subprocess.run(
        [*DDPG, "launch", str(launch)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 1
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_launch_file_whose_port_is_in_use_is_refused(tmp_path: Path) -> None:
    ctx = zmq.Context()
    busy = ctx.socket(zmq.ROUTER)
    busy.setsockopt(zmq.LINGER, 0)
    address = free_tcp_endpoint()
    busy.bind(address)
    try:
        launch = write_launch(tmp_path, node__bind=address)
        done = subprocess.run(
            [*DDPG, "launch", str(launch)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and "port is already in use" in done.stderr
    finally:
        busy.close()
        ctx.term()


def test_launch_restarts_a_crashed_bridge(tmp_path: Path) -> None:
    launch = write_launch(tmp_path, bridge__restart="on-failure", bridge__max_restarts=2)
    admin = json.loads(launch.read_text())["node"]["admin"]
    proc = subprocess.Popen(
        [*DDPG, "launch", str(launch), "--json", "--quiet"],  # runs until Ctrl-C
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    STARTED.append(proc)

    def live_pid() -> int | None:
        bridges = request(admin, "status", 1.0)["status"]["bridges"]
        return bridges[0]["pid"] if bridges and bridges[0]["state"] == "live" else None

    # The launcher must be past start-up: a bridge that dies while starting fails the launch
    # (a broken bridge should not be retried at start); the node may already list it as live.
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    watchdog = threading.Timer(60, proc.kill)  # a silent launcher must not block readline
    watchdog.start()
    try:
        while "bridge(s) running" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None, "the launch did not start"
    finally:
        watchdog.cancel()
    first = wait_for("the bridge", live_pid)
    os.kill(first, signal.SIGKILL)
    second = wait_for("a restarted bridge", lambda: (p := live_pid()) != first and p)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the launcher stops everything in order
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["restarts"] == {"sim0": 1} and second != first
    assert "restart 1" in err
