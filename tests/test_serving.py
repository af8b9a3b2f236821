"""Serving in-process: the batch path's safety (non-finite observations and outputs, clipping),
what is remembered of each action sent, and the order the transition log is fed in."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_node import protocol as P
from control_node.node.bridges import SENT_KEPT, BridgeState
from control_node.node.serving import Server
from control_node.translog.schema import Transition
from models.policy import OnnxPolicy

CHEETAH = Path(__file__).resolve().parents[1] / "models" / "zoo" / "halfcheetah" / "actor.onnx"


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []

    def send(self, identity: bytes, frames: list[Any]) -> bool:
        self.sent.append((identity, [bytes(f) for f in frames]))
        return True


@pytest.fixture(scope="module")
def policy() -> OnnxPolicy:
    return OnnxPolicy(CHEETAH)


def _serve(policy: OnnxPolicy, n: int) -> tuple[Server, FakeLink, list[BridgeState]]:
    link = FakeLink()
    safe = np.full(policy.act_dim, 0.5, np.float32)
    server = Server(policy, safe, link, collections.Counter())  # type: ignore[arg-type]
    bridges = [BridgeState(f"b{i}", b"id%d" % i, "s", "realtime", 1000.0, 1, 0) for i in range(n)]
    return server, link, bridges


def _obs(obs: np.ndarray, step: int) -> P.Message:
    fields = {"episode": 2, "step": step, "t_obs_ns": 100 + step}
    return P.Message(P.OBS, fields, {"obs": obs})


def test_batch_answers_match_the_policy_and_bad_rows_get_the_safe_action(
    policy: OnnxPolicy,
) -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 17)).astype(np.float32) * 3
    obs[1, 4] = np.nan
    server, link, bridges = _serve(policy, 3)
    server.answer(bridges, [_obs(o, i) for i, o in enumerate(obs)], [10, 20, 30])
    expected = np.clip(policy(obs[[0, 2]]), policy.metadata.act_low, policy.metadata.act_high)
    replies = [P.decode(frames) for _, frames in link.sent]
    assert [identity for identity, _ in link.sent] == [b"id0", b"id1", b"id2"]
    np.testing.assert_array_equal(replies[0].arrays["action"], expected[0])
    np.testing.assert_array_equal(replies[2].arrays["action"], expected[1])
    assert (
        replies[1]["safe"]
        and replies[1]["note"]
        and replies[1].arrays["action"].tolist() == [0.5] * 6
    )
    assert not replies[0]["safe"] and "note" not in replies[0].fields
    assert server.non_finite_obs == 1 and server.safe_actions == 1
    assert server.rejected["non_finite"] == 1
    assert [r["t_recv_ns"] for r in replies] == [10, 20, 30] and replies[2]["step"] == 2
    assert [b.sent[1].safe for b in bridges] == [False, True, False]


def test_a_non_finite_output_gets_the_safe_action(policy: OnnxPolicy) -> None:
    server, link, bridges = _serve(policy, 1)
    batch = server._one
    run = batch.run

    def broken() -> None:
        run()
        batch.act[0, 3] = np.inf

    batch.run = broken
    try:
        server.answer(bridges, [_obs(np.zeros(17, np.float32), 0)], [1])
    finally:
        batch.run = run
    reply = P.decode(link.sent[0][1])
    assert reply["safe"] and reply.arrays["action"].tolist() == [0.5] * 6
    assert server.non_finite_obs == 0 and server.safe_actions == 1


def test_actions_are_clipped_and_sent_actions_kept_for_labels(policy: OnnxPolicy) -> None:
    server, link, (b,) = _serve(policy, 1)
    server.act_low = np.full(6, -0.01, np.float32)  # bounds tighter than the model's output
    server.act_high = np.full(6, 0.01, np.float32)
    obs = np.linspace(-2, 2, 17).astype(np.float32)
    for step in range(SENT_KEPT + 10):
        server.answer([b], [_obs(obs, step)], [step])
    action = P.decode(link.sent[-1][1]).arrays["action"]
    np.testing.assert_array_equal(action, np.clip(policy(obs), -0.01, 0.01))
    assert b.seq == b.answered == SENT_KEPT + 10 and len(b.sent) == SENT_KEPT
    assert b.sent[b.seq].step == SENT_KEPT + 9 and min(b.sent) == b.seq - SENT_KEPT + 1


def test_transition_fields_are_in_the_order_sessions_passes_them() -> None:
    """sessions._log_transition builds a Transition positionally (keywords cost 3x)."""
    assert [f.name for f in dataclasses.fields(Transition)] == [
        "bridge_id", "bridge_session", "episode", "step", "obs", "action", "reward", "next_obs",
        "terminated", "truncated", "model_id", "safe_action", "action_seq", "t_obs_ns",
        "t_action_ns", "t_next_obs_ns", "shadow_model_id", "shadow_action",
    ]  # fmt: skip
