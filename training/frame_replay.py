"""A pixel replay buffer that stores each uint8 frame once.

A stacked pixel observation is ``stack`` RGB frames, ``(3 * stack, H, W)``, and consecutive
observations share ``stack - 1`` of them; ``next_obs`` shares all but one with ``obs``. Storing
``obs`` and ``next_obs`` per transition costs ``2 * stack`` frames each; this buffer keeps one
ring of frames and, per transition, the ring positions it spans, so a transition costs about
one frame.

Layout:

* ``frames``: ``(frame_capacity, 3, H, W)`` uint8, written in arrival order: the reset frame of
  each episode, then the frame after each step.
* per transition (a ring of ``capacity`` rows): ``frame_pos`` ``(stack + 1,)`` int32, the ring
  positions of the ``stack`` frames of ``obs`` (oldest first) followed by the frame after the
  step; ``action`` float32, ``reward`` float32, ``terminated`` bool, ``truncated`` bool.
* optional ``state``: ``(frame_capacity, state_dim)`` float32, the low-dimensional state that
  goes with each frame (also stored once).

Why the ``stack + 1`` positions per transition rather than a per-frame episode-start index: the
episode start is resolved once when the transition is written, exactly as the env wrapper fills
its stack (at reset every slot is the reset frame, so an early transition lists the reset
frame's position several times). ``obs`` is the first ``stack`` positions and ``next_obs`` the
last ``stack``, so one gather of ``B * (stack + 1)`` frames gives both, with no arithmetic on
episode boundaries at sample time. The cost is ``4 * (stack + 1)`` bytes per transition.

Wrap-around, by eviction: an episode adds one frame more than it has steps (its reset frame), so
the frame ring is a bit larger than the transition ring (by default ``capacity // 8 + stack``
frames: no transition is lost early while episodes have at least 8 steps). Before a frame slot
is overwritten, every transition that refers to the frame in it is dropped from the old end of
the transition ring; the frames a transition refers to never go back in time across transitions,
so this is a FIFO and a sample never sees an overwritten frame. With many very short episodes
``len(buffer)`` can therefore stay below ``capacity``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from training.replay import Batch

__all__ = [
    "FrameBatch",
    "FrameReplay",
    "ReplayMemoryError",
    "available_memory",
    "check_fits",
    "format_bytes",
]

Frame = np.ndarray | torch.Tensor


class FrameBatch(NamedTuple):
    """Everything about sampled transitions; :meth:`FrameReplay.sample` returns the learner's
    :class:`~training.replay.Batch` subset of it."""

    obs: torch.Tensor  # (B, 3 * stack, H, W) uint8
    action: torch.Tensor  # (B, act_dim) float32
    reward: torch.Tensor  # (B,) float32
    next_obs: torch.Tensor  # (B, 3 * stack, H, W) uint8
    terminated: torch.Tensor  # (B,) float32, 1.0 at a true terminal state
    truncated: torch.Tensor  # (B,) float32, 1.0 at a time limit
    state: torch.Tensor | None  # (B, state_dim) float32 when the buffer has states
    next_state: torch.Tensor | None


class ReplayMemoryError(ValueError):
    """A replay buffer that would not fit in the memory available on its device."""


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, for start-up messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: free CUDA memory, or ``MemAvailable``
    from ``/proc/meminfo`` (what the kernel can hand out without swapping) for the CPU. None
    where it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:  # other Unixes: free physical pages, an underestimate (no page cache)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits(bytes_needed: int, device: torch.device | str = "cpu") -> int | None:
    """Raise :class:`ReplayMemoryError` if ``bytes_needed`` exceeds the memory available on
    ``device``; return the available bytes (None where unknown, and then nothing is refused).

    Call it before building the buffer: CPU pages are only committed as frames arrive, so an
    oversized buffer would otherwise fail hours into a run instead of at start.
    """
    dev = torch.device(device)
    available = available_memory(dev)
    if available is not None and bytes_needed > available:
        raise ReplayMemoryError(
            f"replay buffer needs {bytes_needed:,} bytes ({format_bytes(bytes_needed)}) but only "
            f"{available:,} bytes ({format_bytes(available)}) are available on {dev}"
        )
    return available


def _default_frame_capacity(capacity: int, stack: int) -> int:
    return capacity + capacity // 8 + stack


class FrameReplay:
    """Ring buffer of pixel transitions on ``device`` that stores each frame once.

    Feed it like the env: :meth:`start_episode` with the reset frame, then :meth:`add` with the
    frame after each step; the stacked observations are implicit. :meth:`sample` returns a
    :class:`~training.replay.Batch` with uint8 ``obs``/``next_obs`` of shape
    ``(B, 3 * stack, H, W)``.
    """

    def __init__(
        self,
        capacity: int,
        frame_shape: tuple[int, int, int] = (3, 64, 64),
        stack: int = 3,
        *,
        act_dim: int,
        device: torch.device | str = "cpu",
        state_dim: int | None = None,
        frame_capacity: int | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if stack <= 0:
            raise ValueError(f"frame stack must be positive, got {stack}")
        if len(frame_shape) != 3:
            raise ValueError(f"frame_shape must be (C, H, W), got {frame_shape}")
        if frame_capacity is None:
            frame_capacity = _default_frame_capacity(capacity, stack)
        if frame_capacity < stack + 1:  # one transition spans stack + 1 frames
            raise ValueError(f"frame_capacity must be at least stack + 1, got {frame_capacity}")
        self.capacity = capacity
        self.frame_capacity = frame_capacity
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.stack = stack
        self.act_dim = act_dim
        self.state_dim = state_dim
        self.obs_shape = (self.frame_shape[0] * stack, *self.frame_shape[1:])
        self.device = torch.device(device)
        dev = self.device
        # Frames are never read before written, so leave the (large) ring uninitialised.
        self.frames = torch.empty(frame_capacity, *self.frame_shape, dtype=torch.uint8, device=dev)
        self.states = (
            torch.zeros(frame_capacity, state_dim, dtype=torch.float32, device=dev)
            if state_dim is not None
            else None
        )
        self.data: dict[str, torch.Tensor] = {
            "frame_pos": torch.zeros(capacity, stack + 1, dtype=torch.int32, device=dev),
            "action": torch.zeros(capacity, act_dim, dtype=torch.float32, device=dev),
            "reward": torch.zeros(capacity, dtype=torch.float32, device=dev),
            "terminated": torch.zeros(capacity, dtype=torch.bool, device=dev),
            "truncated": torch.zeros(capacity, dtype=torch.bool, device=dev),
        }
        # Host-side copy of each transition's oldest frame, as an absolute frame number: eviction
        # reads it every step and must not synchronise with a GPU.
        self._oldest = np.zeros(capacity, dtype=np.int64)
        # On the CPU, numpy views of the same memory make the per-step writes plain copies.
        self._host = (
            {k: v.numpy() for k, v in self.data.items()} if self.device.type == "cpu" else None
        )
        self._host_frames = self.frames.numpy() if self.device.type == "cpu" else None
        self.tail = 0  # ring row of the oldest live transition
        self.size = 0
        self.frames_written = 0  # absolute number of the next frame; its slot is n % F
        # Absolute frame numbers of the current episode's stack (oldest first); None between
        # episodes, so a step without a reset is refused instead of stacking across episodes.
        self._stack: list[int] | None = None

    # -- sizes --------------------------------------------------------------------------------
    @staticmethod
    def memory_needed(
        capacity: int,
        frame_shape: tuple[int, int, int] = (3, 64, 64),
        stack: int = 3,
        act_dim: int = 1,
        state_dim: int | None = None,
        frame_capacity: int | None = None,
    ) -> int:
        """Bytes a buffer with these arguments holds (device tensors plus host bookkeeping)."""
        if frame_capacity is None:
            frame_capacity = _default_frame_capacity(capacity, stack)
        frame_bytes = int(np.prod(frame_shape))
        per_frame = frame_bytes + 4 * (state_dim or 0)
        # frame_pos int32, action, reward float32, terminated and truncated bool, oldest int64
        per_transition = 4 * (stack + 1) + 4 * act_dim + 4 + 1 + 1 + 8
        return frame_capacity * per_frame + capacity * per_transition

    @property
    def nbytes(self) -> int:
        tensors = [self.frames, *self.data.values()]
        if self.states is not None:
            tensors.append(self.states)
        return sum(t.numel() * t.element_size() for t in tensors) + self._oldest.nbytes

    def __len__(self) -> int:
        return self.size

    # -- writing ------------------------------------------------------------------------------
    def _check_frame(self, frame: Frame) -> Frame:
        if isinstance(frame, torch.Tensor):
            ok = frame.dtype == torch.uint8
        else:
            frame = np.asarray(frame)
            ok = frame.dtype == np.uint8
        if not ok or tuple(frame.shape) != self.frame_shape:
            raise ValueError(
                f"expected a uint8 frame of shape {self.frame_shape}, "
                f"got {frame.dtype} {tuple(frame.shape)}"
            )
        return frame

    def _drop_oldest(self, n: int) -> None:
        self.tail = (self.tail + n) % self.capacity
        self.size -= n

    def _evict_frames_upto(self, lost: int) -> None:
        """Drop the oldest transitions that refer to frame ``lost`` or older (its slot is about
        to be overwritten). Their oldest frames never decrease along the ring: binary search."""
        if self.size == 0 or self._oldest[self.tail] > lost:
            return
        oldest, tail, cap = self._oldest, self.tail, self.capacity
        lo, hi = 1, self.size  # the first k in [1, size] with oldest[tail + k] > lost, or size
        while lo < hi:
            mid = (lo + hi) // 2
            if oldest[(tail + mid) % cap] <= lost:
                lo = mid + 1
            else:
                hi = mid
        self._drop_oldest(lo)

    def _write_frame(self, frame: Frame, state: np.ndarray | torch.Tensor | None) -> int:
        frame = self._check_frame(frame)
        if (self.states is None) != (state is None):
            raise ValueError("pass a state with each frame exactly when the buffer has state_dim")
        n = self.frames_written
        self._evict_frames_upto(n - self.frame_capacity)
        slot = n % self.frame_capacity
        if self._host_frames is not None and not isinstance(frame, torch.Tensor):
            self._host_frames[slot] = frame
        else:
            self.frames[slot].copy_(torch.as_tensor(frame))
        if self.states is not None:
            self.states[slot] = torch.as_tensor(state, dtype=torch.float32)
        self.frames_written = n + 1
        return n

    def start_episode(self, first_frame: Frame, state: np.ndarray | None = None) -> None:
        """Store the reset frame; the first observation is ``stack`` copies of it, as the env
        wrapper builds it."""
        n = self._write_frame(first_frame, state)
        self._stack = [n] * self.stack

    def add(
        self,
        action: np.ndarray,
        reward: float,
        next_frame: Frame,
        terminated: bool,
        truncated: bool,
        next_state: np.ndarray | None = None,
    ) -> None:
        """Store one step: the action taken from the current stacked observation and the frame
        it produced. After ``terminated`` or ``truncated``, :meth:`start_episode` comes next."""
        if self._stack is None:
            raise RuntimeError("FrameReplay.add needs start_episode first (and after each end)")
        n = self._write_frame(next_frame, next_state)
        if self.size == self.capacity:
            self._drop_oldest(1)
        i = (self.tail + self.size) % self.capacity
        cols = [*self._stack, n]
        fcap = self.frame_capacity
        pos = [c % fcap for c in cols]
        if self._host is not None:
            h = self._host
            h["frame_pos"][i] = pos
            h["action"][i] = action
            h["reward"][i] = reward
            h["terminated"][i] = terminated
            h["truncated"][i] = truncated
        else:
            d = self.data
            d["frame_pos"][i] = torch.tensor(pos, dtype=torch.int32)
            d["action"][i] = torch.as_tensor(action, dtype=torch.float32)
            d["reward"][i] = float(reward)
            d["terminated"][i] = bool(terminated)
            d["truncated"][i] = bool(truncated)
        self._oldest[i] = cols[0]
        self.size += 1
        self._stack = None if terminated or truncated else cols[1:]

    def add_episode(
        self,
        frames: np.ndarray | torch.Tensor,
        action: np.ndarray | torch.Tensor,
        reward: np.ndarray | torch.Tensor,
        terminated: np.ndarray | torch.Tensor,
        truncated: np.ndarray | torch.Tensor,
        states: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Append one episode at once (e.g. from logs): ``frames`` ``(T + 1, 3, H, W)`` is the
        reset frame then the frame after each of the ``T`` steps; the step columns have ``T``
        rows. The same as :meth:`start_episode` plus ``T`` calls of :meth:`add`, vectorised.

        The unit is an episode rather than arbitrary rows because transitions share frames: a
        row is only meaningful next to the steps before it.
        """
        t = len(reward)
        if len(frames) != t + 1:
            raise ValueError(f"an episode of {t} steps has {t + 1} frames, got {len(frames)}")
        st = self.stack
        steps = np.arange(t)
        # Frames of each step relative to the episode: the obs stack (clamped to the reset
        # frame, 0) and the frame after the step.
        cols = np.maximum(steps[:, None] + np.arange(1 - st, 1), 0)
        cols = np.concatenate([cols, steps[:, None] + 1], axis=1)
        start = np.zeros(st, dtype=np.int64)  # the stack if there are no steps: the reset frame
        self._append(frames, cols, start, action, reward, terminated, truncated, states)

    def add_segment(
        self,
        obs0: np.ndarray | torch.Tensor,
        frames: np.ndarray | torch.Tensor,
        action: np.ndarray | torch.Tensor,
        reward: np.ndarray | torch.Tensor,
        terminated: np.ndarray | torch.Tensor,
        truncated: np.ndarray | torch.Tensor,
    ) -> None:
        """Append consecutive steps that start from any stacked observation ``obs0``
        ``(3 * stack, H, W)`` (a logged run that starts mid-episode or after a gap), with
        ``frames`` ``(T, 3, H, W)`` the frame after each step. ``obs0``'s frames are stored
        once each (a reset stack repeats its frame: ``stack - 1`` spare frames per segment)."""
        if self.states is not None:
            raise ValueError("add_segment has no states; this buffer stores one per frame")
        st = self.stack
        obs0_t = torch.as_tensor(np.asarray(obs0) if not torch.is_tensor(obs0) else obs0)
        if tuple(obs0_t.shape) != self.obs_shape:
            raise ValueError(f"obs0 must be {self.obs_shape}, got {tuple(obs0_t.shape)}")
        frames_t = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        seq = torch.cat([obs0_t.reshape(st, *self.frame_shape), frames_t.to(obs0_t.dtype)])
        t = len(reward)
        cols = np.arange(t)[:, None] + np.arange(st + 1)
        self._append(seq, cols, np.arange(st), action, reward, terminated, truncated, None)

    def _append(
        self,
        frames: np.ndarray | torch.Tensor,
        cols: np.ndarray,
        start: np.ndarray,
        action: np.ndarray | torch.Tensor,
        reward: np.ndarray | torch.Tensor,
        terminated: np.ndarray | torch.Tensor,
        truncated: np.ndarray | torch.Tensor,
        states: np.ndarray | torch.Tensor | None,
    ) -> None:
        """Write ``frames`` as the next frame numbers and ``len(reward)`` transitions whose
        ``stack + 1`` frames are ``cols`` (relative to the first of ``frames``, rising row by
        row); ``start`` is the current stack afterwards when there are no steps."""
        t = len(reward)
        for name, col in (("action", action), ("terminated", terminated), ("truncated", truncated)):
            if len(col) != t:
                raise ValueError(f"column {name} has {len(col)} rows, reward has {t}")
        if (self.states is None) != (states is None):
            raise ValueError("pass states exactly when the buffer has state_dim")
        frames_t = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        if frames_t.dtype != torch.uint8 or tuple(frames_t.shape[1:]) != self.frame_shape:
            raise ValueError(
                f"expected uint8 frames of shape (N, *{self.frame_shape}), "
                f"got {frames_t.dtype} {tuple(frames_t.shape)}"
            )
        fcap, cap = self.frame_capacity, self.capacity
        n0, n_frames = self.frames_written, len(frames_t)
        # A run longer than the frame ring overwrites its own first frames.
        first_frame = max(0, n_frames - fcap)
        first_step = max(int(np.searchsorted(cols[:, 0], first_frame)), t - cap)
        self._evict_frames_upto(n0 + n_frames - 1 - fcap)
        dev = self.device
        absolute = torch.arange(n0 + first_frame, n0 + n_frames)
        slots = (absolute % fcap).to(dev)
        self.frames[slots] = frames_t[first_frame:].to(dev)
        if self.states is not None:
            states_t = torch.as_tensor(np.asarray(states), dtype=torch.float32)
            self.states[slots] = states_t[first_frame:].to(dev)
        self.frames_written = n0 + n_frames

        m = t - first_step
        if self.size + m > cap:
            self._drop_oldest(self.size + m - cap)
        rows_np = (self.tail + self.size + np.arange(m)) % cap
        rows = torch.from_numpy(rows_np).to(dev)
        kept = cols[first_step:] + n0
        d = self.data
        d["frame_pos"][rows] = torch.from_numpy((kept % fcap).astype(np.int32)).to(dev)
        for name, col, dtype in (
            ("action", action, torch.float32),
            ("reward", reward, torch.float32),
            ("terminated", terminated, torch.bool),
            ("truncated", truncated, torch.bool),
        ):
            value = torch.as_tensor(np.asarray(col), dtype=dtype)[first_step:]
            d[name][rows] = value.reshape(m, *d[name].shape[1:]).to(dev)
        self._oldest[rows_np] = kept[:, 0]
        self.size += m
        ended = t > 0 and bool(np.asarray(terminated)[-1] or np.asarray(truncated)[-1])
        if ended:
            self._stack = None
        elif t == 0:
            self._stack = [n0 + int(c) for c in start]
        else:
            self._stack = [int(c) for c in kept[-1, 1:]]

    # -- reading ------------------------------------------------------------------------------
    def gather(self, rows: torch.Tensor) -> FrameBatch:
        """Transitions by age, ``rows`` in ``[0, len)`` with 0 the oldest live one.

        ``obs`` and ``next_obs`` are views of one gathered ``(B, stack + 1, 3, H, W)`` tensor
        (they share ``stack - 1`` frames): read them, do not modify them in place.
        """
        idx = rows.to(self.device)
        if self.tail:
            idx = (idx + self.tail).remainder_(self.capacity)
        d = self.data
        pos = torch.index_select(d["frame_pos"], 0, idx)  # (B, stack + 1)
        b, s = idx.shape[0], self.stack
        frames = torch.index_select(self.frames, 0, pos.view(-1)).view(b, s + 1, *self.frame_shape)
        obs = frames[:, :s].reshape(b, *self.obs_shape)  # merges stack and channel: a view
        next_obs = frames[:, 1:].reshape(b, *self.obs_shape)
        state = next_state = None
        if self.states is not None:
            state = torch.index_select(self.states, 0, pos[:, s - 1])
            next_state = torch.index_select(self.states, 0, pos[:, s])
        return FrameBatch(
            obs=obs,
            action=torch.index_select(d["action"], 0, idx),
            reward=torch.index_select(d["reward"], 0, idx),
            next_obs=next_obs,
            terminated=torch.index_select(d["terminated"], 0, idx).float(),
            truncated=torch.index_select(d["truncated"], 0, idx).float(),
            state=state,
            next_state=next_state,
        )

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        n_step: int = 1,
        gamma: float = 0.99,
    ) -> Batch:
        """Uniformly sampled transitions (with replacement) for the learner, on the device.

        The state buffer's :class:`~training.replay.Batch`: uint8 stacks, float ``terminated``.
        ``truncated`` and the optional states come from :meth:`sample_full`. With ``n_step``
        > 1 the batch holds n-step returns instead (see :meth:`n_step_batch`).
        """
        rows = self._draw(batch_size, generator)
        if n_step > 1:
            return self.n_step_batch(rows, n_step, gamma)
        b = self.gather(rows)
        return Batch(b.obs, b.action, b.reward, b.next_obs, b.terminated)

    def n_step_batch(self, rows: torch.Tensor, n_step: int, gamma: float) -> Batch:
        """N-step transitions starting at ``rows`` (by age, as :meth:`gather`).

        ``reward`` is ``sum_k gamma^k r_{t+k}`` over up to ``n_step`` steps, ``next_obs`` the
        observation after the last of them, ``terminated`` that step's, and ``discount``
        ``gamma ** steps`` for the bootstrap. A return stops early at an episode end
        (terminated or truncated), at the newest transition, and where the next row does not
        continue this one. Continuity is read from the frames themselves: row ``t + 1``
        continues row ``t`` exactly when its observation's frames are ``t``'s next
        observation's, so episodes added from logs with gaps are handled like any other.
        """
        idx = rows.to(self.device)
        d, s, cap = self.data, self.stack, self.capacity
        first = (idx + self.tail).remainder_(cap)
        last = first
        pos_last = torch.index_select(d["frame_pos"], 0, last)
        reward = torch.index_select(d["reward"], 0, last).clone()
        ended = torch.index_select(d["terminated"], 0, last) | torch.index_select(
            d["truncated"], 0, last
        )
        alive = ~ended
        discount = torch.full_like(reward, gamma)
        for k in range(1, n_step):
            in_range = idx + k < self.size
            nxt = (idx + k + self.tail).remainder_(cap)
            pos_next = torch.index_select(d["frame_pos"], 0, nxt)
            same = (pos_next[:, :s] == pos_last[:, 1:]).all(dim=1)
            go = alive & in_range & same
            if not bool(go.any()):
                break
            r = torch.index_select(d["reward"], 0, nxt)
            reward = torch.where(go, reward + discount * r, reward)
            discount = torch.where(go, discount * gamma, discount)
            last = torch.where(go, nxt, last)
            pos_last = torch.where(go[:, None], pos_next, pos_last)
            ended = torch.index_select(d["terminated"], 0, nxt) | torch.index_select(
                d["truncated"], 0, nxt
            )
            alive = go & ~ended
        pos_first = torch.index_select(d["frame_pos"], 0, first)
        b = idx.shape[0]

        def stack_of(pos: torch.Tensor) -> torch.Tensor:
            frames = torch.index_select(self.frames, 0, pos.reshape(-1))
            return frames.view(b, *self.obs_shape)

        return Batch(
            obs=stack_of(pos_first[:, :s]),
            action=torch.index_select(d["action"], 0, first),
            reward=reward,
            next_obs=stack_of(pos_last[:, 1:]),
            terminated=torch.index_select(d["terminated"], 0, last).float(),
            discount=discount,
        )

    def sample_full(self, batch_size: int, generator: torch.Generator | None = None) -> FrameBatch:
        """As :meth:`sample` (the same draws for the same generator state) with every field."""
        return self.gather(self._draw(batch_size, generator))

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The live part only, on the CPU, oldest first: the frames from the oldest one a live
        transition or the current stack refers to, and the transitions with frame numbers
        relative to that first saved frame."""
        fcap = self.frame_capacity
        firsts = []
        if self.size:
            firsts.append(int(self._oldest[self.tail]))
        if self._stack is not None:
            firsts.append(self._stack[0])
        lo = min(firsts, default=self.frames_written)
        dev = self.device
        slots = (torch.arange(lo, self.frames_written) % fcap).to(dev)
        rows = ((torch.arange(self.size) + self.tail) % self.capacity).to(dev)
        d = {k: v[rows].cpu() for k, v in self.data.items()}  # fancy indexing copies
        pos = d["frame_pos"].long()
        state: dict[str, torch.Tensor | int] = {
            "frames": self.frames[slots].cpu(),
            "frame_index": (pos - lo % fcap).remainder_(fcap),  # relative to the first frame
            "action": d["action"],
            "reward": d["reward"],
            "terminated": d["terminated"],
            "truncated": d["truncated"],
            "stack": torch.tensor([] if self._stack is None else [c - lo for c in self._stack]),
            "size": self.size,
        }
        if self.states is not None:
            state["states"] = self.states[slots].cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        size = int(state["size"])
        frames, index = state["frames"], state["frame_index"]
        assert isinstance(frames, torch.Tensor) and isinstance(index, torch.Tensor)
        if size > self.capacity:
            raise ValueError(f"saved replay holds {size} transitions, capacity is {self.capacity}")
        if len(frames) > self.frame_capacity:
            raise ValueError(
                f"saved replay holds {len(frames)} frames, frame_capacity is {self.frame_capacity}"
            )
        if tuple(frames.shape[1:]) != self.frame_shape or index.shape[1:] != (self.stack + 1,):
            raise ValueError(
                f"saved replay has frames {tuple(frames.shape[1:])} in stacks of "
                f"{index.shape[1] - 1}, this buffer {self.frame_shape} in stacks of {self.stack}"
            )
        if (self.states is None) != ("states" not in state):
            raise ValueError("saved replay and this buffer disagree on having states")
        k = len(frames)
        self.frames[:k] = frames.to(self.device)
        if self.states is not None:
            saved_states = state["states"]
            assert isinstance(saved_states, torch.Tensor)
            self.states[:k] = saved_states.to(self.device)
        # Frame i of the checkpoint becomes absolute frame i, in slot i.
        self.data["frame_pos"][:size] = index.to(torch.int32).to(self.device)
        for name in ("action", "reward", "terminated", "truncated"):
            saved = state[name]
            assert isinstance(saved, torch.Tensor)
            if saved.shape[1:] != self.data[name].shape[1:]:
                raise ValueError(f"saved replay column {name} has shape {tuple(saved.shape)}")
            self.data[name][:size] = saved.to(self.data[name].dtype).to(self.device)
        self._oldest[:size] = index[:, 0].numpy()
        self.tail, self.size, self.frames_written = 0, size, k
        stack = state["stack"]
        assert isinstance(stack, torch.Tensor)
        self._stack = [int(c) for c in stack.tolist()] if stack.numel() else None
