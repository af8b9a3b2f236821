import numpy as np
import pytest
import torch

from training.replay import ReplayBuffer


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
