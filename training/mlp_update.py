"""The state networks' DDPG/TD3 update with hand-written backward passes.

The state networks are small (a few hundred units, batches of 64 to 256), so on a CPU one
update is a few dozen matrix multiplies of 20 to 200 microseconds each, and autograd's
bookkeeping (a graph node, saved tensors and a dispatch per op) costs about as much again. These
passes do the same arithmetic with about half the ops and no graph, and write each gradient
straight into its optimiser's flat gradient buffer.

The math is the autograd update's (``DDPGAgent`` with ``fast_update`` off is the reference):
batch norm in training mode wherever the modules are in training mode, running statistics
included; ReLU's gradient zero where its output is zero; the critic's loss summed over its
members. ``tests/test_mlp_update.py`` holds the two equal for both presets.

Shapes: ``B`` batch, ``n`` critic members. Actor layers are ``nn.Linear`` (weight
``[out, in]``); critic layers are ``EnsembleLinear`` (weight ``[n, in, out]``, bias
``[n, 1, out]``), so the critic runs on ``[n, B, width]`` activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from models.networks import Actor, Critic
from training.config import TrainConfig
from training.replay import Batch

_relu_backward = torch.ops.aten.threshold_backward.default  # (grad, relu output, 0)
_tanh_backward = torch.ops.aten.tanh_backward.default  # (grad, tanh output)


def smooth_target_action(next_action: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """TD3's target policy smoothing, in place: clipped Gaussian noise on the target actor's
    normalised action; unchanged with ``policy_noise`` 0 (DDPG)."""
    if cfg.policy_noise > 0:
        noise = torch.randn_like(next_action).mul_(cfg.policy_noise)
        next_action = next_action.add_(noise.clamp_(-cfg.noise_clip, cfg.noise_clip))
        next_action = next_action.clamp_(-1.0, 1.0)
    return next_action


def td_target(batch: Batch, next_q: torch.Tensor, gamma: float) -> torch.Tensor:
    """``reward + discount * (1 - terminated) * next_q``, with the smallest of the critic
    members' ``next_q`` (``[n, B]``; clipped double Q) and ``discount`` gamma, or the batch's
    own ``gamma ** steps`` for n-step returns."""
    next_q = next_q.min(dim=0).values if len(next_q) > 1 else next_q[0]
    if batch.discount is None:  # two ops instead of four
        return torch.addcmul(batch.reward, 1.0 - batch.terminated, next_q, value=gamma)
    return torch.addcmul(batch.reward, (1.0 - batch.terminated) * batch.discount, next_q)


def _grad_views(module: nn.Module, flat_grad: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views of ``flat_grad`` shaped like ``module``'s parameters, in their order (the order
    ``agent._flatten`` lays them out in)."""
    offset = 0
    for p in module.parameters():
        yield flat_grad[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


class _Norm:
    """Batch norm on the state, or nothing: the forward pass in training or eval mode and the
    gradients of its scale and shift."""

    def __init__(self, module: nn.Module, grads: Iterator[torch.Tensor] | None) -> None:
        self.bn = module if isinstance(module, nn.BatchNorm1d) else None
        if self.bn is None:
            return
        self.weight, self.bias = self.bn.weight.detach(), self.bn.bias.detach()
        self.momentum = 0.0 if self.bn.momentum is None else self.bn.momentum
        if grads is not None:
            self.g_weight, self.g_bias = next(grads), next(grads)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        bn = self.bn
        if bn is None:
            return x
        if training:
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)
        out, mean, inv_std = torch.native_batch_norm(
            x, self.weight, self.bias, bn.running_mean, bn.running_var, training,
            self.momentum, bn.eps,
        )  # fmt: skip
        self._stats = (mean, inv_std) if training else None
        return out

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Scale and shift gradients, given the layer's input from the last training-mode
        forward pass and the gradient of its output."""
        assert self._stats is not None, "backward needs a training-mode forward pass"
        mean, inv_std = self._stats
        x_hat = (x - mean).mul_(inv_std)
        torch.sum(grad_out * x_hat, 0, out=self.g_weight)
        torch.sum(grad_out, 0, out=self.g_bias)


class _ActorPass:
    """The actor's forward pass, keeping each layer's input, and its backward pass."""

    def __init__(self, actor: Actor, flat_grad: torch.Tensor | None) -> None:
        grads = None if flat_grad is None else _grad_views(actor, flat_grad)
        self.norm = _Norm(actor.obs_norm, grads)
        linears = [m for m in actor.body if isinstance(m, nn.Linear)] + [actor.head]
        self.weights = [m.weight.detach() for m in linears]
        self.weights_t = [w.t() for w in self.weights]
        self.biases = [m.bias.detach() for m in linears]
        if grads is not None:
            views = list(grads)
            self.g_weights, self.g_biases = views[0::2], views[1::2]

    def forward(self, obs: torch.Tensor, training: bool) -> list[torch.Tensor]:
        """Each layer's input, then the action in [-1, 1] (the last element)."""
        x = self.norm(obs, training)
        inputs = [x]
        for w_t, b in zip(self.weights_t[:-1], self.biases[:-1], strict=True):
            x = torch.addmm(b, x, w_t).relu_()
            inputs.append(x)
        inputs.append(torch.addmm(self.biases[-1], x, self.weights_t[-1]).tanh_())
        return inputs

    def backward(self, obs: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> None:
        """Parameter gradients, given d(loss)/d(action)."""
        g = _tanh_backward(grad, inputs[-1])
        for i in range(len(self.weights) - 1, -1, -1):
            torch.mm(g.t(), inputs[i], out=self.g_weights[i])
            torch.sum(g, 0, out=self.g_biases[i])
            if i > 0:
                g = _relu_backward(torch.mm(g, self.weights[i]), inputs[i], 0)
        if self.norm.bn is not None:
            self.norm.backward(obs, torch.mm(g, self.weights[0]))


class _Members(NamedTuple):
    """Views of the first ``n`` members' parameters, made once: the passes run every update."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    state_t: list[torch.Tensor]
    """Each layer's state rows, transposed (``[n, out, in]``): for gradients to its input."""
    action_rows: torch.Tensor
    """The action layer's action rows ``[n, act_dim, out]``: for the gradient to the action."""


class _CriticPass:
    """The critic's forward pass over its first ``n`` members, keeping each layer's input and
    each hidden layer's output, and backward passes to its parameters (the critic step) or to
    the action (the actor step).

    The head is one unit wide, and MKL's batched matmul is several times slower with a side
    of 1 or ``act_dim`` when there are two members: those products are laid out so that the
    short side is the first (``w^T x^T`` rather than ``x w``).
    """

    def __init__(self, critic: Critic, act_dim: int, flat_grad: torch.Tensor | None) -> None:
        grads = None if flat_grad is None else _grad_views(critic, flat_grad)
        self.norm = _Norm(critic.obs_norm, grads)
        self.action_layer = k = critic.action_layer
        weights = [m.weight.detach() for m in [*critic.layers, critic.head]]
        biases = [m.bias.detach() for m in [*critic.layers, critic.head]]
        # The layer the action joins has its state rows first, then act_dim action rows.
        rows = [w.shape[1] - (act_dim if i == k else 0) for i, w in enumerate(weights)]
        self.members = {
            n: _Members(
                [w[:n] for w in weights],
                [b[:n] for b in biases],
                [w[:n, :r].transpose(1, 2) for w, r in zip(weights, rows, strict=True)],
                weights[k][:n, rows[k] :],
            )
            for n in {critic.n_q, 1}
        }
        if grads is not None:
            views = list(grads)
            self.g_weights, self.g_biases = views[0::2], views[1::2]

    def forward(
        self, obs: torch.Tensor, action: torch.Tensor, n: int, training: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``Q`` of the first ``n`` members ``[n, B]``, each layer's input (the action
        layer's: the state side and the action, concatenated) and each hidden layer's output."""
        m = self.members[n]
        x = self.norm(obs, training).expand(n, *obs.shape)
        inputs, outputs = [], []
        for i, (w, b) in enumerate(zip(m.weights[:-1], m.biases[:-1], strict=True)):
            if i == self.action_layer:
                x = torch.cat([x, action.expand(n, *action.shape)], dim=-1)
            inputs.append(x)
            x = torch.baddbmm(b, x, w).relu_()
            outputs.append(x)
        inputs.append(x)
        if n == 1:
            q = torch.baddbmm(m.biases[-1], x, m.weights[-1])  # [1, B, 1]
        else:
            q = torch.baddbmm(m.biases[-1], m.state_t[-1], x.transpose(1, 2))  # [n, 1, B]
        return q.view(n, -1), inputs, outputs

    @staticmethod
    def _from_head(m: _Members, grad_q: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The gradient at the last hidden layer's output from d(loss)/dQ ``[n, B]``."""
        return _relu_backward(grad_q.unsqueeze(-1) * m.state_t[-1], outputs[-1], 0)

    @staticmethod
    def _to_hidden(
        m: _Members, i: int, g: torch.Tensor, outputs: list[torch.Tensor]
    ) -> torch.Tensor:
        """The gradient at hidden layer ``i - 1``'s output from ``g``, the gradient at layer
        ``i``'s (through layer ``i``'s state rows and layer ``i - 1``'s ReLU)."""
        return _relu_backward(torch.bmm(g, m.state_t[i]), outputs[i - 1], 0)

    def backward_params(
        self,
        obs: torch.Tensor,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        grad_q: torch.Tensor,
    ) -> None:
        """Parameter gradients of all members, given d(loss)/dQ ``[n, B]``."""
        n, head = grad_q.shape[0], len(self.g_weights) - 1
        m = self.members[n]
        g_head = self.g_weights[head].view(n, 1, -1)
        torch.bmm(grad_q.unsqueeze(1), inputs[head], out=g_head)
        torch.sum(grad_q, 1, keepdim=True, out=self.g_biases[head].view(n, 1))
        g = self._from_head(m, grad_q, outputs)
        for i in range(head - 1, -1, -1):
            torch.bmm(inputs[i].transpose(1, 2), g, out=self.g_weights[i])
            torch.sum(g, 1, keepdim=True, out=self.g_biases[i])
            if i > 0:
                g = self._to_hidden(m, i, g, outputs)
        if self.norm.bn is not None:
            self.norm.backward(obs, torch.bmm(g, m.state_t[0]).sum(0))

    def backward_action(self, outputs: list[torch.Tensor], grad_q: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(action) ``[B, act_dim]``, given d(loss)/dQ of the first ``n`` members."""
        m = self.members[grad_q.shape[0]]
        g = self._from_head(m, grad_q, outputs)
        for i in range(len(m.weights) - 2, self.action_layer, -1):
            g = self._to_hidden(m, i, g, outputs)
        return torch.bmm(m.action_rows, g.transpose(1, 2)).sum(0).t()


class MlpUpdate:
    """The critic and actor steps of ``DDPGAgent.update`` for the state networks; each fills
    its optimiser's flat gradient buffer, which the agent then steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        actor: Actor,
        critic: Critic,
        actor_target: Actor,
        critic_target: Critic,
        actor_grad: torch.Tensor,
        critic_grad: torch.Tensor,
    ) -> None:
        self.cfg = cfg
        self.n_q = critic.n_q
        self.action_scale, self.action_bias = actor.action_scale, actor.action_bias
        self.actor = _ActorPass(actor, actor_grad)
        self.critic = _CriticPass(critic, actor.act_dim, critic_grad)
        self.actor_target = _ActorPass(actor_target, None)
        self.critic_target = _CriticPass(critic_target, actor.act_dim, None)

    def critic_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the critic's gradient; returns the loss and the first member's mean Q."""
        cfg = self.cfg
        next_action = self.actor_target.forward(batch.next_obs, training=False)[-1]
        next_action = smooth_target_action(next_action, cfg)
        next_q = self.critic_target.forward(batch.next_obs, next_action, self.n_q, False)[0]
        target = td_target(batch, next_q, cfg.gamma)

        action = (batch.action - self.action_bias) / self.action_scale
        q, inputs, outputs = self.critic.forward(batch.obs, action, self.n_q, training=True)
        error = q - target
        # loss = sum over members of mean over the batch of error**2
        self.critic.backward_params(batch.obs, inputs, outputs, error * (2.0 / error.shape[1]))
        loss = error.square().mean(dim=1).sum()
        return loss, q[0].mean()

    def actor_step(self, obs: torch.Tensor) -> torch.Tensor:
        """Fill the actor's gradient of ``-Q1(s, mu(s))``; returns that loss."""
        inputs = self.actor.forward(obs, training=True)
        q, _, outputs = self.critic.forward(obs, inputs[-1], 1, training=True)
        grad_q = torch.full_like(q, -1.0 / q.shape[1])
        self.actor.backward(obs, inputs, self.critic.backward_action(outputs, grad_q))
        return -q.mean()
