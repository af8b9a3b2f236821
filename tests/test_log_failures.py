"""The transition log says when it fails: an unwritable directory is refused at start, a full
disk is reported once and again when it recovers, counted in the summary, and makes ``ddpg
serve`` exit 1 (unless tolerated); a damaged chunk is named and skipped, never read changed.

The probe these pin down (issue 15, finding 6): on a full disk the node committed 48,148 of
87,543 transitions with no line on stderr and exit 0; a read-only log dir was accepted (0 of
30,148 logged, exit 0); of 200 single-bit flips in a committed chunk 121 read back changed with
no warning. Full and read-only disks are real: small tmpfs mounts (skipped where mounting is not
permitted), unmounted after each test."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from loop_helpers import (
    DDPG,
    ENV,
    PENDULUM,
    start_bridge,
    start_node,
    stop_bridge,
    wait_for,
    write_launch,
)

from control_node.config import free_tcp_endpoint, load_launch
from control_node.launch import render, summarize
from control_node.translog.reader import read_logs
from control_node.translog.schema import LogError, LogSpec, Transition
from control_node.translog.writer import TransitionLog
from training.logged_data import load_transitions

SPEC = LogSpec("Pendulum-v1", (64,), "float32", (-2.0,), (2.0,))  # wide rows: a disk fills fast


def row(i: int) -> Transition:
    obs = np.full(64, i, dtype=np.float32) + np.arange(64, dtype=np.float32)
    return Transition("b0", "s0", i // 50, i % 50, obs, np.array([i / 1e4], np.float32), -float(i),
                      obs + 1, False, i % 50 == 49, "m1", False, i, i, i, i)  # fmt: skip


def mount_tmpfs(where: Path, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system, unmounted after the test whatever happens."""
    where = tmp_path / "disk"
    mount_tmpfs(where, "size=1m")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only file system (permissions alone do not stop root), unmounted afterwards."""
    where = tmp_path / "ro"
    mount_tmpfs(where, "size=1m", "ro")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def fill(disk: Path, leave_kib: int) -> None:
    """Fill ``disk`` up to ``leave_kib`` KiB free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave_kib * 1024))


def test_an_unwritable_log_dir_is_refused_at_start(read_only_dir: Path) -> None:
    with pytest.raises(LogError, match="cannot write a log chunk there"):
        TransitionLog(read_only_dir / "logs", SPEC)
    with pytest.raises(LogError, match=r"Read-only file system"):
        TransitionLog(read_only_dir, SPEC)


def test_ddpg_serve_and_launch_refuse_a_read_only_log_dir_in_one_line(
    read_only_dir: Path, tmp_path: Path
) -> None:
    serve = subprocess.run(
        [*DDPG, "serve", "--model", str(PENDULUM), "--bind", free_tcp_endpoint(), "--admin",
         free_tcp_endpoint(), "--log-dir", str(read_only_dir), "--duration", "5"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert serve.returncode == 1
    lines = serve.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write a log chunk there" in lines[0], serve.stderr
    launch = tmp_path / "launch.yaml"
    launch.write_text(json.dumps({"node": {"model": str(PENDULUM), "log_dir": str(read_only_dir),
                                           "bind": free_tcp_endpoint(),
                                           "admin": free_tcp_endpoint()}}))  # fmt: skip
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "5"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        f"ddpg launch: error: {launch}: node.log_dir: {read_only_dir}: cannot write a log chunk "
        "there (Read-only file system)"
    ), done.stderr


def test_a_full_disk_is_reported_once_and_again_when_it_recovers(small_disk: Path) -> None:
    lines: list[str] = []
    log = TransitionLog(small_disk, SPEC, fsync=False, retry_seconds=0.05, report=lines.append)
    try:
        fill(small_disk, leave_kib=8)
        for i in range(2_000):  # about 600 kB of chunks: far more than the 8 KiB left
            log.append(row(i))
        assert not log.flush(timeout=10)
        wait_for("three failed attempts", lambda: log.write_errors >= 3)  # retried, still failing
        assert log.failing and len(lines) == 1, lines
        assert lines[0].startswith(f"log: cannot write a chunk of 2000 transitions to {small_disk}")
        assert "No space left on device" in lines[0] and "retrying every 0.05 s" in lines[0]
        (small_disk / "filler").unlink()  # space again
        wait_for("the backlog written", lambda: not log.failing and log.backlog_rows == 0)
        assert len(lines) == 2, lines
        assert lines[1].startswith(f"log: writing to {small_disk} again after ")
        assert lines[1].endswith("; 0 transitions lost so far")
    finally:
        kept_all = log.close()
    assert kept_all  # nothing was lost: the backlog waited in memory
    got = read_logs([small_disk]).table.column("action_seq").to_pylist()
    assert got == list(range(2_000))


def test_ddpg_serve_on_a_full_disk_reports_and_exits_non_zero(small_disk: Path) -> None:
    results = {}
    for tolerate in ("false", "true"):
        fill(small_disk, leave_kib=16)  # the start-up probe fits; chunks of a second do not
        node = start_node(
            small_disk.parent,
            rate_hz=200,
            log=False,
            extra=("--log-dir", str(small_disk / tolerate), "--tolerate-log-errors", tolerate),
        )
        bridge = start_bridge(node.bind, "--rate-hz", "200")
        wait_for("a failed chunk", lambda: node.status()["log"]["write_errors"] >= 2, 30)  # noqa: B023
        stop_bridge(bridge)
        node.proc.send_signal(signal.SIGTERM)
        out, err = node.proc.communicate(timeout=60)
        results[tolerate] = (node.proc.returncode, json.loads(out), err)
        (small_disk / "filler").unlink()
    for tolerate, (code, final, err) in results.items():
        log = final["log"]
        assert log["write_errors"] >= 2 and log["dropped"] > 0 and log["committed"] == 0, log
        failing = [line for line in err.splitlines() if line.startswith("node: log: cannot")]
        assert len(failing) == 1, err  # once, however many retries failed
        assert "No space left on device" in failing[0]
        if tolerate == "false":
            assert code == 1 and "ddpg serve: error: the transition log failed" in err, err
        else:
            assert code == 0, err


def damaged_copies(chunk: Path, out: Path, flips: int, seed: int = 0) -> list[Path]:
    """``flips`` copies of ``chunk``, each with one bit flipped at a random place."""
    data = chunk.read_bytes()
    rng = random.Random(seed)
    copies = []
    for k in range(flips):
        b = bytearray(data)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        d = out / f"flip{k}"
        d.mkdir()
        (d / chunk.name).write_bytes(bytes(b))
        copies.append(d)
    return copies


def test_a_bit_flip_in_a_chunk_is_never_read_back_changed(tmp_path: Path) -> None:
    d = tmp_path / "log"
    with TransitionLog(d, SPEC, fsync=False) as log:
        for i in range(500):
            log.append(row(i))
    (chunk,) = sorted(d.glob("chunk-*.parquet"))
    good = read_logs([d]).table
    changed, named = 0, 0
    for copy in damaged_copies(chunk, tmp_path, flips=200):
        warnings: list[str] = []
        got = read_logs([copy], warn=warnings.append)
        if got.unreadable:
            assert [p for p, _ in got.unreadable] == [copy / chunk.name]
            assert len(warnings) == 1 and str(copy / chunk.name) in warnings[0]
            named += 1
        elif not got.table.equals(good):
            changed += 1
    assert changed == 0
    assert named >= 150  # nearly every flip lands in a checksummed page or the spec's digest


def test_ddpg_logs_and_retrain_name_a_damaged_chunk_and_skip_it(tmp_path: Path) -> None:
    d = tmp_path / "log"
    for part in range(3):  # three chunks, the middle one damaged
        with TransitionLog(d, SPEC, fsync=False) as log:
            for i in range(100 * part, 100 * part + 100):
                log.append(row(i))
    chunks = sorted(d.glob("chunk-*.parquet"))
    data = bytearray(chunks[1].read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the column pages
    chunks[1].write_bytes(bytes(data))
    done = subprocess.run(
        [*DDPG, "logs", str(d), "--json"], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["transitions"] == 200 and summary["unreadable"][0]["path"] == str(chunks[1])
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith(f"ddpg logs: warning: {chunks[1]}: unreadable chunk, skipped")
    warnings: list[str] = []
    loaded = load_transitions([d], warn=warnings.append)  # what ddpg retrain trains on
    assert len(loaded.obs) == 200 and loaded.unreadable[0].startswith(str(chunks[1]))
    assert any(str(chunks[1]) in w for w in warnings)
    assert sorted(loaded.obs[:, 0].astype(int).tolist()) == [*range(100), *range(200, 300)]


def test_the_launch_summary_says_the_log_failed_and_the_launch_fails(tmp_path: Path) -> None:
    cfg = load_launch(write_launch(tmp_path), check_ports=False)
    node = {"ticks": 500, "transitions_logged": 40,
            "log": {"write_errors": 3, "dropped": 120, "last_error": "No space left on device"}}  # fmt: skip
    summary = summarize(cfg, node, [], [], 5.0, None)
    assert not summary["ok"] and summary["error"] is None
    assert (summary["log_write_errors"], summary["transitions_lost"]) == (3, 120)
    assert "LOG FAILED: 3 write errors, 120 transitions lost (last: No space" in render(summary)
    cfg.node.tolerate_log_errors = True  # told to tolerate it: ok, and still said
    tolerated = summarize(cfg, node, [], [], 5.0, None)
    assert tolerated["ok"] and "LOG FAILED" in render(tolerated)
    node["log"] = {"write_errors": 0, "dropped": 0, "last_error": ""}
    assert "LOG FAILED" not in render(summarize(cfg, node, [], [], 5.0, None))
