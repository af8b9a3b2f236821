"""The transition log on real files and real processes: round trips, time-based commits, a
writer killed with SIGKILL, restarts on the same directory, refused spec mixes, write errors, and
``ddpg logs`` as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from control_node.translog.reader import LogContents, action_array, obs_array, read_logs
from control_node.translog.schema import SCHEMA_VERSION, LogError, LogSpec, Transition
from control_node.translog.summary import summarize
from control_node.translog.writer import TransitionLog

ROOT = Path(__file__).resolve().parents[1]
SPEC = LogSpec("Pendulum-v1", (3,), "float32", (-2.0,), (2.0,))
EPISODE = 10


def make(
    i: int,
    *,
    bridge: str = "b0",
    session: str = "s0",
    model: str = "m1",
    episode: int | None = None,
    step: int | None = None,
    reward: float | None = None,
    safe: bool | None = None,
) -> Transition:
    """Transition number i, every field derived from i so a read-back can be checked exactly."""
    step = i % EPISODE if step is None else step
    obs = np.array([i, i + 0.25, -i], dtype=np.float32)
    return Transition(
        bridge_id=bridge,
        bridge_session=session,
        episode=i // EPISODE if episode is None else episode,
        step=step,
        obs=obs,
        action=np.array([i / 1000], dtype=np.float32),
        reward=-float(i) if reward is None else reward,
        next_obs=obs + 1,
        terminated=False,
        truncated=step == EPISODE - 1,
        model_id=model,
        safe_action=i % 7 == 0 if safe is None else safe,
        action_seq=i,
        t_obs_ns=1_000 * i,
        t_action_ns=1_000 * i + 10,
        t_next_obs_ns=1_000 * i + 1_000,
        shadow_model_id="cand" if i % 3 == 0 else "",
        shadow_action=np.array([-i / 1000], dtype=np.float32) if i % 3 == 0 else None,
    )


def chunk_files(d: Path) -> list[Path]:
    return sorted(d.glob("chunk-*.parquet"))


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll until predicate() is true; fail at the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def ddpg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_node", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_round_trip_across_chunks(tmp_path: Path) -> None:
    d = tmp_path / "new" / "log"  # created, parents included
    n = 250
    log = TransitionLog(d, SPEC, chunk_rows=40)
    rows = [make(i) for i in range(n)]
    for t in rows:
        log.append(t)
    assert log.close() and log.close()  # idempotent
    assert log.transitions_appended == log.transitions_committed == n
    assert log.chunks_committed == 7 and log.write_errors == 0 and log.last_error == ""
    files = chunk_files(d)
    assert len(files) == 7 and log.bytes_committed == sum(f.stat().st_size for f in files)
    assert not list(d.glob(".tmp-*"))

    warnings: list[str] = []
    got = read_logs([d], warn=warnings.append)
    assert warnings == [] and got.spec == SPEC and got.chunks == files
    t = got.table
    assert t.num_rows == n and max(pq.read_metadata(f).num_rows for f in files) == 40
    np.testing.assert_array_equal(obs_array(t, "obs", SPEC), np.stack([r.obs for r in rows]))
    np.testing.assert_array_equal(
        obs_array(t, "next_obs", SPEC), np.stack([r.obs + 1 for r in rows])
    )
    np.testing.assert_array_equal(
        action_array(t, "action", SPEC), np.stack([r.action for r in rows])
    )
    shadow = action_array(t, "shadow_action", SPEC)
    has = np.arange(n) % 3 == 0
    expect_shadow = np.stack([r.shadow_action for r in rows if r.shadow_action is not None])
    np.testing.assert_array_equal(shadow[has], expect_shadow)
    assert np.isnan(shadow[~has]).all() and t.column("shadow_action").null_count == (~has).sum()
    expect = {
        name: [getattr(r, name) for r in rows]
        for name in (
            "bridge_id",
            "bridge_session",
            "episode",
            "step",
            "reward",
            "terminated",
            "truncated",
            "model_id",
            "safe_action",
            "action_seq",
            "t_obs_ns",
            "t_action_ns",
            "t_next_obs_ns",
            "shadow_model_id",
        )
    }
    for name, values in expect.items():
        assert t.column(name).to_pylist() == values, name
    logged = np.asarray(t.column("t_logged_ns"))
    assert (np.diff(logged) >= 0).all() and logged[0] > 0

    schema = pq.read_schema(files[0])
    meta = {k.decode(): json.loads(v) for k, v in schema.metadata.items() if k.startswith(b"ddpg.")}
    assert meta == {
        "ddpg.schema_version": SCHEMA_VERSION,
        "ddpg.env_id": "Pendulum-v1",
        "ddpg.obs_shape": [3],
        "ddpg.obs_dtype": "float32",
        "ddpg.act_low": [-2.0],
        "ddpg.act_high": [2.0],
        "ddpg.writer_pid": os.getpid(),
        "ddpg.spec_sha256": meta["ddpg.spec_sha256"],  # checked by the reader: test_log_failures
    }
    assert len(meta["ddpg.spec_sha256"]) == 64
    assert schema.field("obs").type == pa.list_(pa.float32(), 3)
    assert schema.field("shadow_action").type == pa.list_(pa.float32(), 1)
    assert schema.field("t_logged_ns").type == pa.int64()

    frame = pd.read_parquet(files[1])  # no project code
    assert len(frame) == 40 and list(frame.columns) == t.column_names
    assert frame["action_seq"].tolist() == list(range(40, 80))
    np.testing.assert_array_equal(
        np.stack(frame["obs"].to_numpy()), np.stack([r.obs for r in rows[40:80]])
    )


def test_pixel_observations_keep_their_shape_and_dtype(tmp_path: Path) -> None:
    spec = LogSpec("CarRacing-v3", (2, 4, 4), "uint8", (-1.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    frames = np.arange(5 * 32, dtype=np.uint8).reshape(5, 2, 4, 4)
    with TransitionLog(tmp_path, spec, fsync=False) as log:
        for i, frame in enumerate(frames):
            t = make(i)
            t.obs, t.next_obs, t.action, t.shadow_action = (
                frame,
                frame,
                np.zeros(3, np.float32),
                None,
            )
            log.append(t)
    got = read_logs([tmp_path])
    assert got.spec == spec and got.table.schema.field("obs").type == pa.list_(pa.uint8(), 32)
    back = obs_array(got.table, "obs", spec)
    assert back.dtype == np.uint8 and back.shape == (5, 2, 4, 4)
    np.testing.assert_array_equal(back, frames)


def test_chunk_commits_by_age_without_flush(tmp_path: Path) -> None:
    log = TransitionLog(tmp_path, SPEC, chunk_seconds=0.2, fsync=False)
    try:
        for i in range(5):
            log.append(make(i))
        wait_for(lambda: chunk_files(tmp_path))
        assert read_logs([tmp_path]).table.num_rows == 5
        assert log.transitions_committed == 5 and log.chunks_committed == 1
    finally:
        log.close()


# Appends about 2,000 rows/s with the writer's defaults (1 s chunks); one flush at 500 rows
# prints the committed count, then chunks commit on their own.
CHILD = """
import sys, time
import numpy as np
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog

spec = LogSpec("Pendulum-v1", (3,), "float32", (-2.0,), (2.0,))
log = TransitionLog(sys.argv[1], spec)
i = 0
while True:
    obs = np.full(3, i, dtype=np.float32)
    now = time.monotonic_ns()
    log.append(Transition("b0", "s0", i // 50, i % 50, obs, np.zeros(1, np.float32),
                          1.0, obs + 1, False, i % 50 == 49, "m1", False, i, now, now, now))
    i += 1
    if i % 2 == 0:
        time.sleep(0.001)
    if i == 500:
        assert log.flush()
        print(log.transitions_committed, flush=True)
"""


def test_sigkill_loses_at_most_the_open_chunk(tmp_path: Path) -> None:
    d = tmp_path / "log"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(d)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(30, child.kill)  # also ends a readline that would block
    watchdog.start()
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the writer process died before committing"
        committed = int(line)
        assert committed == 500
        # Kill once chunks are committing on their own: mid-append, mid-chunk, maybe mid-write.
        chunks_then = len(chunk_files(d))
        wait_for(lambda: len(chunk_files(d)) >= chunks_then + 3)
        killed_ns = time.monotonic_ns()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.kill()

    got = read_logs([d])
    seq = np.asarray(got.table.column("action_seq"))
    n = len(seq)
    assert n > committed and got.unreadable == []
    # lost: only the open chunk, rows appended in the last chunk_seconds (1 s, the default),
    # plus the writer's poll (50 ms) and one write
    open_s = (killed_ns - int(np.asarray(got.table.column("t_obs_ns")).max())) / 1e9
    assert 0 <= open_s <= 1.0 + 0.5, open_s
    np.testing.assert_array_equal(seq, np.arange(n))  # a prefix, no gaps, no torn chunk
    np.testing.assert_array_equal(obs_array(got.table, "obs", SPEC)[:, 0], np.arange(n))
    np.testing.assert_array_equal(obs_array(got.table, "next_obs", SPEC)[:, 2], np.arange(n) + 1)

    # What a crash can leave: a temp file, and (on a bad disk) a torn chunk. Reported, not fatal.
    leftover = d / f".tmp-{child.pid}-7.parquet"
    leftover.write_bytes(b"PAR1 half a chunk")
    torn = d / "chunk-99991231T235959.999999-1-000001.parquet"
    torn.write_bytes(got.chunks[0].read_bytes()[:300])
    temps = sorted(d.glob(".tmp-*"))  # ours, and the killed writer's own if it was mid-write
    warnings: list[str] = []
    again = read_logs([d], warn=warnings.append)
    assert again.table.num_rows == n and again.leftovers == temps and leftover in temps
    assert [p for p, _ in again.unreadable] == [torn] and again.unreadable[0][1]
    assert len(warnings) == len(temps) + 1 and all("\n" not in w for w in warnings)
    assert any(str(leftover) in w for w in warnings) and any(str(torn) in w for w in warnings)

    result = ddpg("logs", str(d), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["transitions"] == n and summary["leftovers"] == [str(p) for p in temps]
    assert summary["unreadable"][0]["path"] == str(torn)
    assert result.stderr.count("ddpg logs: warning: ") == len(temps) + 1

    # A restarted node appends to the crashed log (the torn chunk does not stop it).
    with TransitionLog(d, SPEC, fsync=False) as log:
        log.append(make(0))
    assert read_logs([d]).table.num_rows == n + 1


def test_restart_adds_chunks_and_never_touches_old_ones(tmp_path: Path) -> None:
    with TransitionLog(tmp_path, SPEC, chunk_rows=10) as log:
        for i in range(30):
            log.append(make(i))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunk_files(tmp_path)}
    assert len(before) == 3

    # Two writers at once on the same directory, as two nodes sharing it.
    a = TransitionLog(tmp_path, SPEC, chunk_rows=10, fsync=False)
    b = TransitionLog(tmp_path, SPEC, chunk_rows=10, fsync=False)
    for i in range(30, 60):
        (a if i % 2 else b).append(make(i))
    assert a.close() and b.close()

    files = chunk_files(tmp_path)
    assert len(files) == len(set(files)) == 3 + a.chunks_committed + b.chunks_committed
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    got = read_logs([tmp_path])
    assert sorted(got.table.column("action_seq").to_pylist()) == list(range(60))
    assert got.table.column("action_seq").to_pylist()[:30] == list(range(30))


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (LogSpec("HalfCheetah-v5", (3,), "float32", (-2.0,), (2.0,)), "env_id"),
        (LogSpec("Pendulum-v1", (4,), "float32", (-2.0,), (2.0,)), "obs_shape"),
        (LogSpec("Pendulum-v1", (3,), "uint8", (-2.0,), (2.0,)), "obs_dtype"),
        (LogSpec("Pendulum-v1", (3,), "float32", (-2.0,), (1.0,)), "act_high"),
    ],
)
def test_another_robots_log_is_refused(tmp_path: Path, other: LogSpec, field: str) -> None:
    with TransitionLog(tmp_path / "a", SPEC, fsync=False) as log:
        log.append(make(0))
    with pytest.raises(LogError, match=field):
        TransitionLog(tmp_path / "a", other, fsync=False)
    with TransitionLog(tmp_path / "b", other, fsync=False) as log:
        t = make(1)
        t.obs = t.next_obs = np.zeros(other.obs_size, other.obs_dtype)
        log.append(t)
    with pytest.raises(LogError, match=field) as err:
        read_logs([tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(err.value) and str(tmp_path / "b") in str(err.value)
    if field != "env_id":
        return  # the command's error line once is enough
    result = ddpg("logs", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("ddpg logs: error: ") and result.stderr.count("\n") == 1


def test_bad_spec_and_missing_or_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="act_low"):
        LogSpec("Pendulum-v1", (3,), "float32", (-2.0, -1.0), (2.0,))
    with pytest.raises(LogError, match="obs_dtype"):
        LogSpec("Pendulum-v1", (3,), "object", (-2.0,), (2.0,))
    assert LogSpec("Pendulum-v1", [3], np.float32, [-2], [2]) == SPEC  # normalised

    with pytest.raises(LogError, match="no such directory"):
        read_logs([tmp_path / "missing"])
    result = ddpg("logs", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"ddpg logs: error: {tmp_path / 'missing'}: no such directory\n"

    empty = read_logs([tmp_path])
    assert empty.spec is None and empty.table.num_rows == 0 and empty.chunks == []
    assert summarize(empty)["transitions"] == 0
    result = ddpg("logs", str(tmp_path))
    assert result.returncode == 0 and "no transitions" in result.stdout


def test_logs_command_counts_episodes_and_returns_per_model(tmp_path: Path) -> None:
    rows: list[Transition] = []

    def episode(ep: int, models: list[str], rewards: list[float], **kw: object) -> None:
        for step, (model, reward) in enumerate(zip(models, rewards, strict=True)):
            rows.append(make(len(rows), episode=ep, step=step, model=model, reward=reward, **kw))

    ten = [1.0] * EPISODE
    episode(0, ["m1"] * EPISODE, ten)  # m1: return 10
    episode(1, ["m1"] * 3 + [""] * 2 + ["m1"] * 5, [3.0] * EPISODE)  # m1 (bridge steps): 30
    episode(2, ["m2"] * EPISODE, [-1.0] * EPISODE)  # m2: -10
    episode(3, ["m1"] * 5 + ["m2"] * 5, ten)  # mixed: 10
    episode(4, ["m2"] * 4, [1.0] * 4)  # unfinished: no terminal row yet
    for step in range(5, EPISODE):  # a bridge whose episode began before the log did
        rows.append(make(len(rows), bridge="b1", episode=0, step=step, model="m2", reward=9.0))
    with TransitionLog(tmp_path, SPEC, chunk_rows=16, fsync=False) as log:
        for t in rows:
            log.append(t)

    result = ddpg("logs", str(tmp_path), "--json")
    assert result.returncode == 0 and result.stderr == ""
    s = json.loads(result.stdout)
    assert s["transitions"] == len(rows) == 49 and s["chunks"] == 4
    assert s["env_id"] == "Pendulum-v1" and s["schema_version"] == SCHEMA_VERSION
    assert s["bridges"] == ["b0", "b1"] and s["bridge_sessions"] == 2
    assert s["episodes_completed"] == 5 and s["episodes_partial"] == 1
    assert s["safe_actions"] == sum(t.safe_action for t in rows)
    m1, m2, bridge = s["models"]["m1"], s["models"]["m2"], s["models"][""]
    assert m1["transitions"] == 23 and m2["transitions"] == 24 and bridge["transitions"] == 2
    assert m1["episodes"] == 2 and m1["return_mean"] == 20.0 and m1["return_std"] == 10.0
    assert (m1["return_min"], m1["return_max"]) == (10.0, 30.0)
    assert m2["episodes"] == 1 and m2["return_mean"] == -10.0 and bridge["episodes"] == 0
    assert s["mixed_model_episodes"]["episodes"] == 1
    assert s["mixed_model_episodes"]["return_mean"] == 10.0
    assert s["span_s"] >= 0 and s["first_chunk_utc"].endswith("Z")

    human = ddpg("logs", str(tmp_path))
    assert human.returncode == 0 and "Pendulum-v1" in human.stdout
    m1_line = next(line.split() for line in human.stdout.splitlines() if line.startswith("m1 "))
    assert m1_line[1] == "23" and m1_line[4] == "20.00"  # transitions, return mean


def test_write_errors_are_counted_retried_and_bounded(tmp_path: Path) -> None:
    d = tmp_path / "log"
    log = TransitionLog(d, SPEC, fsync=False, retry_seconds=0.05, max_backlog_bytes=1)
    try:
        log.append(make(0))
        assert log.flush() and log.transitions_committed == 1
        shutil.rmtree(d)  # the disk went away under a running node
        for i in range(1, 4):
            log.append(make(i))
        assert not log.flush()  # append never raised; the rows wait for a retry
        assert log.write_errors >= 1 and "cannot write" in log.last_error
        assert log.backlog_rows == 3 and log.transitions_pending == 3
        for i in range(4, 6):
            log.append(make(i))
        assert not log.flush()  # over max_backlog_bytes: the oldest waiting chunk goes
        assert log.transitions_dropped == 3 and "3 dropped" in log.last_error
        d.mkdir()
        wait_for(lambda: log.backlog_rows == 0)  # retried without a flush
        assert log.transitions_committed == 3
    finally:
        assert not log.close()  # rows were lost, and close says so
    got = read_logs([d])
    assert got.table.column("action_seq").to_pylist() == [4, 5]


def test_malformed_rows_are_dropped_not_fatal(tmp_path: Path) -> None:
    n = 3000  # one chunk, converted in several slices; the bad rows sit in the second
    rows = [make(i) for i in range(n)]
    rows[1500].obs = np.zeros(4, np.float32)  # wrong size
    rows[1501].model_id = None  # type: ignore[assignment]
    rows[1502].obs = rows[1502].obs.astype(np.float64)  # cast, not dropped
    log = TransitionLog(tmp_path, SPEC, chunk_rows=n, fsync=False)
    for t in rows:
        log.append(t)
    assert log.flush()
    assert log.transitions_committed == n - 2 and log.transitions_dropped == 2
    assert log.chunks_committed == 1 and "malformed" in log.last_error
    log.close()
    log.append(make(n))  # after close: counted, never raised
    assert log.transitions_dropped == 3
    got = read_logs([tmp_path])
    keep = [i for i in range(n) if i not in (1500, 1501)]
    assert got.table.column("action_seq").to_pylist() == keep
    np.testing.assert_array_equal(obs_array(got.table, "obs", SPEC)[:, 0], keep)


def test_writing_imports_neither_torch_nor_pandas(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from control_node.translog.schema import LogSpec, Transition\n"
        "from control_node.translog.writer import TransitionLog\n"
        "import control_node.logs_cli\n"
        "spec = LogSpec('Pendulum-v1', (3,), 'float32', (-2.0,), (2.0,))\n"
        "with TransitionLog(sys.argv[1], spec) as log:\n"
        "    o = np.zeros(3, np.float32)\n"
        "    log.append(Transition('b', 's', 0, 0, o, np.zeros(1, np.float32), 0.0, o,\n"
        "                          False, True, 'm', False, 0, 0, 0, 0))\n"
        "assert log.transitions_committed == 1\n"
        "print(sorted({'torch', 'pandas'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"  # pa.array() would pull in pandas on the writer thread


def test_summary_of_contents_is_json_ready(tmp_path: Path) -> None:
    with TransitionLog(tmp_path, SPEC, fsync=False) as log:
        for i in range(EPISODE):
            log.append(make(i))
    contents = read_logs([tmp_path])
    assert isinstance(contents, LogContents) and contents.dirs == [tmp_path]
    s = summarize(contents)
    assert json.loads(json.dumps(s)) == s
    assert s["models"]["m1"]["return_mean"] == -float(sum(range(EPISODE)))
