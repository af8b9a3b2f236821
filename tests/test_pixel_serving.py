"""A pixel actor served through the control loop, and its frames logged once each.

Real processes on free ports: a node serving a (random) exported pixel actor to a pixel bridge in
lockstep and, through ``ddpg launch``, in real time; the log read back with
``read_pixel_segments`` and compared bit for bit with a re-rendered rollout of the logged
actions; refused hellos, deploys and launch files; and the log's segment rules on hand-made
transitions (episode ends, gaps, chunk boundaries, a broken frame shift)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from loop_helpers import (
    DDPG,
    ENV,
    PENDULUM,
    RawBridge,
    run_launch,
    start_bridge,
    start_node,
    write_launch,
)

from control_node import protocol as P
from control_node.admin import AdminError, request
from control_node.config import ConfigError, LaunchConfig, from_mapping, load_launch
from control_node.translog.reader import PixelSegment, obs_array, read_logs, read_pixel_segments
from control_node.translog.schema import LogError, LogSpec, Transition
from control_node.translog.summary import summarize
from control_node.translog.writer import TransitionLog
from models.export import export_actor
from models.pixel_networks import PixelActor
from models.spec import PixelSpec
from sim_bridge.pixels import make_pixel_env

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "InvertedPendulum-v5"
SPEC = PixelSpec(size=32, stack=3, repeat=2)  # not the defaults: the flags must carry it
FLAGS = ("--pixels", "--pixel-size", "32", "--frame-stack", "3", "--action-repeat", "2")
FRAME_BYTES = 3 * 32 * 32


@pytest.fixture(scope="session")
def pixel_actor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random pixel actor exported as ``ddpg train --pixels`` would (uint8 input, spec in the
    metadata). Its near-zero actions let the pendulum fall in a dozen steps: short episodes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pixel_actor") / "actor.onnx"
    export_actor(
        PixelActor(SPEC.obs_shape, [-3.0], [3.0]), path, env_id=ENV_ID, preset="pixels",
        run_name="random", train_steps=0, seed=0, eval_seed=0, pixels=json.dumps(SPEC.to_dict()),
    )  # fmt: skip
    return path


def with_pixels(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of ``src`` whose metadata claims another pixel spec (the weights, so the model id,
    stay: a valid model that was 'trained' on other pixels)."""
    model = onnx.load(src)
    for prop in model.metadata_props:
        if prop.key == "pixels":
            prop.value = json.dumps({**json.loads(prop.value), **changes})
    onnx.save(model, dst)
    return dst


def assert_lossless(segments: list[PixelSegment], seed: int) -> int:
    """Every segment that starts an episode equals, bit for bit, what one fresh pixel env renders
    replaying the logged actions, its episodes reset in order with ``seed + episode`` as the
    bridge reset them. One env for all, as the bridge has: Gymnasium fixes the free camera's
    look-at point at the first render, so frames depend on the state an env first rendered."""
    firsts = {s.episode: s for s in segments if s.first_step == 0}
    env = make_pixel_env(ENV_ID, SPEC)
    try:
        for episode in range(max(firsts) + 1):
            obs, _ = env.reset(seed=seed + episode)
            seg = firsts.get(episode)
            if seg is None:
                continue
            seen, ends = [obs], []
            for action in seg.action:
                obs, _, terminated, truncated, _ = env.step(action)
                seen.append(obs)
                ends.append((terminated, truncated))
            np.testing.assert_array_equal(seg.observations(), np.stack(seen))
            assert list(zip(seg.terminated, seg.truncated, strict=True)) == ends
    finally:
        env.close()
    return len(firsts)


def stored_bytes_per_row(log_dir: Path) -> tuple[float, float]:
    """(uncompressed bytes of the obs and frame columns, file bytes) per row."""
    columns = rows = files = 0
    for path in sorted(log_dir.glob("chunk-*.parquet")):
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        files += path.stat().st_size
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema in ("obs", "frame"):
                    columns += group.column(c).total_uncompressed_size
    return columns / rows, files / rows


def naive_bytes_per_row(segments: list[PixelSegment], out: Path) -> float:
    """File bytes per row of the same transitions with obs and next_obs on every row."""
    spec = LogSpec(ENV_ID, SPEC.obs_shape, "uint8", (-3.0,), (3.0,))  # no pixels: the old layout
    n = 0
    with TransitionLog(out, spec, fsync=False) as log:
        for seg in segments:
            stacks = seg.observations()
            for i in range(len(seg)):
                log.append(transition(seg.episode, seg.first_step + i, stacks[i], stacks[i + 1]))
                n += 1
    return sum(p.stat().st_size for p in out.glob("chunk-*.parquet")) / n


# -- the loop -----------------------------------------------------------------------------------
def hello(raw: RawBridge, **changes: Any) -> P.Message:
    """A lockstep pixel bridge's hello with ``changes``; the node's answer."""
    fields = {
        "bridge_id": raw.bridge_id, "session": "s1", "env_id": ENV_ID,
        "obs_shape": list(SPEC.obs_shape), "obs_dtype": "uint8", "act_low": [-3.0],
        "act_high": [3.0], "mode": "lockstep", "rate_hz": 0.0, "pid": 1,
        "pixels": SPEC.to_dict(), **changes,
    }  # fmt: skip
    raw.send(P.encode(P.HELLO, fields))
    return raw.recv()


def test_lockstep_pixel_bridge_is_served_and_logged_bit_for_bit(
    tmp_path: Path, pixel_actor: Path
) -> None:
    # short chunks: episodes run across chunk boundaries, which the reader must join back
    node = start_node(tmp_path, model=pixel_actor, rate_hz=100, extra=("--chunk-seconds", "0.1"))
    refused = {
        "repeat 2 != 3": {"pixels": {**SPEC.to_dict(), "repeat": 3}},
        "camera None != -1": {"pixels": {**SPEC.to_dict(), "camera": -1}},
        "size 32 != 64": {"pixels": {**SPEC.to_dict(), "size": 64}, "obs_shape": [9, 64, 64]},
        "none (state observations)": {"pixels": None},
        "the model takes uint8": {"obs_dtype": "float32", "obs_shape": [4]},
    }
    for i, (words, fields) in enumerate(refused.items()):
        raw = RawBridge(node.bind, f"raw{i}")
        reply = hello(raw, **fields)
        assert reply.type == P.ERROR and reply["code"] == "spec_mismatch", reply.fields
        assert words in reply["reason"], reply["reason"]
        raw.close()
    raw = RawBridge(node.bind, "good")
    assert hello(raw, pixels="64x64")["code"] == "bad_field"
    assert hello(raw).type == P.WELCOME
    raw.send(raw.obs(np.zeros(SPEC.obs_shape, np.float32)))  # float pixels: refused
    assert raw.recv()["code"] == "bad_shape"
    raw.send(raw.obs(np.full(SPEC.obs_shape, 255, np.uint8)))
    reply = raw.recv()
    assert reply.type == P.ACTION and not reply["safe"] and reply.arrays["action"].shape == (1,)
    raw.close()

    bridge = start_bridge(node.bind, *FLAGS, "--mode", "lockstep", "--episodes", "3", "--seed", "7")
    out, err = bridge.communicate(timeout=120)
    assert bridge.returncode == 0, err
    served = json.loads(out)
    assert served["errors"] == {} and served["round_trip_us"]["n"] == served["steps"] > 0

    # deploys are checked against the live pixel spec too
    other = with_pixels(pixel_actor, tmp_path / "repeat3.onnx", repeat=3)
    for path, words in ((other, "repeat 3 != 2"), (PENDULUM, "uint8")):
        with pytest.raises(AdminError, match=words):
            request(node.admin, "deploy", timeout_s=30, path=str(path))
    assert request(node.admin, "deploy", timeout_s=30, path=str(pixel_actor))["ok"]

    final = node.stop()
    assert final["transitions_logged"] == served["transitions_sent"] == sum(served["lengths"])
    assert final["rejected_by_code"] == {"spec_mismatch": 5, "bad_field": 1, "bad_shape": 1}
    log_dir = node.log_dir
    assert log_dir is not None
    segments = read_pixel_segments([log_dir])
    assert [(s.episode, s.first_step, len(s)) for s in segments] == [
        (i, 0, n) for i, n in enumerate(served["lengths"])
    ]  # one segment per episode, whatever the chunks
    assert summarize(read_logs([log_dir]))["segment_starts"] >= len(segments)
    assert assert_lossless(segments, seed=7) == 3
    returns = [float(s.reward.sum()) for s in segments]
    np.testing.assert_allclose(returns, served["returns"], rtol=1e-6)
    assert all(set(s.model_id) == {final["model_id"]} and not s.safe.any() for s in segments)


def test_launch_serves_a_realtime_pixel_bridge_and_logs_each_frame_once(
    tmp_path: Path, pixel_actor: Path
) -> None:
    launch = write_launch(
        tmp_path,
        node__model=str(pixel_actor),
        bridge__pixels=SPEC.to_dict(),
        bridge__rate_hz=50,
        bridge__seed=3,
        bridge__episodes=12,  # a few seconds at 50 Hz; the launch ends when they are done
    )
    summary = run_launch(launch, "--duration", "90", "--quiet")
    assert summary["ok"] and summary["bridges"][0]["episodes"] == 12
    assert summary["transitions_logged"] == summary["transitions_sent"] > 100
    assert summary["episodes"] == 12 and summary["rejected_messages"] == 0
    log_dir = tmp_path / "logs"
    segments = read_pixel_segments([log_dir])
    assert sum(map(len, segments)) == summary["transitions_logged"]
    assert assert_lossless(segments, seed=3) == 12  # every episode, re-rendered

    # each frame about once: the obs and frame columns hold < 2 frames per row (obs and next_obs
    # on every row would be 2 * stack = 6), and the files are a fraction of the naive layout's
    s = summarize(read_logs([log_dir]))
    columns, on_disk = stored_bytes_per_row(log_dir)
    naive = naive_bytes_per_row(segments, tmp_path / "naive")
    print(
        f"\npixel log, {s['transitions']} transitions, {s['chunks']} chunks: "
        f"{s['frames_per_transition']:.3f} frames per transition, obs+frame columns "
        f"{columns:.0f} B/row uncompressed ({columns / FRAME_BYTES:.3f} frames), files "
        f"{on_disk:.0f} B/row; naive obs+next_obs layout {naive:.0f} B/row "
        f"({naive / on_disk:.1f}x)"
    )
    assert s["frames_per_transition"] < 2 and columns < 2 * FRAME_BYTES
    assert s["bytes_per_transition"] == pytest.approx(on_disk)
    assert naive > 2 * on_disk
    logs = subprocess.run(
        [*DDPG, "logs", str(log_dir)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert logs.returncode == 0 and "32x32, stack 3, repeat 2" in logs.stdout


# -- refused before anything starts -------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({}, "bridges[0] (sim0): its observations do not fit node.model (pixels none"),
        ({"bridge__pixels": {**SPEC.to_dict(), "repeat": 3}}, "repeat 3 != 2"),
        ({"bridge__pixels": {"size": 8}}, "bridges[0].pixels.size must be in 16..256, got 8"),
        ({"bridge__pixels": {"colour": 1}}, "bridges[0].pixels.colour: unknown key"),
        ({"bridge__pixels": {"camera": 1.5}}, "bridges[0].pixels.camera = 1.5: expected int"),
        ({"bridge__pixels": {}, "node__model": str(PENDULUM)}, "!= none (state observations)"),
        (  # continual mode would retrain a state run on pixel logs, and fail every round
            {"bridge__pixels": SPEC.to_dict(), "continual": {"init": str(PENDULUM.parent)}},
            "sees other observations than node.model (pixels none (state observations) != ",
        ),
    ],
)
def test_a_launch_whose_bridge_does_not_fit_the_model_is_refused(
    tmp_path: Path, pixel_actor: Path, changes: dict[str, Any], words: str
) -> None:
    launch = write_launch(tmp_path, **{"node__model": str(pixel_actor), **changes})
    with pytest.raises(ConfigError) as e:
        load_launch(launch, check_ports=False)
    assert words in str(e.value), e.value


def test_the_pixel_launch_example_loads(tmp_path: Path, pixel_actor: Path) -> None:
    # as shipped: the zoo's pixel actor and the bridge's spec fit each other
    shipped = load_launch(ROOT / "docs" / "launch_pixels.yaml", check_ports=False)
    assert shipped.bridges[0].pixels is not None
    data = yaml.safe_load((ROOT / "docs" / "launch_pixels.yaml").read_text())
    bridge = from_mapping(LaunchConfig, data).bridges[0]
    assert bridge.pixels is not None and bridge.pixels.to_dict() == PixelSpec().to_dict()
    # with this test's model (and its spec) the whole file loads, relative paths and all
    data["node"]["model"] = str(pixel_actor)
    data["bridges"][0]["pixels"] = SPEC.to_dict()
    launch = tmp_path / "launch.yaml"
    launch.write_text(yaml.safe_dump(data))
    cfg = load_launch(launch, check_ports=False)
    assert cfg.bridges[0].pixels is not None and cfg.bridges[0].pixels.to_dict() == SPEC.to_dict()


# -- the log's segment rules --------------------------------------------------------------------
LOG = LogSpec(ENV_ID, (6, 4, 4), "uint8", (-1.0,), (1.0,), pixels=json.dumps({"size": 4, "stack": 2, "repeat": 1, "camera": None}))  # fmt: skip


def transition(
    episode: int, step: int, obs: np.ndarray, next_obs: np.ndarray, bridge: str = "b0"
) -> Transition:
    return Transition(
        bridge, "s0", episode, step, obs, np.array([step / 100], np.float32), float(step),
        next_obs, False, False, "m", False, step, 0, 0, 0,
    )  # fmt: skip


class Robot:
    """Hand-made stacked observations (stack 2, 4x4 frames) with their true transitions."""

    def __init__(self, bridge: str, seed: int) -> None:
        self.bridge, self.rng = bridge, np.random.default_rng(seed)
        self.truth: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def episode(self, episode: int, steps: int, skip: tuple[int, ...] = ()) -> list[Transition]:
        first = self.rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
        obs = np.concatenate([first, first])
        rows = []
        for step in range(steps):
            nxt = np.concatenate([obs[3:], self.rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)])
            t = transition(episode, step, obs, nxt, self.bridge)
            t.terminated = step == steps - 1
            if step not in skip:
                rows.append(t)
                self.truth[(self.bridge, episode, step)] = (obs, nxt)
            obs = nxt
        return rows

    def check(self, segments: list[PixelSegment]) -> None:
        for seg in segments:
            stacks = seg.observations()
            for i in range(len(seg)):
                obs, nxt = self.truth[(seg.bridge_id, seg.episode, seg.first_step + i)]
                np.testing.assert_array_equal(stacks[i], obs)
                np.testing.assert_array_equal(stacks[i + 1], nxt)


def write(d: Path, rows: list[Transition], **kwargs: Any) -> TransitionLog:
    log = TransitionLog(d, LOG, fsync=False, **kwargs)
    for t in rows:
        log.append(t)
    log.close()
    return log


def test_segments_end_at_episode_ends_and_gaps_and_join_across_chunks(tmp_path: Path) -> None:
    a, b = Robot("a", 0), Robot("b", 1)
    rows_a = a.episode(0, 9) + a.episode(1, 12, skip=(5, 6)) + a.episode(2, 3)
    rows_b = b.episode(0, 20)
    rows = [t for pair in zip(rows_a, rows_b, strict=False) for t in pair]  # interleaved
    rows += rows_a[len(rows_b) :]
    write(tmp_path, rows, chunk_rows=7)
    segments = read_pixel_segments([tmp_path])
    got = [(s.bridge_id, s.episode, s.first_step, len(s)) for s in segments]
    assert got == [("a", 0, 0, 9), ("a", 1, 0, 5), ("a", 1, 7, 5), ("a", 2, 0, 3), ("b", 0, 0, 20)]
    a.check(segments[:4])
    b.check(segments[4:])
    assert [bool(s.terminated[-1]) for s in segments] == [True, False, True, True, True]
    s = summarize(read_logs([tmp_path]))
    assert s["schema_version"] == 2 and s["pixels"]["stack"] == 2 and s["transitions"] == len(rows)
    assert s["frames_stored"] == len(rows) + 2 * s["segment_starts"] and s["segment_starts"] > 5

    # every chunk decodes on its own: without a middle chunk the others still rebuild exactly
    chunks = sorted(tmp_path.glob("chunk-*.parquet"))
    alone = tmp_path / "alone"
    alone.mkdir()
    for path in chunks[:2] + chunks[3:]:
        shutil.copy(path, alone)
    partial = read_pixel_segments([alone])
    a.check([s for s in partial if s.bridge_id == "a"])
    b.check([s for s in partial if s.bridge_id == "b"])
    assert sum(map(len, partial)) == len(rows) - pq.read_metadata(chunks[2]).num_rows


def test_a_broken_chain_starts_a_segment_and_a_broken_shift_is_dropped(tmp_path: Path) -> None:
    robot = Robot("a", 2)
    rows = robot.episode(0, 8)
    # step 4's obs is not step 3's next_obs (a bridge that re-rendered, say): a new segment
    fresh = robot.rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    obs = np.concatenate([fresh, rows[4].obs[3:]])
    rows[4] = transition(0, 4, obs, rows[4].next_obs, "a")
    robot.truth[("a", 0, 4)] = (obs, rows[4].next_obs)
    # step 6's next_obs is not its obs shifted by a frame: it cannot be stored as a frame
    rows[6].next_obs = rows[6].next_obs[::-1].copy()
    log = write(tmp_path, rows)
    assert log.transitions_dropped == 1 and "shifted by one frame" in log.last_error
    segments = read_pixel_segments([tmp_path])
    assert [(s.first_step, len(s)) for s in segments] == [(0, 4), (4, 2), (7, 1)]
    robot.check(segments)


def test_pixel_logs_read_with_pandas_alone_and_refuse_per_row_obs(tmp_path: Path) -> None:
    robot = Robot("a", 3)
    write(tmp_path, robot.episode(0, 5) + robot.episode(1, 4, skip=(1,)))
    (path,) = tmp_path.glob("chunk-*.parquet")
    # the recipe of docs/transition_log.md: pandas, numpy and the schema metadata only
    meta = pq.read_schema(path).metadata
    c, h, w = json.loads(meta[b"ddpg.obs_shape"])
    df = pd.read_parquet(path)
    assert "next_obs" not in df.columns and json.loads(meta[b"ddpg.schema_version"]) == 2
    stack = None
    for _, rows in df.groupby(["bridge_id", "bridge_session"], sort=False):
        for row in rows.itertuples():
            if row.obs is not None:
                stack = np.frombuffer(row.obs, np.uint8).reshape(c, h, w)
            frame = np.frombuffer(row.frame, np.uint8).reshape(3, h, w)
            after = np.concatenate([stack[3:], frame])
            obs, nxt = robot.truth[(row.bridge_id, row.episode, row.step)]
            np.testing.assert_array_equal(stack, obs)
            np.testing.assert_array_equal(after, nxt)
            stack = after
    contents = read_logs([tmp_path])
    with pytest.raises(LogError, match="read_pixel_segments"):
        obs_array(contents.table, "obs", contents.spec)  # type: ignore[arg-type]
    state = tmp_path / "state"
    with TransitionLog(
        state, LogSpec(ENV_ID, (4,), "float32", (-1.0,), (1.0,)), fsync=False
    ) as log:
        log.append(transition(0, 0, np.zeros(4, np.float32), np.ones(4, np.float32)))
    with pytest.raises(LogError, match="state log"):
        read_pixel_segments([state])
    human = subprocess.run(
        [sys.executable, "-m", "control_node", "logs", str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert human.returncode == 0 and "4x4, stack 2, repeat 1" in human.stdout
    assert "segment starts" in human.stdout and "per transition" in human.stdout
