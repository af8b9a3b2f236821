"""What ``ddpg train`` and ``ddpg retrain`` both learn with: the device, the replay buffer sized
and checked for the config, the seeded agent, and batches drawn the way the config asks.

One construction order for both (threads, device, ``torch.manual_seed(cfg.seed)``, replay,
agent), so equal seeds give equal initial networks whichever command builds them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from control_node.config import ConfigError
from models.spec import RobotSpec
from training.agent import DDPGAgent
from training.config import TrainConfig
from training.frame_replay import FrameReplay, ReplayMemoryError, check_fits, format_bytes
from training.replay import Batch, ReplayBuffer
from training.threads import ThreadPolicy

Replay = ReplayBuffer | FrameReplay


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine")
    return device


@dataclass
class Learner:
    device: torch.device
    replay: Replay
    replay_bytes: int
    agent: DDPGAgent
    threads: ThreadPolicy


def make_learner(cfg: TrainConfig, spec: RobotSpec, frames: int | None = None) -> Learner:
    """The replay and the agent for ``spec``'s observations and actions. ``frames``: a pixel
    replay's frame ring, when the default (capacity and an eighth) is not enough (``ddpg
    retrain`` fills it with runs of a few steps)."""
    threads = ThreadPolicy(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    replay, need = _make_replay(cfg, spec, device, frames)
    agent = DDPGAgent(cfg, spec.obs_shape, spec.act_low, spec.act_high, device)
    return Learner(device, replay, need, agent, threads)


def _make_replay(
    cfg: TrainConfig, spec: RobotSpec, device: torch.device, frames: int | None
) -> tuple[Replay, int]:
    """The replay buffer, its memory stated up front; refused when it cannot fit."""
    capacity = min(cfg.buffer_size, cfg.steps)
    pixel_spec = cfg.pixel_spec()
    if pixel_spec is not None:
        args = (capacity, pixel_spec.frame_shape, pixel_spec.stack)
        need = FrameReplay.memory_needed(*args, act_dim=spec.act_dim, frame_capacity=frames)
    else:
        need = ReplayBuffer.memory_needed(capacity, spec.obs_dim, spec.act_dim)
    try:
        check_fits(need, device)
    except ReplayMemoryError as e:
        raise ConfigError(f"buffer_size = {capacity}: {e}; lower --buffer-size") from None
    print(  # always, also without a progress bar: a user should know before it fills
        f"ddpg train: replay {capacity:,} transitions, {format_bytes(need)} on "
        f"{device} ({need / capacity:,.0f} bytes per transition)",
        file=sys.stderr,
    )
    if pixel_spec is not None:
        replay = FrameReplay(*args, act_dim=spec.act_dim, device=device, frame_capacity=frames)
        return replay, need
    return ReplayBuffer(capacity, spec.obs_dim, spec.act_dim, device), need


def sample(
    replay: Replay,
    cfg: TrainConfig,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """A learner's batch from the replay (n-step returns when the config asks; a state
    replay's environment follows itself every ``num_envs`` rows, as the trainer writes them)."""
    n = batch_size or cfg.batch_size
    if isinstance(replay, FrameReplay):
        return replay.sample(n, generator, n_step=cfg.n_step, gamma=cfg.gamma)
    return replay.sample(n, generator, n_step=cfg.n_step, gamma=cfg.gamma, stride=cfg.num_envs)
