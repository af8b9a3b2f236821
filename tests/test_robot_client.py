"""The robot client library against a real node process: hello with the robot's spec, actions
with their sequence and model id, what reaches the log, the watchdog's safe action, a node
killed and restarted, and every error path (a spec the node refuses, no node, a node gone,
calls out of order)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loop_helpers import PENDULUM, ROOT, start_bridge, start_node

from control_node.config import free_tcp_endpoint
from control_node.translog.reader import action_array, obs_array, read_logs
from models.policy import OnnxPolicy
from models.spec import RobotSpec
from sim_bridge.client import (
    Action,
    NodeUnavailable,
    RefusedError,
    RobotClient,
    Stopped,
    UsageError,
)

PENDULUM_SPEC = RobotSpec("InvertedPendulum-v5", (4,), [-3.0], [3.0])
SAFE = 0.25


def _obs(i: int) -> np.ndarray:
    """A made-up sensor reading, different every step and exactly representable."""
    return np.array([0.01 * i, -0.02 * i, 0.5, 0.125 * (i % 3)], np.float32)


OPEN: list[RobotClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """A failed test must not leave a client's socket open (its context would block exit)."""
    yield
    while OPEN:
        OPEN.pop().close()


def _client(node: str, mode: str = "lockstep", **kw: Any) -> RobotClient:
    client = RobotClient(PENDULUM_SPEC, node=node, bridge_id="arm0", mode=mode, log=_quiet, **kw)
    OPEN.append(client)
    return client


def _quiet(_line: str) -> None:
    pass


def test_the_client_imports_no_simulator_nor_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gymnasium', 'mujoco', 'torch'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from models.spec import RobotSpec\n"
        "from sim_bridge.client import RobotClient\n"
        "c = RobotClient(RobotSpec('X-v0', (3,), [-1.0], [1.0]), bridge_id='r', rate_hz=50)\n"
        "c.close()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_lockstep_actions_are_the_models_and_the_log_holds_what_the_robot_sent(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path)
    policy = OnnxPolicy(PENDULUM)
    client = _client(node.bind)
    welcome = client.connect(timeout_s=10)
    assert welcome.model_id == node.status()["model_id"] == policy.model_id
    np.testing.assert_array_equal(welcome.safe_action, [0.0])
    rewards = [1.0, 0.5, -2.0, 3.0]
    sent_actions = []
    client.begin_episode(_obs(0))
    for i, reward in enumerate(rewards):
        answer = client.answer(timeout_s=5)
        assert (answer.seq, answer.episode, answer.step) == (i + 1, 0, i)
        assert answer.model_id == policy.model_id and not answer.safe
        np.testing.assert_allclose(answer.action, policy(_obs(i)), atol=1e-6)
        applied = np.clip(answer.action * 0.5, -3, 3).astype(np.float32)  # the robot's own
        sent_actions.append(applied)
        client.send_step(_obs(i + 1), reward, i == len(rewards) - 1, False, answer, applied)
    assert client.episode == 1 and client.transitions_sent == len(rewards)
    client.close()
    final = node.stop()
    assert final["episodes"] == 1 and final["transitions_logged"] == len(rewards)
    (bridge,) = final["bridges"]
    assert bridge["state"] == "gone" and bridge["reported_sent"] == len(rewards)

    log = read_logs([node.log_dir])
    t, spec = log.table, log.spec
    assert spec is not None and t.num_rows == len(rewards)
    np.testing.assert_array_equal(obs_array(t, "obs", spec), [_obs(i) for i in range(4)])
    np.testing.assert_array_equal(obs_array(t, "next_obs", spec), [_obs(i) for i in range(1, 5)])
    np.testing.assert_array_equal(action_array(t, "action", spec), sent_actions)
    assert t.column("reward").to_pylist() == rewards
    assert t.column("action_seq").to_pylist() == [1, 2, 3, 4]
    assert t.column("model_id").to_pylist() == [policy.model_id] * 4
    assert t.column("terminated").to_pylist() == [False, False, False, True]
    assert set(t.column("bridge_id").to_pylist()) == {"arm0"}
    assert set(t.column("bridge_session").to_pylist()) == {client.session}


def test_a_spec_the_model_does_not_take_is_refused_with_its_code(tmp_path: Path) -> None:
    node = start_node(tmp_path, log=False)
    wrong = RobotSpec("InvertedPendulum-v5", (5,), [-3.0], [3.0])
    client = RobotClient(wrong, node=node.bind, mode="lockstep", log=_quiet)
    OPEN.append(client)
    with pytest.raises(RefusedError, match="obs") as refused:
        client.connect(timeout_s=10)
    assert refused.value.code == "spec_mismatch"
    assert "5" in refused.value.reason and "4" in refused.value.reason
    assert not client.connected
    client.close()
    assert node.stop()["rejected_by_code"] == {"spec_mismatch": 1}


def test_no_node_is_node_unavailable_after_the_timeout() -> None:
    client = _client(free_tcp_endpoint())
    t0 = time.monotonic()
    with pytest.raises(NodeUnavailable, match=r"within 0\.3 s"):
        client.connect(timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    client.close()


def test_a_node_gone_mid_episode_is_node_unavailable_after_resending(tmp_path: Path) -> None:
    node = start_node(tmp_path, log=False)
    client = _client(node.bind, watchdog_ms=50)
    client.connect(timeout_s=10)
    client.begin_episode(_obs(0))
    first = client.answer(timeout_s=5)
    node.proc.kill()
    node.proc.communicate()
    client.send_step(_obs(1), 1.0, False, False, first)
    with pytest.raises(NodeUnavailable, match="no answer"):
        client.answer(timeout_s=0.5)
    assert client.errors["timeout"] >= 2  # the watchdog ran out, and it tried again
    client.close()


def test_the_client_reconnects_to_a_restarted_node_and_takes_its_numbering(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path / "a", log=False)
    client = _client(node.bind, watchdog_ms=100)
    first_pid = client.connect(timeout_s=10).pid
    client.begin_episode(_obs(0))
    for i in range(3):
        answer = client.answer(timeout_s=5)
        client.send_step(_obs(i + 1), 1.0, False, False, answer)
    assert answer.seq == 3
    node.proc.send_signal(signal.SIGKILL)
    node.proc.communicate()
    again = start_node(tmp_path / "b", log=False, bind=node.bind)
    answer = client.answer(timeout_s=20)  # re-announces and resends the step the old one lost
    assert client.welcome is not None and client.welcome.pid == again.proc.pid != first_pid
    assert (answer.seq, answer.episode, answer.step) == (1, 0, 3)  # a new node counts from 1
    assert client.errors["timeout"] >= 1
    client.send_step(_obs(4), 1.0, False, False, answer)
    assert client.answer(timeout_s=5).seq == 2
    client.close()
    (bridge,) = again.stop()["bridges"]
    assert bridge["transitions"] == 1 and bridge["state"] == "gone"


def test_a_realtime_robot_runs_on_through_a_node_restart_and_takes_the_new_nodes_actions(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path / "a", log=False, rate_hz=100)
    client = _client(node.bind, mode="realtime", rate_hz=50, watchdog_ms=60)
    first_pid = client.connect(timeout_s=10).pid
    period = 20_000_000
    seen: list[Action] = []
    next_t = time.monotonic_ns() + period

    def step(i: int) -> None:
        nonlocal next_t
        client.poll(next_t)
        cmd = client.command()
        seen.append(cmd)
        client.send_step(_obs(i + 1), 1.0, False, False, cmd)
        next_t += period

    client.begin_episode(_obs(0))
    for i in range(20):
        step(i)
    assert seen[-1].seq > 0
    node.proc.kill()
    node.proc.communicate()
    for i in range(20, 40):  # no node: the robot goes on, on the safe action
        step(i)
    assert all(c.safe and c.seq == -1 for c in seen[-10:])
    again = start_node(tmp_path / "b", log=False, rate_hz=100, bind=node.bind)
    i = 40
    deadline = time.monotonic() + 20
    while not (client.welcome.pid == again.proc.pid and seen[-1].seq > 0):  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the robot never took the new node's actions"
        step(i)
        i += 1
    assert first_pid != again.proc.pid and seen[-1].model_id == again.status()["model_id"]
    assert seen[-1].seq < 20  # the new node's numbering, from 1
    client.close()
    (bridge,) = again.stop()["bridges"]
    assert bridge["transitions"] > 0 and bridge["gaps"] >= 1


def test_realtime_holds_an_action_for_the_watchdog_then_applies_the_nodes_safe_action(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path, rate_hz=200, extra=("--safe-action", str(SAFE)))
    client = _client(node.bind, mode="realtime", rate_hz=50, watchdog_ms=60)
    client.connect(timeout_s=10)
    period = 20_000_000
    commands: list[tuple[Action, int]] = []  # (what command() gave, its age when given)

    def run(steps: int, start: int) -> None:
        next_t = time.monotonic_ns() + period
        for i in range(start, start + steps):
            client.poll(next_t)
            cmd = client.command()
            commands.append((cmd, time.monotonic_ns() - client.newest.t_recv_ns))
            client.send_step(_obs(i + 1), 1.0, False, False, cmd)
            next_t += period

    client.begin_episode(_obs(0))
    run(25, 0)
    live = [c for c, _ in commands[5:]]
    assert all(c.seq > 0 and c.model_id == client.model_id for c in live), live
    os.kill(node.proc.pid, signal.SIGSTOP)  # the node falls silent: no more actions
    try:
        mark = len(commands)
        run(20, 25)
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    silent = commands[mark:]
    held = [c for c, _ in silent if not c.safe]
    safe = [c for c, _ in silent if c.safe]
    kinds = [c.safe for c, _ in silent]
    assert kinds == sorted(kinds)  # held first, then safe
    assert all(age <= 60e6 for c, age in silent if not c.safe)  # held only for the watchdog
    assert len(held) <= 4 and len(safe) >= 15
    assert all(c.seq == -1 and c.action.tolist() == [SAFE] for c in safe)
    run(25, 45)  # the node answers again
    assert all(c.seq > live[-1].seq for c, _ in commands[-10:])
    client.close()
    node.stop()
    t = read_logs([node.log_dir]).table
    rows = t.to_pydict()
    # what the robot applied is what the node logged (the stall's burst may be rate-limited)
    applied_safe = [i for i, s in enumerate(rows["action_seq"]) if s == -1]
    assert applied_safe
    assert all(rows["safe_action"][i] and rows["action"][i] == [SAFE] for i in applied_safe)


def test_calls_out_of_order_and_bad_arguments_are_refused_with_their_reason() -> None:
    with pytest.raises(ValueError, match="rate_hz"):
        RobotClient(PENDULUM_SPEC, mode="realtime")
    with pytest.raises(ValueError, match="mode = 'fast'"):
        RobotClient(PENDULUM_SPEC, mode="fast")
    with pytest.raises(ValueError, match="bridge_id"):
        RobotClient(PENDULUM_SPEC, bridge_id="arm 0", mode="lockstep")
    with pytest.raises(ValueError, match="node = 'nowhere'"):
        RobotClient(PENDULUM_SPEC, node="nowhere", mode="lockstep")
    client = _client(free_tcp_endpoint())
    with pytest.raises(UsageError, match="before begin_episode"):
        client.send_step(_obs(1), 0.0, False, False, client.safe)
    with pytest.raises(ValueError, match=r"observation shape \(3,\)"):
        client.begin_episode(np.zeros(3, np.float32))
    client.begin_episode(_obs(0))
    with pytest.raises(ValueError, match=r"applied action shape \(2,\)"):
        client.send_step(_obs(1), 0.0, False, False, client.safe, np.zeros(2, np.float32))
    client.close()
    with pytest.raises(UsageError, match="closed"):
        client.begin_episode(_obs(0))


def test_request_stop_ends_a_wait_with_stopped() -> None:
    client = _client(free_tcp_endpoint())
    stop = threading.Timer(0.2, client.request_stop)  # as a signal handler would
    stop.start()
    t0 = time.monotonic()
    with pytest.raises(Stopped, match="stopped before a node welcomed it"):
        client.connect()  # no timeout: only the stop ends it
    stop.join()
    assert 0.2 <= time.monotonic() - t0 < 2.0
    with pytest.raises(Stopped, match="stopped waiting for an answer"):
        client.begin_episode(_obs(0))
        client.answer()


def test_the_mujoco_bridge_stops_on_the_clients_refusal_with_one_line(tmp_path: Path) -> None:
    node = start_node(tmp_path, log=False)
    bridge = start_bridge(node.bind, "--env", "HalfCheetah-v5", "--mode", "lockstep")
    _, err = bridge.communicate(timeout=60)
    assert bridge.returncode == 1
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("ddpg bridge: error: node refused robot sim0 (spec_mismatch): ")
        and "HalfCheetah-v5" in last
    ), err
    node.stop()
