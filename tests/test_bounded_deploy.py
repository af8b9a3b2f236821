"""Deploys are bounded (issue 15, finding 4): only regular files up to a size, a candidate that
does not fit the tick budget or the memory limit is refused with the figures, a loader that
cannot finish in time gives up and frees the slot; the old model serves throughout. The slow
and the huge models are real ONNX files, small on disk (tests/hostile_models.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_models import huge_actor, slow_actor
from loop_helpers import Node, start_bridge, start_node, stop_bridge, wait_for

from control_node.admin import AdminError, request

LIVE = "2ff52a327c6e434c"


def deploy(node: Node, path: Path | str, timeout_s: float = 60.0) -> tuple[dict[str, Any], float]:
    """The node's answer to a deploy (a refusal's text under "error") and how long it took."""
    t0 = time.monotonic()
    try:
        reply = request(node.admin, "deploy", timeout_s, path=str(path))
    except AdminError as e:
        reply = {"ok": False, "error": str(e)}
    return reply, time.monotonic() - t0


def answered(node: Node) -> int:
    return node.status()["bridges"][0]["answered"]


def test_hostile_deploys_are_refused_with_figures_and_the_old_model_serves(
    tmp_path: Path,
) -> None:
    node = start_node(
        tmp_path, rate_hz=100, log=False,
        extra=("--max-model-mb", "1", "--max-model-memory-mb", "200"),
    )  # fmt: skip
    bridge = start_bridge(node.bind, "--rate-hz", "100")
    wait_for("serving", lambda: node.status()["bridges"] and answered(node) > 20)
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(2 * 2**20)  # sparse: 2 MB long, nothing on disk
    slow = slow_actor(tmp_path / "slow.onnx", 40)  # ~170M multiply-adds per observation
    huge = huge_actor(tmp_path / "huge.onnx", 400)  # a 400 MB tensor per observation
    assert max(p.stat().st_size for p in (slow, huge)) < 400_000
    quick = {  # refused before anything is read: at once
        "/dev/zero": "is a character device, not a regular model file",
        fifo: "is a FIFO, not a regular model file",
        big: "2.0 MB, over the limit of 1 MB",
    }
    measured = {
        slow: "batch-1 inference takes",
        huge: "needs a buffer of 400 MB, over the limit of 200 MB (max_model_memory_mb)",
    }
    for path, words in {**quick, **measured}.items():
        before = answered(node)
        reply, took = deploy(node, path)
        assert not reply["ok"] and words in reply["error"], (path, reply)
        if path in quick:
            assert took < 2.0, (path, took)
        wait_for("serving to go on", lambda b=before: answered(node) > b)
        assert node.status()["model_id"] == LIVE
    slow_error = node.status()["deploys"][3]["error"]
    assert "over the budget of 5.00 ms (max_inference_share 0.5 of a 10 ms period)" in slow_error
    # the slot is free after every refusal (the FIFO did not block it): a model that fits goes in
    fits = slow_actor(tmp_path / "fits.onnx", 1, width=256)  # 66k multiply-adds: it fits
    reply, _ = deploy(node, fits)
    assert reply["ok"], reply
    footprint = reply["deploy"]["footprint"]
    assert 0 < footprint["infer_us_p50"] < 5000 and 0 < footprint["peak_mb"] < 200, footprint
    stop_bridge(bridge)
    final = node.stop()
    assert [d["ok"] for d in final["deploys"]] == [False] * 5 + [True]
    assert final["model_ids"] == sorted([LIVE, reply["deploy"]["model_id"]])
    # the old model served throughout: at most a stray miss in all six deploys
    assert sum(d["misses_during_load"] for d in final["deploys"]) <= 2, final["deploys"]


def test_a_deploy_that_cannot_finish_in_time_is_given_up_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path, rate_hz=100, log=False, extra=("--deploy-timeout-s", "4"))
    endless = slow_actor(tmp_path / "endless.onnx", 8000)  # many seconds per observation
    reply, took = deploy(node, endless)
    assert not reply["ok"] and "given up" in reply["error"] and "in 4 s" in reply["error"], reply
    assert took < 8.0, took
    fits = slow_actor(tmp_path / "fits.onnx", 1, width=256)
    reply, _ = deploy(node, fits)
    assert reply["ok"], reply
    node.stop()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_the_policy_loader_refuses_what_is_not_a_regular_file_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    from models.policy import PolicyError, read_model_file

    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "p.fifo"
        os.mkfifo(path)
    t0 = time.monotonic()
    with pytest.raises(PolicyError, match="not a regular model file"):
        read_model_file(path)
    assert time.monotonic() - t0 < 1.0
