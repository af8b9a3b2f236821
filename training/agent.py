"""The DDPG learner: networks, targets, optimisers and one gradient update.

``update(batch) -> metrics`` is separate from the rollout so it can be tested and compiled on its
own. With ``twin_q``, ``policy_noise`` and ``policy_delay`` it is TD3; with one critic, no
smoothing and delay 1 it is the paper's DDPG; with ``simba``, ``crossq`` or ``distributional``
the critic is a :class:`~models.networks.BlockCritic` whose losses are
:mod:`training.block_update`'s (``crossq``: no target networks at all), and ``reset_every``
re-initialises networks and optimisers periodically. Metrics come back as tensors: reading them
forces a host synchronisation, so the trainer does that only when it logs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from models.networks import Actor, BlockCritic, Critic
from models.pixel_networks import PixelActor, PixelCritic, random_shift
from training import block_update
from training.config import TrainConfig
from training.distributional import support
from training.mlp_update import MlpUpdate, smooth_target_action, td_target
from training.obs_norm import ObsNormalizer
from training.replay import Batch


def build_networks(
    cfg: TrainConfig,
    obs_shape: int | tuple[int, ...],
    act_low: np.ndarray,
    act_high: np.ndarray,
) -> tuple[Actor | PixelActor, Critic | PixelCritic | BlockCritic]:
    """The actor and critic ``cfg`` describes (state MLPs, Simba/CrossQ/categorical block
    networks, or pixel networks with ``pixels``); the exporter builds the actor here too, so a
    checkpoint always fits."""
    final = cfg.final_init or None
    n_q = 2 if cfg.twin_q else 1
    if cfg.pixels:
        shape = tuple(obs_shape) if not isinstance(obs_shape, int) else (obs_shape,)
        actor: Actor | PixelActor = PixelActor(
            shape, act_low, act_high, cfg.actor_hidden, final, cfg.conv_strides, cfg.pixel_features
        )
        critic: Critic | PixelCritic = PixelCritic(
            shape,
            actor.act_dim,
            cfg.critic_hidden,
            n_q=n_q,
            action_layer=cfg.critic_action_layer,
            final_init=final,
            strides=cfg.conv_strides,
            feature_dim=cfg.pixel_features,
        )
        if cfg.shared_encoder:  # DrQ-v2: one encoder, the critic's (drawn after the actor's,
            actor.encoder = critic.encoder  # so the random draws stay as without sharing)
        return actor, critic
    obs_dim = obs_shape if isinstance(obs_shape, int) else int(np.prod(obs_shape))
    actor = Actor(
        obs_dim,
        act_low,
        act_high,
        cfg.actor_hidden,
        obs_norm=cfg.batch_norm,
        final_init=final,
        residual=cfg.simba,
    )
    if cfg.block_networks():
        norm = "batch" if cfg.crossq else "layer" if cfg.simba else "none"
        block = BlockCritic(
            obs_dim,
            actor.act_dim,
            cfg.critic_hidden,
            n_q=n_q,
            residual=cfg.simba,
            norm=norm,
            out=cfg.num_atoms if cfg.distributional else 1,
            final_init=final,
        )
        return actor, block
    critic = Critic(
        obs_dim,
        actor.act_dim,
        cfg.critic_hidden,
        n_q=n_q,
        action_layer=cfg.critic_action_layer,
        obs_norm=cfg.batch_norm,
        final_init=final,
    )
    return actor, critic


def _flatten(module: nn.Module) -> tuple[torch.Tensor, int]:
    """Make the module's parameters, then its floating-point buffers (batch-norm statistics),
    views into one new contiguous tensor; returns it and the parameter count.

    An optimiser step then is one fused Adam kernel on one tensor and a soft target update is
    one lerp, instead of a few ops per tensor with Python overhead for each.
    """
    params = list(module.parameters())
    buffers = [
        (owner, name, b)
        for owner in module.modules()
        for name, b in owner._buffers.items()
        if b is not None and b.is_floating_point()
    ]
    tensors = [p.detach() for p in params] + [b for _, _, b in buffers]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    n_params = offset
    for owner, name, b in buffers:
        owner._buffers[name] = flat[offset : offset + b.numel()].view_as(b)
        offset += b.numel()
    return flat, n_params


def _numpy_actor(actor: nn.Module) -> Callable[[np.ndarray], np.ndarray] | None:
    """The actor's eval-mode forward pass for one observation (or a batch of one row), in
    numpy on views of its CPU parameters (they follow in-place updates: optimiser steps,
    ``load_state_dict``).

    Acting happens once per environment step; at batch 1 torch's per-op dispatch costs about
    ten times this. None when the actor is not on the CPU or has layers this does not mirror.
    """
    if not isinstance(actor, Actor) or actor.action_scale.device.type != "cpu":
        return None  # pixel actors: convolutions, torch is the right tool
    norm = actor.obs_norm
    if not isinstance(norm, nn.BatchNorm1d | nn.Identity):
        return None
    steps: list[tuple[np.ndarray, np.ndarray] | None] = []  # (W^T, b) for a linear, None: ReLU
    for m in actor.body:
        if isinstance(m, nn.Linear):
            steps.append((m.weight.detach().numpy().T, m.bias.detach().numpy()))
        elif isinstance(m, nn.ReLU):
            steps.append(None)
        else:
            return None
    head_w, head_b = actor.head.weight.detach().numpy().T, actor.head.bias.detach().numpy()
    scale, bias = actor.action_scale.numpy(), actor.action_bias.numpy()
    if isinstance(norm, nn.BatchNorm1d):
        assert norm.running_mean is not None and norm.running_var is not None
        mean, var = norm.running_mean.numpy(), norm.running_var.numpy()
        gain, shift = norm.weight.detach().numpy(), norm.bias.detach().numpy()
        eps = np.float32(norm.eps)

    def act(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        if isinstance(norm, nn.BatchNorm1d):
            x = (x - mean) / np.sqrt(var + eps) * gain + shift
        for step in steps:
            if step is None:
                np.maximum(x, 0.0, out=x)
            else:
                x = x @ step[0]
                x += step[1]
        return np.tanh(x @ head_w + head_b) * scale + bias

    return act


class _FlatAdam:
    """Adam on one flat tensor: PyTorch's fused kernel called directly.

    The math and the state are ``torch.optim.Adam(fused=True)``'s (the optimizer object is kept
    for its ``state_dict``), but ``Optimizer.step`` costs about as much Python time as the
    kernel itself at these sizes, once per update, so this calls the kernel on its state.
    """

    def __init__(
        self, param: torch.Tensor, lr: float, weight_decay: float = 0.0, beta1: float = 0.9
    ) -> None:
        self.param = param
        param.grad = torch.zeros_like(param)
        self.opt = torch.optim.Adam(
            [param], lr=lr, betas=(beta1, 0.999), weight_decay=weight_decay, fused=True
        )
        self._zero_state()

    def reset(self) -> None:
        """Adam's state as before the first step."""
        self._zero_state()

    def _zero_state(self) -> None:
        p = self.param
        self.opt.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)
        if self.param not in self.opt.state:  # saved before the first step
            self._zero_state()

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One Adam step with ``grads``, the gradients of the flattened module's parameters."""
        torch.cat([g.reshape(-1) for g in grads], out=self.param.grad)
        self.step_filled()

    def step_filled(self) -> None:
        """One Adam step with the gradient already written into ``param.grad``."""
        group, state = self.opt.param_groups[0], self.opt.state[self.param]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        torch._fused_adam_(
            [self.param],
            [self.param.grad],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [],
            [state["step"]],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )


class _ListAdam:
    """Adam on a module's own parameters, for pixel networks.

    Flattening would undo the convolutions' channels-last weight layout (half their CPU time),
    and an update is tens of milliseconds of convolutions, so Python overhead does not matter.
    """

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, beta1: float = 0.9
    ) -> None:
        self.params = params
        self.opt = torch.optim.Adam(
            params, lr=lr, betas=(beta1, 0.999), weight_decay=weight_decay, foreach=True
        )

    def reset(self) -> None:
        """Adam's state as before the first step."""
        self.opt.state.clear()

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.opt.step()


def _check_one_encoder(actor: dict[str, torch.Tensor], critic: dict[str, torch.Tensor]) -> None:
    """A checkpoint for a shared encoder holds the same encoder in actor and critic; one saved
    with an encoder each (before ``shared_encoder`` existed, or with it off) does not, and
    loading it would silently put the critic's encoder under the actor."""
    for key, value in actor.items():
        if key.startswith("encoder.") and (
            key not in critic or not torch.equal(value, critic[key])
        ):
            raise RuntimeError(
                "the checkpoint's actor has an encoder of its own, but the config shares the "
                "critic's (shared_encoder: true); set shared_encoder: false in its config.yaml"
            )


def _soft_update_pairs(
    *pairs: tuple[nn.Module, nn.Module],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Target and online parameters and floating-point buffers of each ``(target, online)``
    pair, paired for one foreach lerp; a tensor two networks share (a shared encoder) once."""

    def tensors(m: nn.Module) -> list[torch.Tensor]:
        return [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]

    targets: list[torch.Tensor] = []
    onlines: list[torch.Tensor] = []
    seen: set[int] = set()
    for target, online in pairs:
        for t, o in zip(tensors(target), tensors(online), strict=True):
            if id(o) not in seen:
                seen.add(id(o))
                targets.append(t.data)
                onlines.append(o.data)
    return targets, onlines


class DDPGAgent:
    """Actor-critic pair with target networks (none with ``crossq``); ``update`` performs one
    gradient step."""

    def __init__(
        self,
        cfg: TrainConfig,
        obs_shape: int | tuple[int, ...],
        act_low: np.ndarray,
        act_high: np.ndarray,
        device: torch.device,
    ) -> None:
        """``obs_shape``: the state's size, or ``(3 * stack, H, W)`` with ``cfg.pixels``."""
        self.cfg = cfg
        self.device = device
        self._shape_and_bounds = (obs_shape, act_low, act_high)  # for resets
        self.actor, self.critic = build_networks(cfg, obs_shape, act_low, act_high)
        self.actor.to(device)
        self.critic.to(device)
        # CrossQ has no target networks: the critic's own joint pass gives the targets.
        self.actor_target: Actor | PixelActor | None = None
        self.critic_target: Critic | PixelCritic | BlockCritic | None = None
        if not cfg.crossq:
            # Copied together, so a shared encoder is shared by the targets too.
            self.actor_target, self.critic_target = copy.deepcopy((self.actor, self.critic))
            self.actor_target.eval()
            self.critic_target.eval()
            for p in (*self.actor_target.parameters(), *self.critic_target.parameters()):
                p.requires_grad_(False)
        # The actor's own parameters: a shared encoder is the critic's, trained by its loss.
        self.critic_params = list(self.critic.parameters())
        critic_ids = {id(p) for p in self.critic_params}
        self.actor_params = [p for p in self.actor.parameters() if id(p) not in critic_ids]
        self.actor_opt: _FlatAdam | _ListAdam
        self.critic_opt: _FlatAdam | _ListAdam
        beta1 = cfg.adam_beta1
        self._soft_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        if cfg.pixels:
            assert self.actor_target is not None and self.critic_target is not None
            self._soft_pairs = _soft_update_pairs(
                (self.actor_target, self.actor), (self.critic_target, self.critic)
            )
            self.actor_opt = _ListAdam(self.actor_params, cfg.actor_lr, beta1=beta1)
            self.critic_opt = _ListAdam(self.critic_params, cfg.critic_lr, cfg.critic_l2, beta1)
        else:
            actor_flat, n_actor = _flatten(self.actor)
            critic_flat, n_critic = _flatten(self.critic)
            if self.actor_target is not None and self.critic_target is not None:
                self._soft_pairs = (
                    [_flatten(self.actor_target)[0], _flatten(self.critic_target)[0]],
                    [actor_flat, critic_flat],
                )
            # Each optimiser sees one flat parameter whose gradient buffer is filled in place.
            self.actor_opt = _FlatAdam(actor_flat[:n_actor], cfg.actor_lr, beta1=beta1)
            self.critic_opt = _FlatAdam(critic_flat[:n_critic], cfg.critic_lr, cfg.critic_l2, beta1)
        # The categorical critic's atoms (a buffer of the agent, not of the checkpoint: the
        # config fixes them).
        self.atoms: torch.Tensor | None = None
        if cfg.distributional:
            self.atoms = support(cfg.v_min, cfg.v_max, cfg.num_atoms, device)
        self._mlp: MlpUpdate | None = None
        if cfg.fast_update and not cfg.pixels and not cfg.compile and not cfg.block_networks():
            assert isinstance(self.actor, Actor) and isinstance(self.critic, Critic)
            assert isinstance(self.actor_target, Actor) and isinstance(self.critic_target, Critic)
            assert self.actor_opt.param.grad is not None and self.critic_opt.param.grad is not None
            self._mlp = MlpUpdate(
                cfg,
                self.actor,
                self.critic,
                self.actor_target,
                self.critic_target,
                self.actor_opt.param.grad,
                self.critic_opt.param.grad,
            )
        self.updates = 0
        self._actor_loss = torch.zeros((), device=device)
        self._critic_step = self._critic_loss
        self._actor_step = self._actor_loss_fn
        if cfg.compile:
            self._critic_step = torch.compile(self._critic_loss)
            self._actor_step = torch.compile(self._actor_loss_fn)
        self._numpy_act = _numpy_actor(self.actor)  # after _flatten: views of the final storage
        # --obs-norm: the networks see standardised observations; the statistics are the
        # trainer's to update (from what it puts into the replay), and part of the checkpoint.
        self.normalizer: ObsNormalizer | None = None
        if cfg.obs_norm:
            assert isinstance(self.actor, Actor)
            self.normalizer = ObsNormalizer(self.actor.obs_dim, device)

    # -- acting -------------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action in environment units for one raw observation, or a row per
        observation for a batch (``[n, *obs_shape]``), in eval mode."""
        batched = np.ndim(obs) > len(self.actor_obs_shape)
        if self.normalizer is not None:
            obs = self.normalizer.numpy(obs)
        # numpy for one row: torch's dispatch would cost more than the arithmetic. Not for
        # several (parallel environments): numpy's OpenBLAS then starts threads of its own,
        # outside --threads, whose spinning doubled the CPU time of the updates at 8 rows.
        if self._numpy_act is not None and (not batched or len(obs) == 1):
            return self._numpy_act(obs)
        self.actor.eval()
        with torch.inference_mode():
            # pixel frames stay uint8 (4x fewer bytes to move; the encoder casts)
            dtype = None if self.cfg.pixels else torch.float32
            x = torch.as_tensor(obs, dtype=dtype, device=self.device)
            action = self.actor(x if batched else x.unsqueeze(0)).cpu().numpy()
        self.actor.train()
        return action if batched else action[0]

    @property
    def actor_obs_shape(self) -> tuple[int, ...]:
        """One observation's shape."""
        if isinstance(self.actor, PixelActor):
            return tuple(self.actor.obs_shape)
        return (self.actor.obs_dim,)

    def normalize(self, batch: Batch) -> Batch:
        """``batch`` (raw replay observations) as the networks see it: standardised with
        ``--obs-norm``, else unchanged."""
        return batch if self.normalizer is None else self.normalizer.batch(batch)

    # -- learning -----------------------------------------------------------------------------
    def _critic_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if isinstance(self.critic, BlockCritic):
            assert isinstance(self.actor, Actor)
            assert self.actor_target is None or isinstance(self.actor_target, Actor)
            assert self.critic_target is None or isinstance(self.critic_target, BlockCritic)
            return block_update.critic_loss(
                cfg, self.actor, self.critic, self.actor_target, self.critic_target, self.atoms,
                batch,
            )  # fmt: skip
        assert self.actor_target is not None and self.critic_target is not None
        action = (batch.action - self.actor.action_bias) / self.actor.action_scale
        if cfg.shared_encoder:  # the batch holds features: the networks' heads take them
            assert isinstance(self.actor_target, PixelActor)
            assert isinstance(self.critic, PixelCritic)
            assert isinstance(self.critic_target, PixelCritic)
            actor_target, critic_target = self.actor_target.from_features, self.critic_target.q
            critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.critic.q
        else:
            actor_target, critic_target = self.actor_target.normalized, self.critic_target
            critic = self.critic
        with torch.no_grad():
            next_action = smooth_target_action(actor_target(batch.next_obs), cfg)
            target = td_target(batch, critic_target(batch.next_obs, next_action), cfg.gamma)
        q = critic(batch.obs, action)
        loss = (q - target).pow(2).mean(dim=1).sum()
        return loss, q[0].mean().detach()

    def _actor_loss_fn(self, obs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.critic, BlockCritic):
            assert isinstance(self.actor, Actor)
            return block_update.actor_loss(
                self.actor, self.critic, self.atoms, obs, self.cfg.crossq
            )
        if self.cfg.shared_encoder:  # ``obs``: the shared encoder's features, detached
            assert isinstance(self.actor, PixelActor) and isinstance(self.critic, PixelCritic)
            return -self.critic.q.q1(obs, self.actor.from_features(obs)).mean()
        return -self.critic.q1(obs, self.actor.normalized(obs)).mean()

    def encode(self, batch: Batch) -> Batch:
        """With a shared encoder, ``batch`` (frames, as :meth:`normalize` gives it) with the
        frames replaced by the encoder's features (DrQ-v2): obs through the critic's encoder,
        which the critic's loss then trains, and next_obs through the target networks' copy
        of it (DrQ); the losses take those. Otherwise ``batch`` unchanged."""
        if not self.cfg.shared_encoder:
            return batch
        assert isinstance(self.critic, PixelCritic) and isinstance(self.critic_target, PixelCritic)
        with torch.no_grad():
            next_features = self.critic_target.encoder(batch.next_obs)
        return batch._replace(obs=self.critic.encoder(batch.obs), next_obs=next_features)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One critic step; every ``policy_delay`` critic steps also an actor step and a soft
        update of both targets. Returns detached scalar tensors. ``batch`` holds raw
        observations, as the replay does."""
        batch = self.normalize(batch)
        if self.cfg.augment_pad:
            # DrQ: obs and next_obs shifted independently; the actor sees the shifted obs too.
            pad = self.cfg.augment_pad
            batch = batch._replace(
                obs=random_shift(batch.obs, pad), next_obs=random_shift(batch.next_obs, pad)
            )
        batch = self.encode(batch)
        if self._mlp is not None:
            critic_loss, q_mean = self._mlp.critic_step(batch)
            self.critic_opt.step_filled()
        else:
            critic_loss, q_mean = self._critic_step(batch)
            self.critic_opt.step(torch.autograd.grad(critic_loss, self.critic_params))
        if self.cfg.shared_encoder:  # the actor learns on the features, not the encoder
            batch = batch._replace(obs=batch.obs.detach())
        self.updates += 1
        if self.updates % self.cfg.policy_delay == 0:
            if self._mlp is not None:
                actor_loss = self._mlp.actor_step(batch.obs)
                self.actor_opt.step_filled()
            else:
                actor_loss = self._actor_step(batch.obs)
                # Gradients for the actor only: the critic's weight gradients are not computed.
                self.actor_opt.step(torch.autograd.grad(actor_loss, self.actor_params))
            self._actor_loss = actor_loss.detach()
            if self._soft_pairs[0]:
                torch._foreach_lerp_(self._soft_pairs[0], self._soft_pairs[1], self.cfg.tau)
        if self.cfg.reset_every and self.updates % self.cfg.reset_every == 0:
            self.reset_networks()
        return {"critic_loss": critic_loss.detach(), "actor_loss": self._actor_loss, "q": q_mean}

    def reset_networks(self) -> None:
        """Re-initialise actor, critic and targets (fresh draws, as at the start) and both
        optimisers' state: the periodic resets of ``reset_every``. The replay and the
        observation statistics are not the agent's networks and stay."""
        actor, critic = build_networks(self.cfg, *self._shape_and_bounds)
        # load_state_dict copies into the existing (flattened) storage: the optimisers, the
        # soft-update pairs and the numpy actor keep pointing at the live tensors.
        self.actor.load_state_dict(actor.state_dict())
        self.critic.load_state_dict(critic.state_dict())
        if self.actor_target is not None and self.critic_target is not None:
            self.actor_target.load_state_dict(actor.state_dict())
            self.critic_target.load_state_dict(critic.state_dict())
        self.actor_opt.reset()
        self.critic_opt.reset()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        targets = {}
        if self.actor_target is not None and self.critic_target is not None:
            targets = {
                "actor_target": self.actor_target.state_dict(),
                "critic_target": self.critic_target.state_dict(),
            }
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            **targets,
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "updates": self.updates,
            **({"obs_norm": self.normalizer.state_dict()} if self.normalizer else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.shared_encoder:
            _check_one_encoder(state["actor"], state["critic"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        if self.actor_target is not None and self.critic_target is not None:
            self.actor_target.load_state_dict(state["actor_target"])
            self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.updates = int(state["updates"])
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["obs_norm"])

    def use_config_rates(self) -> None:
        """The config's learning rates and weight decay replace those a loaded optimiser state
        carried (a retrain may override them), so that what config.yaml says is what runs."""
        for opt, lr, l2 in (
            (self.actor_opt, self.cfg.actor_lr, 0.0),
            (self.critic_opt, self.cfg.critic_lr, self.cfg.critic_l2),
        ):
            opt.opt.param_groups[0].update(lr=lr, weight_decay=l2)
