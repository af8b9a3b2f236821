import numpy as np
import pytest
import torch

from training.replay import ReplayBuffer, Transitions


def _add(buf: ReplayBuffer, i: int, terminated: bool = False, truncated: bool = False) -> None:
    buf.add(np.full(3, i), np.full(2, -i), float(i), np.full(3, i + 0.5), terminated, truncated)


def test_wraps_around_and_overwrites_oldest() -> None:
    buf = ReplayBuffer(5, obs_dim=3, act_dim=2)
    for i in range(7):
        _add(buf, i)
    assert len(buf) == 5
    assert buf.pos == 2
    # slots 0 and 1 now hold transitions 5 and 6; 2..4 still hold 2..4
    assert buf.data["reward"].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert torch.equal(buf.data["next_obs"][1], torch.full((3,), 6.5))
    assert torch.equal(buf.data["action"][0], torch.full((2,), -5.0))


def test_samples_only_filled_rows() -> None:
    buf = ReplayBuffer(100, obs_dim=3, act_dim=2)
    for i in range(1, 4):
        _add(buf, i)
    batch = buf.sample(256, generator=torch.Generator().manual_seed(0))
    assert set(batch.reward.tolist()) == {1.0, 2.0, 3.0}
    # each sampled row is one consistent transition
    assert torch.equal(batch.obs[:, 0], batch.reward)
    assert torch.equal(batch.next_obs[:, 0], batch.reward + 0.5)


def test_terminated_and_truncated_kept_apart() -> None:
    buf = ReplayBuffer(10, obs_dim=3, act_dim=2)
    _add(buf, 1, terminated=True)
    _add(buf, 2, truncated=True)
    _add(buf, 3)
    assert buf.data["terminated"][:3].tolist() == [1.0, 0.0, 0.0]
    assert buf.data["truncated"][:3].tolist() == [0.0, 1.0, 0.0]
    batch = buf.sample(64, generator=torch.Generator().manual_seed(1))
    # the learner's done mask is `terminated` only: a time limit keeps bootstrapping
    assert torch.equal(batch.terminated, (batch.reward == 1.0).float())


def test_add_batch_matches_add_and_wraps() -> None:
    a = ReplayBuffer(4, obs_dim=3, act_dim=2)
    b = ReplayBuffer(4, obs_dim=3, act_dim=2)
    for i in range(6):
        _add(a, i, terminated=i == 3, truncated=i == 4)
    idx = np.arange(6)
    b.add_batch(
        obs=np.repeat(idx[:, None], 3, 1),
        action=-np.repeat(idx[:, None], 2, 1),
        reward=idx.astype(float),
        next_obs=np.repeat(idx[:, None], 3, 1) + 0.5,
        terminated=idx == 3,
        truncated=idx == 4,
    )
    assert len(b) == len(a) == 4
    for k in a.data:
        assert set(map(tuple, a.data[k].reshape(4, -1).tolist())) == set(
            map(tuple, b.data[k].reshape(4, -1).tolist())
        ), k


def test_state_dict_round_trip() -> None:
    a = ReplayBuffer(8, obs_dim=3, act_dim=2)
    for i in range(5):
        _add(a, i)
    b = ReplayBuffer(8, obs_dim=3, act_dim=2)
    b.load_state_dict(a.state_dict())
    assert (b.pos, len(b)) == (a.pos, len(a))
    for k in a.data:
        assert torch.equal(a.data[k], b.data[k])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 3, 2)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, 3, 2).sample(2)
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer(4, 3, 2).add_batch(obs=np.zeros((1, 3)))


# -- n-step returns ------------------------------------------------------------------------------
def _episode_buffer(capacity: int = 16) -> ReplayBuffer:
    """Three episodes, one environment: A terminates after 3 steps, B is truncated after 2,
    C is still running after 2. Observation t is [t, t, t]; reward t + 1. Each episode's last
    observation equals the next one's first (``100 + t`` where the flags end an episode would
    do too), so only the flags can stop a return there."""
    buf = ReplayBuffer(capacity, obs_dim=3, act_dim=2)
    ends = {2: "terminated", 4: "truncated"}
    for t in range(7):
        next_obs = np.full(3, t + 1.0)
        terminated, truncated = ends.get(t) == "terminated", ends.get(t) == "truncated"
        buf.add(np.full(3, float(t)), np.zeros(2), t + 1.0, next_obs, terminated, truncated)
    return buf


def test_n_step_returns_match_a_hand_computation() -> None:
    """gamma 0.5, n 3: a return stops at a termination (no bootstrap), at a time limit
    (bootstraps from the episode's own last observation), and at the newest row."""
    buf = _episode_buffer()
    b = buf.n_step_batch(torch.arange(7), n_step=3, gamma=0.5)
    g = 0.5
    #          start: rewards summed                 bootstrap obs   terminated  discount
    by_hand = [
        (1 + g * 2 + g * g * 3, 3.0, 1.0, g**3),  # A0: A0 A1 A2, A2 terminates
        (2 + g * 3, 3.0, 1.0, g**2),  # A1
        (3.0, 3.0, 1.0, g),  # A2
        (4 + g * 5, 5.0, 0.0, g**2),  # B3: B3 B4, B4 truncated: bootstrap from its last obs
        (5.0, 5.0, 0.0, g),  # B4
        (6 + g * 7, 7.0, 0.0, g**2),  # C5: C5 C6, the newest row
        (7.0, 7.0, 0.0, g),  # C6
    ]
    for i, (ret, last, term, disc) in enumerate(by_hand):
        assert float(b.reward[i]) == pytest.approx(ret), i
        assert float(b.next_obs[i, 0]) == last, i
        assert float(b.terminated[i]) == term, i
        assert float(b.discount[i]) == pytest.approx(disc), i
    assert torch.equal(b.obs[:, 0], torch.arange(7.0))  # the first step's obs and action


def test_n_step_follows_each_environment_by_stride_and_never_wraps_into_the_oldest() -> None:
    """Two environments write interleaved rows (stride 2); in a full ring the newest row is
    followed by the oldest, which belongs to no episode of it."""
    buf = ReplayBuffer(6, obs_dim=1, act_dim=1)
    for t in range(4):  # env 0: obs 0, 1, 2, 3; env 1: 10, 11, 12, 13; no ends
        buf.extend(Transitions(
            np.array([[t], [10.0 + t]]), np.zeros((2, 1)), np.array([1.0, 2.0]),
            np.array([[t + 1.0], [11.0 + t]]), np.zeros(2), np.zeros(2),
        ))  # fmt: skip
    # the ring holds steps 1..3 of both (slots 2..5 then 0, 1): step 1 is the oldest
    b = buf.n_step_batch(torch.arange(6), n_step=3, gamma=0.5, stride=2)
    for i, s0 in enumerate(buf.data["obs"][:, 0].tolist()):
        k = min(3, 4 - int(s0 % 10))  # this environment's steps left in the ring, up to 3
        reward = (1.0 if s0 < 10 else 2.0) * sum(0.5**j for j in range(k))
        assert float(b.reward[i]) == pytest.approx(reward), (i, s0)
        assert float(b.next_obs[i, 0]) == (4.0 if s0 < 10 else 14.0), (i, s0)
        assert float(b.discount[i]) == pytest.approx(0.5**k), (i, s0)
    # a stream that returns to where the oldest row starts: only the ring's order stops it
    ring = ReplayBuffer(4, obs_dim=1, act_dim=1)
    for t in range(6):  # obs t % 4: slots hold t = 4, 5, 2, 3; the newest (5) ends at obs 2
        ring.add(np.array([t % 4]), np.zeros(1), 1.0, np.array([(t + 1) % 4]), False, False)
    newest = ring.n_step_batch(torch.tensor([1]), n_step=3, gamma=0.5)
    assert float(newest.reward[0]) == 1.0 and float(newest.discount[0]) == 0.5
    # a wrong stride (rows of the other environment) is caught by the observation check
    one = buf.n_step_batch(torch.arange(6), n_step=3, gamma=0.5, stride=1)
    assert torch.equal(one.reward, buf.data["reward"]) and torch.equal(
        one.next_obs, buf.data["next_obs"]
    )


def test_one_step_sampling_is_unchanged() -> None:
    buf = _episode_buffer()
    plain = buf.sample(32, torch.Generator().manual_seed(5))
    same = buf.sample(32, torch.Generator().manual_seed(5), n_step=1, gamma=0.5, stride=3)
    assert same.discount is None and plain.discount is None
    for a, b in zip(plain, same, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    n1 = buf.n_step_batch(torch.arange(7), n_step=1, gamma=0.5)
    assert torch.equal(n1.reward, buf.data["reward"][:7])
    assert torch.equal(n1.next_obs, buf.data["next_obs"][:7])
    # n-step draws the same rows as one-step sampling for the same generator
    drawn = buf.sample(32, torch.Generator().manual_seed(5), n_step=3, gamma=0.5)
    assert torch.equal(drawn.obs, plain.obs) and torch.equal(drawn.action, plain.action)
