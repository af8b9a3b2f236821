"""The critic and actor losses of the block networks (``simba``, ``crossq``, ``distributional``
on :class:`models.networks.BlockCritic`), by autograd; ``DDPGAgent.update`` steps them.

Still DDPG: the actor is deterministic and follows the deterministic policy gradient of the
critic. The switches change how the critic is fitted:

- ``crossq``: no target networks. The next action comes from the online actor (in eval mode,
  no gradient), and ``(s, a)`` and ``(s', a')`` go through the critic as one batch in training
  mode, so the batch norm layers see, and normalise with, the statistics of both halves; the
  target half is then detached (CrossQ's reference, ``sbx/sac/sac.py``). The actor's objective
  reads the critic in eval mode (its running statistics), as the reference does.
- ``distributional``: the critic's members output logits over ``atoms``; the target is the
  projected distribution of ``r + discount * (1 - terminated) * Z'`` taken, per sample, from the
  member whose expected value is smaller (FastTD3's clipped double Q), and each member's loss is
  its cross-entropy to it. Without it, TD3's squared error to the smaller member's value.

The actor maximises the smaller of the members' expected values, as CrossQ and FastTD3 do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.networks import Actor, BlockCritic
from training.config import TrainConfig
from training.distributional import expected, project
from training.mlp_update import smooth_target_action
from training.replay import Batch


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Modules in eval mode for a block (batch norm: running statistics, none updated)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def values(logits: torch.Tensor, atoms: torch.Tensor | None) -> torch.Tensor:
    """The members' Q ``[n, B]`` from the critic's output ``[n, B, out]``."""
    if atoms is None:
        return logits.squeeze(-1)
    return expected(torch.softmax(logits, dim=-1), atoms)


def critic_loss(
    cfg: TrainConfig,
    actor: Actor,
    critic: BlockCritic,
    actor_target: Actor | None,
    critic_target: BlockCritic | None,
    atoms: torch.Tensor | None,
    batch: Batch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's loss (summed over members) and the first member's mean Q."""
    action = (batch.action - actor.action_bias) / actor.action_scale
    b = len(batch.reward)
    with torch.no_grad():
        if actor_target is None:  # crossq
            with eval_mode(actor):
                next_action = actor.normalized(batch.next_obs)
        else:
            next_action = actor_target.normalized(batch.next_obs)
        next_action = smooth_target_action(next_action, cfg)
    if critic_target is None:  # crossq: one joint pass, shared batch statistics
        joint = critic(torch.cat([batch.obs, batch.next_obs]), torch.cat([action, next_action]))
        out, next_out = joint[:, :b], joint[:, b:].detach()
    else:
        with torch.no_grad():
            next_out = critic_target(batch.next_obs, next_action)
        out = critic(batch.obs, action)
    discount = cfg.gamma if batch.discount is None else batch.discount
    bootstrap = (1.0 - batch.terminated) * discount
    if atoms is None:
        next_q = next_out.squeeze(-1).min(dim=0).values
        target = batch.reward + bootstrap * next_q
        q = out.squeeze(-1)
        return (q - target).pow(2).mean(dim=1).sum(), q[0].mean().detach()
    next_probs = torch.softmax(next_out, dim=-1)  # [n, B, K]
    smaller = expected(next_probs, atoms).argmin(dim=0)  # [B]: the member with less value
    chosen = next_probs.gather(0, smaller.view(1, b, 1).expand(1, b, atoms.numel()))[0]
    target_probs = project(chosen, batch.reward, bootstrap, atoms)
    loss = -(target_probs * F.log_softmax(out, dim=-1)).sum(-1).mean(dim=1).sum()
    return loss, values(out[:1].detach(), atoms).mean()


def actor_loss(
    actor: Actor, critic: BlockCritic, atoms: torch.Tensor | None, obs: torch.Tensor, crossq: bool
) -> torch.Tensor:
    """``-min_i Q_i(s, mu(s))`` averaged over the batch; the critic in eval mode with
    ``crossq``."""
    with eval_mode(critic) if crossq else contextlib.nullcontext():
        q = values(critic(obs, actor.normalized(obs)), atoms)
    return -q.min(dim=0).values.mean()
