"""``ddpg retrain`` on pixel logs: runs of logged frames go into the frame replay once each, the
networks update, and the retrained pixel actor is exported; bad combinations are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from control_node.translog.reader import read_pixel_segments
from control_node.translog.schema import LogSpec, Transition
from control_node.translog.writer import TransitionLog
from models.spec import PixelSpec
from sim_bridge.pixels import make_pixel_env
from training.frame_replay import FrameReplay
from training.logged_data import PixelLog, RetrainError, load_logs
from training.retrain import retrain

ENV_ID = "InvertedPendulum-v5"
SPEC = PixelSpec(size=16, stack=3, repeat=2)  # small frames: the pipeline is the same


def rollout_log(log_dir: Path, episodes: int, skip: set[tuple[int, int]]) -> int:
    """Random-action pixel episodes, logged as the node logs them; ``skip`` (episode, step)
    pairs are left out, as a lost message would be. Returns the rows written."""
    env = make_pixel_env(ENV_ID, SPEC)
    spec = LogSpec(
        ENV_ID,
        SPEC.obs_shape,
        "uint8",
        env.action_space.low,
        env.action_space.high,
        pixels=json.dumps(SPEC.to_dict()),
    )
    log = TransitionLog(log_dir, spec, fsync=False)
    rng = np.random.default_rng(0)
    rows = 0
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode)
        done, step = False, 0
        while not done:
            action = rng.uniform(-0.3, 0.3, 1).astype(np.float32)
            nxt, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            if (episode, step) not in skip:
                log.append(
                    Transition(
                        "sim0",
                        "s",
                        episode,
                        step,
                        obs,
                        action,
                        reward,
                        nxt,
                        terminated,
                        truncated,
                        "m",
                        False,
                        step,
                        0,
                        0,
                        0,
                    )
                )
                rows += 1
            obs, step = nxt, step + 1
    log.close()
    env.close()
    return rows


@pytest.fixture(scope="module")
def pixel_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    log_dir = tmp_path_factory.mktemp("pixel-log")
    return log_dir, rollout_log(log_dir, episodes=4, skip={(1, 3), (2, 0)})


def test_segments_fill_the_frame_replay_with_the_logged_stacks(pixel_log: tuple[Path, int]) -> None:
    log_dir, rows = pixel_log
    data = load_logs([log_dir])
    assert isinstance(data, PixelLog) and data.kept == rows and data.dropped == 0
    # the gap at step 3 cuts episode 1 in two; episode 2's run starts at its step 1
    runs = [(seg.episode, seg.first_step) for seg in data.segments]
    assert runs == [(0, 0), (1, 0), (1, 4), (2, 1), (3, 0)] and data.episode_ends == 4
    replay = FrameReplay(
        rows, SPEC.frame_shape, SPEC.stack, act_dim=1, frame_capacity=data.frames_needed
    )
    for seg in data.segments:
        replay.add_segment(
            seg.obs0, seg.frames, seg.action, seg.reward, seg.terminated, seg.truncated
        )
    got = replay.gather(torch.arange(len(replay)))
    stacks = [seg.observations() for seg in read_pixel_segments([log_dir])]
    np.testing.assert_array_equal(got.obs.numpy(), np.concatenate([s[:-1] for s in stacks]))
    np.testing.assert_array_equal(got.next_obs.numpy(), np.concatenate([s[1:] for s in stacks]))


def test_retrain_on_a_pixel_log_updates_and_exports_a_pixel_actor(
    pixel_log: tuple[Path, int], tmp_path: Path
) -> None:
    log_dir, rows = pixel_log
    summary = retrain(
        [log_dir],
        tmp_path / "rt",
        updates=12,
        eval_episodes=1,
        log=lambda line: None,
        batch_size=8,
        log_every=4,
    )
    assert summary["updates_total"] == 12 and summary["transitions"] == rows
    report = json.loads((tmp_path / "rt" / "retrain.json").read_text())
    assert report["transitions"]["replay"] == rows
    assert "skipped" in report["q_vs_logged_returns"]
    loss = report["critic_loss"]
    assert loss["start"] is not None and loss["end"] is not None
    from models.policy import OnnxPolicy, pixel_spec_dict

    policy = OnnxPolicy(Path(summary["model"]))
    assert policy.metadata.obs_dtype == "uint8"
    assert pixel_spec_dict(policy.metadata) == SPEC.to_dict()  # the camera the robot had
    assert summary["preset"] == "drq"  # the pixel default without --init


def test_a_pixel_log_is_refused_for_a_state_run(
    pixel_log: tuple[Path, int], tmp_path: Path
) -> None:
    log_dir, _ = pixel_log
    zoo = Path(__file__).resolve().parents[1] / "models" / "zoo" / "inverted_pendulum"
    with pytest.raises(
        RetrainError, match=r"do not match the init run's env .*: pixels \{.*\} != None"
    ):
        retrain([log_dir], tmp_path / "rt", init=zoo, updates=1, eval_episodes=0)


def test_retrain_continues_a_pixel_run_after_its_own_replay(
    pixel_log: tuple[Path, int], tmp_path: Path
) -> None:
    from training.config import make_config
    from training.trainer import train

    log_dir, rows = pixel_log
    init = tmp_path / "init"
    cfg = make_config(
        "drq",
        env=ENV_ID,
        pixels=True,
        pixel_size=SPEC.size,
        frame_stack=SPEC.stack,
        action_repeat=SPEC.repeat,
        view="env",  # as the logs' bridge rendered
        steps=30,
        learning_starts=20,
        batch_size=8,
        eval_every=0,
        eval_episodes=0,
        save_replay=True,
        export=False,
        out=str(init),
    )
    trained = train(cfg, progress=False)
    summary = retrain(
        [log_dir], tmp_path / "rt", init=init, updates=4, eval_episodes=0, log=lambda _: None
    )
    report = json.loads((tmp_path / "rt" / "retrain.json").read_text())
    # what the init run's frame ring held (very short episodes evict a few of its 30 steps)
    saved = int(torch.load(init / "replay.pt", weights_only=True)["size"])
    assert 0 < saved <= 30 and report["transitions"]["from_init_replay"] == saved
    assert report["transitions"]["replay"] == saved + rows
    assert summary["updates_total"] == trained["updates"] + 4
    assert summary["steps"] == 30 + rows
