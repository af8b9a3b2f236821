"""A fixed-capacity replay buffer that lives on the training device.

Transitions keep ``terminated`` apart from ``truncated``: the learner stops bootstrapping only at a
true terminal state, and bootstraps through a time limit (``next_obs`` is the real last
observation, not the first of the next episode). ``truncated`` is kept for logs and tests, and
ends an n-step return (:meth:`ReplayBuffer.n_step_batch`) that still bootstraps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    discount: torch.Tensor | None = None
    """Per-sample bootstrap discount (gamma ** steps) for n-step returns; None: one step,
    the learner's gamma."""


class Transitions(NamedTuple):
    """Rows of transitions, ``[n, ...]`` arrays in row order: what the trainer's step of ``n``
    environments stores (:meth:`ReplayBuffer.extend`) and what logs are read into
    (``training.logged_data``). ``terminated`` apart from ``truncated``; ``next_obs`` is the
    observation after the step, the episode's own last one where it ended."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray


_FIELDS = Transitions._fields
_BATCH_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class ReplayBuffer:
    """Ring buffer of ``(obs, action, reward, next_obs, terminated, truncated)`` on ``device``."""

    def __init__(
        self, capacity: int, obs_dim: int, act_dim: int, device: torch.device | str = "cpu"
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.data: dict[str, torch.Tensor] = {
            "obs": torch.zeros(capacity, obs_dim, **f32),
            "action": torch.zeros(capacity, act_dim, **f32),
            "reward": torch.zeros(capacity, **f32),
            "next_obs": torch.zeros(capacity, obs_dim, **f32),
            "terminated": torch.zeros(capacity, **f32),
            "truncated": torch.zeros(capacity, **f32),
        }
        # On the CPU, numpy views of the same memory make the per-step add a few plain copies.
        self._host = (
            {k: v.numpy() for k, v in self.data.items()} if self.device.type == "cpu" else None
        )
        self.pos = 0
        self.size = 0

    @staticmethod
    def memory_needed(capacity: int, obs_dim: int, act_dim: int) -> int:
        """Bytes a buffer with these arguments holds: obs, next_obs, action and three scalars,
        float32."""
        return capacity * 4 * (2 * obs_dim + act_dim + 3)

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
    ) -> None:
        values = (obs, action, reward, next_obs, float(terminated), float(truncated))
        i = self.pos
        if self._host is not None:
            for name, v in zip(_FIELDS, values, strict=True):
                self._host[name][i] = v
        else:
            for name, v in zip(_FIELDS, values, strict=True):
                self.data[name][i] = torch.as_tensor(v, dtype=torch.float32)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def extend(self, rows: Transitions) -> None:
        """:meth:`add` for ``rows`` (``n <= capacity``), in row order: the trainer's step of
        ``n`` environments, with the ring's wrap-around."""
        n = len(rows.reward)
        if n > self.capacity:
            raise ValueError(f"{n} rows do not fit a replay of capacity {self.capacity}")
        values = rows
        idx = (np.arange(n) + self.pos) % self.capacity
        if self._host is not None:
            for name, v in zip(_FIELDS, values, strict=True):
                self._host[name][idx] = v
        else:
            rows = torch.as_tensor(idx, device=self.device)
            for name, v in zip(_FIELDS, values, strict=True):
                value = torch.as_tensor(np.asarray(v), dtype=torch.float32).to(self.device)
                self.data[name][rows] = value
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def add_batch(self, **columns: np.ndarray | torch.Tensor) -> None:
        """Append many transitions at once (e.g. from logs); columns as in :meth:`add`."""
        missing = set(_FIELDS) - set(columns)
        if missing:
            raise ValueError(f"add_batch is missing column(s): {sorted(missing)}")
        n = len(columns["reward"])
        for name in _FIELDS:
            if len(columns[name]) != n:
                raise ValueError(f"column {name} has {len(columns[name])} rows, reward has {n}")
        if n > self.capacity:  # only the newest `capacity` rows survive anyway
            columns = {k: v[-self.capacity :] for k, v in columns.items()}
            n = self.capacity
        idx = (torch.arange(n) + self.pos) % self.capacity
        for name in _FIELDS:
            value = torch.as_tensor(np.asarray(columns[name]), dtype=torch.float32)
            self.data[name][idx.to(self.device)] = value.reshape(n, *self.data[name].shape[1:]).to(
                self.device
            )
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        n_step: int = 1,
        gamma: float = 0.99,
        stride: int = 1,
    ) -> Batch:
        """Uniformly sampled transitions (with replacement), as tensors on the device; with
        ``n_step`` > 1 n-step returns from the same rows (:meth:`n_step_batch`)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        if n_step > 1:
            return self.n_step_batch(idx, n_step, gamma, stride)
        # index_select: the same rows as d[idx] with less per-call overhead than advanced indexing.
        d = self.data
        return Batch(*(torch.index_select(d[k], 0, idx) for k in _BATCH_FIELDS))

    def n_step_batch(self, idx: torch.Tensor, n_step: int, gamma: float, stride: int = 1) -> Batch:
        """N-step transitions starting at slots ``idx``.

        ``reward`` is ``sum_k gamma^k r_{t+k}`` over up to ``n_step`` steps, ``next_obs`` the
        observation after the last of them, ``terminated`` that step's and ``discount``
        ``gamma ** steps``: a termination stops the return and the bootstrap, a time limit
        stops the return and bootstraps from the episode's own last observation. The next step
        of an environment is ``stride`` rows on (``num_envs``: the trainer writes a row per
        environment per step); a return also stops at the newest row and wherever that row
        does not continue this one (its observation is not this one's ``next_obs``), so
        transitions added from logs, with gaps or another stride, never mix episodes.
        """
        d, cap = self.data, self.capacity
        idx = idx.to(self.device)
        oldest = self.pos if self.size == self.capacity else 0
        age = (idx - oldest).remainder(cap)
        last = idx
        reward = torch.index_select(d["reward"], 0, idx).clone()
        ended = torch.index_select(d["terminated"], 0, idx) + torch.index_select(
            d["truncated"], 0, idx
        )
        alive = ended == 0
        discount = torch.full_like(reward, gamma)
        for k in range(1, n_step):
            nxt = (idx + k * stride).remainder(cap)
            same = (
                torch.index_select(d["obs"], 0, nxt) == torch.index_select(d["next_obs"], 0, last)
            ).all(dim=1)
            go = alive & (age + k * stride < self.size) & same
            if not bool(go.any()):
                break
            reward = torch.where(
                go, reward + discount * torch.index_select(d["reward"], 0, nxt), reward
            )
            discount = torch.where(go, discount * gamma, discount)
            last = torch.where(go, nxt, last)
            ended = torch.index_select(d["terminated"], 0, nxt) + torch.index_select(
                d["truncated"], 0, nxt
            )
            alive = go & (ended == 0)
        return Batch(
            obs=torch.index_select(d["obs"], 0, idx),
            action=torch.index_select(d["action"], 0, idx),
            reward=reward,
            next_obs=torch.index_select(d["next_obs"], 0, last),
            terminated=torch.index_select(d["terminated"], 0, last),
            discount=discount,
        )

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The filled part only, on the CPU, for a checkpoint."""
        state: dict[str, torch.Tensor | int] = {
            k: v[: self.size].cpu().clone() for k, v in self.data.items()
        }
        state["pos"] = self.pos
        state["size"] = self.size
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """A saved replay; into a larger ring (a resumed run with more steps) a full one goes
        oldest row first, so new rows follow it instead of overwriting its oldest."""
        size, pos = int(state["size"]), int(state["pos"])
        if size > self.capacity:
            raise ValueError(f"saved replay holds {size} transitions, capacity is {self.capacity}")
        order = None
        if size < self.capacity and pos != size:  # saved from a full ring: oldest at pos
            order = torch.cat([torch.arange(pos, size), torch.arange(0, pos)])
            pos = size
        for k in _FIELDS:
            saved = state[k]
            assert isinstance(saved, torch.Tensor)
            if saved.shape[1:] != self.data[k].shape[1:]:
                raise ValueError(f"saved replay column {k} has shape {tuple(saved.shape)}")
            rows = saved[:size] if order is None else saved[order]
            self.data[k][:size] = rows.to(self.device)
        self.size = size
        self.pos = pos % self.capacity
