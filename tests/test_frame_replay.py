"""The frame replay against a naive buffer of full stacked observations, on synthetic frames.

Each frame's pixels encode its episode, its step and a global frame number, so a gathered stack
that mixes episodes, repeats the wrong frame at a reset or reads an overwritten slot differs
from the naive stack built the way the env wrapper builds it.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from training import frame_replay
from training.frame_replay import FrameBatch, FrameReplay, ReplayMemoryError, check_fits
from training.replay import Batch

SHAPE = (3, 6, 5)  # small frames keep the tests fast; the layout does not depend on the size
ACT_DIM = 2


def make_frame(episode: int, step: int, serial: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A frame whose first bytes are (episode, step) and the rest a pattern of its serial."""
    frame = ((np.arange(int(np.prod(shape))) + 37 * serial) % 251).astype(np.uint8)
    frame[:4] = (episode % 256, episode // 256, step % 256, step // 256)
    return frame.reshape(shape)


@dataclass
class Naive:
    """Full ``obs`` and ``next_obs`` per transition, stacked like the env wrapper: reset fills
    the stack with the first frame, each step appends the newest frame and drops the oldest."""

    stack: int
    obs: list[np.ndarray] = field(default_factory=list)
    next_obs: list[np.ndarray] = field(default_factory=list)
    action: list[np.ndarray] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    state: list[np.ndarray] = field(default_factory=list)
    next_state: list[np.ndarray] = field(default_factory=list)
    window: deque[np.ndarray] = field(default_factory=deque)
    current_state: np.ndarray | None = None

    def reset(self, frame: np.ndarray, state: np.ndarray) -> None:
        self.window = deque([frame] * self.stack, maxlen=self.stack)
        self.current_state = state

    def step(
        self,
        action: np.ndarray,
        frame: np.ndarray,
        terminated: bool,
        truncated: bool,
        state: np.ndarray,
    ) -> None:
        self.obs.append(np.concatenate(self.window))
        self.window.append(frame)
        self.next_obs.append(np.concatenate(self.window))
        self.action.append(action)
        self.terminated.append(terminated)
        self.truncated.append(truncated)
        self.state.append(self.current_state)
        self.next_state.append(state)
        self.current_state = state

    def __len__(self) -> int:
        return len(self.obs)


@dataclass
class Episode:
    frames: np.ndarray  # (T + 1, *SHAPE)
    action: np.ndarray  # (T, ACT_DIM)
    reward: np.ndarray  # (T,): the global transition number, to find the naive row
    terminated: np.ndarray
    truncated: np.ndarray
    states: np.ndarray  # (T + 1, 2): (global frame number, episode)


class Source:
    """Synthetic episodes with globally numbered frames and transitions."""

    def __init__(self, shape: tuple[int, ...] = SHAPE) -> None:
        self.shape = shape
        self.episodes = 0
        self.frames = 0
        self.transitions = 0

    def episode(self, length: int, ending: str | None) -> Episode:
        e = self.episodes
        frames = np.stack(
            [make_frame(e, k, self.frames + k, self.shape) for k in range(length + 1)]
        )
        states = np.stack(
            [np.array([self.frames + k, e], dtype=np.float32) for k in range(length + 1)]
        )
        steps = np.arange(length)
        last = steps == length - 1
        ep = Episode(
            frames=frames,
            action=np.stack([steps + 0.5, -(steps + e)], axis=1).astype(np.float32),
            reward=(self.transitions + steps).astype(np.float32),
            terminated=last & (ending == "terminated"),
            truncated=last & (ending == "truncated"),
            states=states,
        )
        self.episodes += 1
        self.frames += length + 1
        self.transitions += length
        return ep


def feed(buf: FrameReplay, naive: Naive, ep: Episode, with_state: bool = False) -> None:
    """Step by step, the way a trainer feeds the buffer."""
    buf.start_episode(ep.frames[0], ep.states[0] if with_state else None)
    naive.reset(ep.frames[0], ep.states[0])
    for k in range(len(ep.reward)):
        args = (ep.action[k], float(ep.reward[k]), ep.frames[k + 1])
        ends = (bool(ep.terminated[k]), bool(ep.truncated[k]))
        buf.add(*args, *ends, next_state=ep.states[k + 1] if with_state else None)
        naive.step(ep.action[k], ep.frames[k + 1], *ends, ep.states[k + 1])


def assert_matches(batch: FrameBatch, naive: Naive, stack: int, shape: tuple[int, ...]) -> None:
    ids = batch.reward.long().cpu().numpy()
    b = len(ids)
    assert batch.obs.dtype == torch.uint8 and batch.next_obs.dtype == torch.uint8
    assert batch.obs.shape == (b, shape[0] * stack, *shape[1:]) == batch.next_obs.shape
    np.testing.assert_array_equal(batch.obs.cpu().numpy(), np.stack([naive.obs[i] for i in ids]))
    np.testing.assert_array_equal(
        batch.next_obs.cpu().numpy(), np.stack([naive.next_obs[i] for i in ids])
    )
    np.testing.assert_array_equal(
        batch.action.cpu().numpy(), np.stack([naive.action[i] for i in ids])
    )
    np.testing.assert_array_equal(
        batch.terminated.cpu().numpy(), [float(naive.terminated[i]) for i in ids]
    )
    np.testing.assert_array_equal(
        batch.truncated.cpu().numpy(), [float(naive.truncated[i]) for i in ids]
    )
    if batch.state is not None:
        assert batch.next_state is not None
        np.testing.assert_array_equal(
            batch.state.cpu().numpy(), np.stack([naive.state[i] for i in ids])
        )
        np.testing.assert_array_equal(
            batch.next_state.cpu().numpy(), np.stack([naive.next_state[i] for i in ids])
        )


def assert_live_suffix(buf: FrameReplay, naive: Naive) -> None:
    """The buffer holds exactly the newest ``len(buf)`` transitions, all of them correct, and
    none refers to a frame slot that has been written over since."""
    everything = buf.gather(torch.arange(len(buf)))
    ids = everything.reward.long().numpy()
    np.testing.assert_array_equal(ids, np.arange(len(naive) - len(buf), len(naive)))
    assert_matches(everything, naive, buf.stack, buf.frame_shape)
    live = (buf.tail + np.arange(len(buf))) % buf.capacity
    # oldest frame of each live transition (private, checked for the eviction rule itself)
    assert (buf._oldest[live] >= buf.frames_written - buf.frame_capacity).all()


# episodes of length 1 and shorter than the stack, both endings, and an unfinished last one
EPISODES = [
    (1, "terminated"),
    (2, "truncated"),
    (5, "terminated"),
    (1, "truncated"),
    (3, "terminated"),
    (8, "truncated"),
    (1, "terminated"),
    (2, "terminated"),
    (4, "truncated"),
    (2, None),
]


@pytest.mark.parametrize("stack", [1, 3, 4])
def test_samples_equal_naive_stacks(stack: int) -> None:
    buf = FrameReplay(100, SHAPE, stack, act_dim=ACT_DIM, state_dim=2)
    naive, source = Naive(stack), Source()
    for length, ending in EPISODES:
        feed(buf, naive, source.episode(length, ending), with_state=True)
    assert len(buf) == len(naive) == sum(n for n, _ in EPISODES)

    full = buf.sample_full(512, generator=torch.Generator().manual_seed(0))
    assert len(set(full.reward.tolist())) == len(naive)  # every transition was drawn
    assert_matches(full, naive, stack, SHAPE)
    assert_live_suffix(buf, naive)
    # obs and next_obs come out of one gather of stack + 1 frames per transition
    assert full.obs.untyped_storage().data_ptr() == full.next_obs.untyped_storage().data_ptr()

    # sample() is the learner's Batch with the same draws; terminated is a float mask
    batch = buf.sample(512, generator=torch.Generator().manual_seed(0))
    assert isinstance(batch, Batch)
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        assert torch.equal(getattr(batch, name), getattr(full, name))
    assert batch.discount is None  # one-step: the learner's own gamma
    assert batch.terminated.dtype == torch.float32


def test_reset_stack_repeats_the_first_frame() -> None:
    """Spelled out once: the first obs of an episode is the reset frame `stack` times."""
    buf = FrameReplay(10, SHAPE, 3, act_dim=ACT_DIM)
    naive, source = Naive(3), Source()
    feed(buf, naive, source.episode(1, "terminated"))
    feed(buf, naive, source.episode(2, "truncated"))
    b = buf.gather(torch.arange(3))
    header = b.obs.reshape(3, 3, -1)[:, :, :4].tolist()  # (transition, stacked frame, header)
    assert header[0] == [[0, 0, 0, 0]] * 3  # episode 0, its reset frame thrice
    assert header[1] == [[1, 0, 0, 0]] * 3  # episode 1: nothing from episode 0
    assert header[2] == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]
    assert b.next_obs.reshape(3, 3, -1)[2, :, :4].tolist() == [
        [1, 0, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 2, 0],
    ]


@pytest.mark.parametrize("frame_capacity", [None, 4, 9])
def test_wrap_around_keeps_only_live_correct_transitions(frame_capacity: int | None) -> None:
    """Far more than capacity is written; short episodes use up frames faster than transitions
    (one reset frame each), so with a tight frame ring transitions are evicted for frames."""
    buf = FrameReplay(16, SHAPE, 3, act_dim=ACT_DIM, frame_capacity=frame_capacity)
    naive, source = Naive(3), Source()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(1)
    for i in range(80):
        length = int(rng.choice([1, 1, 2, 3, 5, 12, 40]))
        ending = ["terminated", "truncated"][i % 2]
        feed(buf, naive, source.episode(length, ending))
        assert 0 < len(buf) <= buf.capacity
        assert_live_suffix(buf, naive)
        assert_matches(buf.sample_full(64, generator=gen), naive, 3, SHAPE)
    assert buf.frames_written > 3 * buf.frame_capacity
    # long episodes fill the transition ring whenever the frame ring allows it
    feed(buf, naive, source.episode(40, None))
    expected = 16 if frame_capacity is None else frame_capacity - 3
    assert len(buf) == expected
    assert_live_suffix(buf, naive)


def test_add_episode_matches_step_by_step() -> None:
    """The vectorised episode append, including episodes longer than both rings."""
    step_buf = FrameReplay(12, SHAPE, 3, act_dim=ACT_DIM, state_dim=2, frame_capacity=15)
    ep_buf = FrameReplay(12, SHAPE, 3, act_dim=ACT_DIM, state_dim=2, frame_capacity=15)
    naive, source = Naive(3), Source()
    for length, ending in [*EPISODES[:-1], (0, None), (30, "truncated"), (13, "terminated")]:
        ep = source.episode(length, ending)
        feed(step_buf, naive, ep, with_state=True)
        ep_buf.add_episode(ep.frames, ep.action, ep.reward, ep.terminated, ep.truncated, ep.states)
        assert len(ep_buf) == len(step_buf)
        assert_live_suffix(ep_buf, naive)
    ep = source.episode(4, None)
    feed(step_buf, naive, ep, with_state=True)
    ep_buf.add_episode(ep.frames, ep.action, ep.reward, ep.terminated, ep.truncated, ep.states)
    # an unfinished episode can go on step by step after add_episode
    more = source.episode(3, "terminated")
    for k in range(3):
        args = (more.action[k], float(more.reward[k]), more.frames[k + 1])
        ends = (bool(more.terminated[k]), bool(more.truncated[k]))
        step_buf.add(*args, *ends, next_state=more.states[k + 1])
        ep_buf.add(*args, *ends, next_state=more.states[k + 1])
    a, b = step_buf.state_dict(), ep_buf.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@pytest.mark.parametrize("frame_shape", [(3, 64, 64), (3, 84, 84)])
@pytest.mark.parametrize("act_dim", [1, 6])
def test_memory_per_transition_is_about_one_frame(
    frame_shape: tuple[int, int, int], act_dim: int
) -> None:
    capacity, stack = 2_000, 3
    buf = FrameReplay(capacity, frame_shape, stack, act_dim=act_dim)
    assert buf.nbytes == FrameReplay.memory_needed(capacity, frame_shape, stack, act_dim)
    frame = int(np.prod(frame_shape))
    small = 4 * act_dim + 4 + 1 + 1  # action, reward, terminated, truncated
    per_transition = buf.nbytes / capacity
    assert 1.0 <= per_transition / (frame + small) <= 1.3
    naive = 2 * stack * frame + small
    assert per_transition < naive / 5
    with_state = FrameReplay.memory_needed(capacity, frame_shape, stack, act_dim, state_dim=4)
    assert FrameReplay(capacity, frame_shape, stack, act_dim=act_dim, state_dim=4).nbytes == (
        with_state
    )


def test_check_fits_refuses_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    needed = FrameReplay.memory_needed(10**12, (3, 84, 84), 3, act_dim=6)
    with pytest.raises(ReplayMemoryError) as info:
        check_fits(needed, "cpu")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and f"{needed:,} bytes" in message and "available" in message

    available = check_fits(1 << 20, "cpu")  # a mebibyte fits
    assert available is None or available > 1 << 20

    monkeypatch.setattr(frame_replay, "available_memory", lambda device: 123_456)
    with pytest.raises(ReplayMemoryError, match=r"needs 200,000 bytes .* only 123,456 bytes"):
        check_fits(200_000, "cpu")
    assert check_fits(100_000, "cpu") == 123_456


def test_state_dict_round_trip_gives_identical_samples() -> None:
    def build() -> FrameReplay:
        return FrameReplay(16, SHAPE, 3, act_dim=ACT_DIM, state_dim=2)

    buf = build()
    naive, source = Naive(3), Source()
    for i in range(25):  # wrapped several times, last episode unfinished
        ending = ["terminated", "truncated"][i % 2]
        feed(buf, naive, source.episode(1 + (7 * i) % 9, ending), with_state=True)
    ep = source.episode(5, None)
    feed(buf, naive, ep, with_state=True)
    assert buf.tail != 0 and buf.frames_written > buf.frame_capacity

    saved = io.BytesIO()
    torch.save(buf.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved)
    frames = state["frames"]
    assert isinstance(frames, torch.Tensor) and len(frames) <= buf.frame_capacity
    restored = build()
    restored.load_state_dict(state)
    assert len(restored) == len(buf)

    a = buf.sample_full(256, generator=torch.Generator().manual_seed(3))
    b = restored.sample_full(256, generator=torch.Generator().manual_seed(3))
    for name in FrameBatch._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert_live_suffix(restored, naive)

    # the unfinished episode goes on from the checkpoint as it would have without it
    more = source.episode(3, None)
    for target in (buf, restored):
        for k in range(3):
            args = (more.action[k], float(more.reward[k]), more.frames[k + 1])
            target.add(*args, False, False, next_state=more.states[k + 1])
    a = buf.gather(torch.arange(len(buf)))
    b = restored.gather(torch.arange(len(restored)))
    for name in FrameBatch._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    with pytest.raises(ValueError, match="transitions, capacity"):
        FrameReplay(4, SHAPE, 3, act_dim=ACT_DIM, state_dim=2).load_state_dict(state)


def test_misuse_is_refused() -> None:
    buf = FrameReplay(8, SHAPE, 3, act_dim=ACT_DIM)
    frame = make_frame(0, 0, 0)
    action = np.zeros(ACT_DIM, dtype=np.float32)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    with pytest.raises(RuntimeError, match="start_episode"):
        buf.add(action, 0.0, frame, False, False)
    with pytest.raises(ValueError, match="uint8 frame"):
        buf.start_episode(frame.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 frame"):
        buf.start_episode(frame.transpose(1, 2, 0))  # HWC instead of CHW
    with pytest.raises(ValueError, match="state"):
        buf.start_episode(frame, np.zeros(2))
    buf.start_episode(frame)
    buf.add(action, 0.0, frame, True, False)
    with pytest.raises(RuntimeError, match="start_episode"):  # no step across a terminal
        buf.add(action, 0.0, frame, False, False)
    with pytest.raises(ValueError, match="frame_capacity"):
        FrameReplay(8, SHAPE, 3, act_dim=ACT_DIM, frame_capacity=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu = FrameReplay(16, SHAPE, 3, act_dim=ACT_DIM, state_dim=2)
    gpu = FrameReplay(16, SHAPE, 3, act_dim=ACT_DIM, state_dim=2, device="cuda")
    naive, source = Naive(3), Source()
    for length, ending in EPISODES * 3:
        ep = source.episode(length, ending)
        feed(cpu, Naive(3), ep, with_state=True)
        feed(gpu, naive, ep, with_state=True)
    assert_live_suffix(gpu, naive)
    a = cpu.gather(torch.arange(len(cpu)))
    b = gpu.gather(torch.arange(len(gpu), device="cuda"))
    for name in FrameBatch._fields:
        assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
    batch = gpu.sample(64, generator=torch.Generator(device="cuda").manual_seed(0))
    assert batch.obs.is_cuda and batch.obs.dtype == torch.uint8


@pytest.mark.parametrize("n_step", [1, 3, 5])
def test_n_step_returns_stop_at_episode_ends_and_gaps(n_step: int) -> None:
    """Against a reference over the naive rows: the return stops at terminated, truncated, a
    segment that ends without either (a gap, as in logs) and the newest transition; the ring has
    wrapped, so the oldest rows' windows run over the ring's seam."""
    gamma = 0.9
    episodes = [(1, "terminated"), (4, None), (6, "truncated"), (2, "terminated"), (7, None)]
    episodes += [(3, "truncated"), (9, "terminated"), (5, None)]
    buf = FrameReplay(24, SHAPE, 3, act_dim=ACT_DIM)
    naive, source = Naive(3), Source()
    segment: list[int] = []
    for s, (length, ending) in enumerate(episodes):
        feed(buf, naive, source.episode(length, ending))
        segment += [s] * length
    assert buf.tail != 0  # wrapped: rows cross the end of the ring
    rewards = np.arange(len(naive), dtype=np.float64)  # Source: reward = transition number
    first = len(naive) - len(buf)
    batch = buf.n_step_batch(torch.arange(len(buf)), n_step, gamma)
    for row in range(len(buf)):
        i = j = first + row
        total, m = rewards[i], 1
        while (
            m < n_step
            and not (naive.terminated[j] or naive.truncated[j])
            and j + 1 < len(naive)
            and segment[j + 1] == segment[j]
        ):
            j += 1
            total += gamma**m * rewards[j]
            m += 1
        np.testing.assert_allclose(float(batch.reward[row]), total, rtol=1e-6)
        assert batch.discount is not None
        np.testing.assert_allclose(float(batch.discount[row]), gamma**m, rtol=1e-6)
        assert float(batch.terminated[row]) == float(naive.terminated[j])
        np.testing.assert_array_equal(batch.obs[row].numpy(), naive.obs[i])
        np.testing.assert_array_equal(batch.next_obs[row].numpy(), naive.next_obs[j])
        np.testing.assert_array_equal(batch.action[row].numpy(), naive.action[i])
    # sample() with n_step draws the same rows as without and returns the same structure
    drawn = buf.sample(64, torch.Generator().manual_seed(3), n_step=n_step, gamma=gamma)
    assert drawn.obs.shape == (64, 9, *SHAPE[1:])
    assert (drawn.discount is None) == (n_step == 1)


def test_add_segment_rebuilds_runs_that_start_mid_episode() -> None:
    """Logged runs start at any stacked observation (mid-episode, after a gap): each episode
    goes in as two segments split at a random step, and every transition equals the naive one;
    the ring wraps, so old segments are evicted whole or in part along the way."""
    buf = FrameReplay(30, SHAPE, 3, act_dim=ACT_DIM)
    naive, source = Naive(3), Source()
    rng = np.random.default_rng(4)
    for i in range(25):
        length = int(rng.integers(1, 9))
        ep = source.episode(length, ["terminated", "truncated", None][i % 3])
        first = len(naive)
        naive.reset(ep.frames[0], ep.states[0])
        for k in range(length):
            ends = (bool(ep.terminated[k]), bool(ep.truncated[k]))
            naive.step(ep.action[k], ep.frames[k + 1], *ends, ep.states[k + 1])
        cut = int(rng.integers(0, length + 1))
        for lo, hi in ((0, cut), (cut, length)):
            obs0 = naive.obs[first + lo] if lo < length else naive.next_obs[first + length - 1]
            columns = (ep.action, ep.reward, ep.terminated, ep.truncated)
            buf.add_segment(obs0, ep.frames[lo + 1 : hi + 1], *(c[lo:hi] for c in columns))
        assert_live_suffix(buf, naive)
    with pytest.raises(ValueError, match="obs0 must be"):
        buf.add_segment(np.zeros((3, 6, 5), np.uint8), ep.frames[:0], *(c[:0] for c in columns))
