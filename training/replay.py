"""A fixed-capacity replay buffer that lives on the training device.

Transitions keep ``terminated`` apart from ``truncated``: the learner stops bootstrapping only at a
true terminal state, and bootstraps through a time limit (``next_obs`` is the real last
observation, not the first of the next episode). ``truncated`` is kept for logs and tests.
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


_FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
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

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """Uniformly sampled transitions (with replacement), as tensors on the device."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        # index_select: the same rows as d[idx] with less per-call overhead than advanced indexing.
        d = self.data
        return Batch(*(torch.index_select(d[k], 0, idx) for k in _BATCH_FIELDS))

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The filled part only, on the CPU, for a checkpoint."""
        state: dict[str, torch.Tensor | int] = {
            k: v[: self.size].cpu().clone() for k, v in self.data.items()
        }
        state["pos"] = self.pos
        state["size"] = self.size
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"saved replay holds {size} transitions, capacity is {self.capacity}")
        for k in _FIELDS:
            saved = state[k]
            assert isinstance(saved, torch.Tensor)
            if saved.shape[1:] != self.data[k].shape[1:]:
                raise ValueError(f"saved replay column {k} has shape {tuple(saved.shape)}")
            self.data[k][:size] = saved.to(self.device)
        self.size = size
        self.pos = int(state["pos"]) % self.capacity
