"""Actor and critic networks for DDPG from low-dimensional state.

The actor returns actions in the environment's own units: its tanh output is scaled by
``action_scale`` and shifted by ``action_bias``, both registered buffers, so an exported graph
carries them and nobody downstream has to rescale. Training code works with
:meth:`Actor.normalized` (the tanh output in [-1, 1]) so the critic sees well-conditioned inputs
whatever the bounds.

The critic is an ensemble of ``n_q`` Q-networks (1 for DDPG, 2 for clipped double Q) evaluated
with batched matrix multiplies, so the twin critic costs about the same number of kernel launches
as a single one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _uniform_final(layer_weight: torch.Tensor, layer_bias: torch.Tensor, bound: float) -> None:
    """The paper's final-layer initialisation: weights and biases from U(-bound, bound)."""
    nn.init.uniform_(layer_weight, -bound, bound)
    nn.init.uniform_(layer_bias, -bound, bound)


def register_action_bounds(
    actor: nn.Module,
    act_low: Sequence[float] | torch.Tensor,
    act_high: Sequence[float] | torch.Tensor,
) -> int:
    """Give ``actor`` the ``action_scale`` and ``action_bias`` buffers that map tanh's [-1, 1]
    to the bounds (buffers: they go to the device, the checkpoint and the exported graph);
    returns the action size."""
    low = torch.as_tensor(act_low, dtype=torch.float32)
    high = torch.as_tensor(act_high, dtype=torch.float32)
    if low.shape != high.shape or low.ndim != 1:
        raise ValueError(
            f"action bounds must be 1-D and equal in shape, got {low.shape}, {high.shape}"
        )
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError("action bounds must be finite for a tanh policy")
    actor.register_buffer("action_scale", (high - low) / 2.0)
    actor.register_buffer("action_bias", (high + low) / 2.0)
    return int(low.numel())


class ResidualBlock(nn.Module):
    """Simba's block (Lee et al. 2024): ``x + W2 relu(W1 norm(x))``, the inner layer 4x wide.

    ``norm`` is ``"layer"`` (Simba) or ``"batch"`` (a CrossQ critic: batch statistics are
    what stand in for its target network)."""

    def __init__(self, width: int, norm: str = "layer") -> None:
        super().__init__()
        self.norm = _norm(norm, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


def _norm(kind: str, width: int) -> nn.Module:
    """A normalisation layer: LayerNorm, BatchNorm (CrossQ's momentum: flax 0.99, torch 0.01)
    or none."""
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "batch":
        return nn.BatchNorm1d(width, momentum=0.01)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'layer', 'batch' or 'none', got {kind!r}")


def simba_body(in_dim: int, hidden: Sequence[int], norm: str = "layer") -> nn.Sequential:
    """Simba's encoder: a linear embedding to the width, a residual block per ``hidden`` entry
    (all equal), and a final normalisation."""
    if len(set(hidden)) != 1:
        raise ValueError(f"Simba blocks need equal widths, got {tuple(hidden)}")
    width = hidden[0]
    blocks = [ResidualBlock(width, norm) for _ in hidden]
    return nn.Sequential(nn.Linear(in_dim, width), *blocks, _norm(norm, width))


class Actor(nn.Module):
    """Deterministic policy ``mu(s)``: MLP with ReLU hidden layers and a tanh output, or with
    ``residual`` Simba's residual LayerNorm encoder (:func:`simba_body`) before the tanh head.

    ``obs_norm`` adds a batch-normalisation layer on the state input (the paper's choice); in
    eval mode it is a fixed affine map, exported with the rest of the graph.
    """

    def __init__(
        self,
        obs_dim: int,
        act_low: Sequence[float] | torch.Tensor,
        act_high: Sequence[float] | torch.Tensor,
        hidden: Sequence[int] = (256, 256),
        obs_norm: bool = False,
        final_init: float | None = None,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = register_action_bounds(self, act_low, act_high)
        self.obs_norm = nn.BatchNorm1d(obs_dim) if obs_norm else nn.Identity()
        layers: list[nn.Module] = []
        width = obs_dim
        if residual:
            layers, width = list(simba_body(obs_dim, hidden)), hidden[0]
        for h in () if residual else hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, self.act_dim)
        if final_init is not None:
            _uniform_final(self.head.weight, self.head.bias, final_init)

    def normalized(self, obs: torch.Tensor) -> torch.Tensor:
        """The policy's action in [-1, 1]."""
        return torch.tanh(self.head(self.body(self.obs_norm(obs))))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The policy's action in the environment's units."""
        return self.normalized(obs) * self.action_scale + self.action_bias


class Standardize(nn.Module):
    """Fixed observation standardisation, ``clamp((obs - mean) * inv_std, -clip, clip)``, in
    float32: the training run's running statistics frozen into the exported graph (the trainer
    applies the same operations to the observations its networks see), so a deployed actor
    takes raw observations."""

    def __init__(
        self,
        mean: Sequence[float] | torch.Tensor | np.ndarray,
        inv_std: Sequence[float] | torch.Tensor | np.ndarray,
        clip: float,
    ) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        inv_std_t = torch.as_tensor(inv_std, dtype=torch.float32).reshape(-1)
        if mean_t.shape != inv_std_t.shape:
            raise ValueError(f"mean has {mean_t.numel()} values, inv_std {inv_std_t.numel()}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(inv_std_t).all()):
            raise ValueError("standardisation statistics must be finite")
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("inv_std", inv_std_t)
        self.clip = float(clip)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.clamp((obs - self.mean) * self.inv_std, -self.clip, self.clip)


class StandardizedActor(nn.Module):
    """The deployed policy of a run trained with observation normalisation: the fixed
    :class:`Standardize`, then the trained :class:`Actor` (what the exporter writes)."""

    def __init__(self, actor: Actor, standardize: Standardize) -> None:
        super().__init__()
        if standardize.mean.numel() != actor.obs_dim:
            raise ValueError(
                f"standardisation has {standardize.mean.numel()} dimensions, the actor "
                f"takes {actor.obs_dim}"
            )
        self.standardize = standardize
        self.actor = actor
        self.obs_dim, self.act_dim = actor.obs_dim, actor.act_dim

    @property
    def action_scale(self) -> torch.Tensor:
        return self.actor.action_scale

    @property
    def action_bias(self) -> torch.Tensor:
        return self.actor.action_bias

    @property
    def obs_norm(self) -> nn.Module:
        """The inner actor's batch norm (or Identity), after the standardisation."""
        return self.actor.obs_norm

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.standardize(obs))


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied in one batched matmul: ``[n, B, in] -> [n, B, out]``."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        # Same distribution as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class Critic(nn.Module):
    """``n_q`` Q-networks ``Q(s, a)``; returns ``[n_q, B]``.

    ``action_layer`` is the hidden layer the action joins: 0 concatenates it with the state at
    the input (TD3), 1 after the first hidden layer (the paper: "actions were not included until
    the 2nd hidden layer of Q").
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (256, 256),
        n_q: int = 1,
        action_layer: int = 0,
        obs_norm: bool = False,
        final_init: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= action_layer < len(hidden):
            raise ValueError(f"action_layer must be in [0, {len(hidden) - 1}], got {action_layer}")
        self.n_q = n_q
        self.action_layer = action_layer
        self.obs_norm = nn.BatchNorm1d(obs_dim) if obs_norm else nn.Identity()
        self.layers = nn.ModuleList()
        width = obs_dim
        for i, h in enumerate(hidden):
            extra = act_dim if i == action_layer else 0
            self.layers.append(EnsembleLinear(n_q, width + extra, h))
            width = h
        self.head = EnsembleLinear(n_q, width, 1)
        if final_init is not None:
            _uniform_final(self.head.weight, self.head.bias, final_init)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self._ensemble(obs, action, self.n_q)

    def q1(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The first Q-network only, ``[B]``: the actor's objective needs no other member, so
        this skips their matmuls (half the critic's cost in TD3's actor step)."""
        return self._ensemble(obs, action, 1)[0]

    def _ensemble(self, obs: torch.Tensor, action: torch.Tensor, n: int) -> torch.Tensor:
        x = self.obs_norm(obs).expand(n, *obs.shape)
        a = action.expand(n, *action.shape)
        for i, layer in enumerate(self.layers):
            w, b = _members(layer, n)
            if i != self.action_layer:
                x = torch.baddbmm(b, x, w)
            elif action.requires_grad:
                # Gradient wanted for the action (the actor step): two matmuls instead of a
                # concatenation, so backward computes d/da without the much wider d/dx.
                width = x.shape[-1]
                x = torch.baddbmm(torch.baddbmm(b, x, w[:, :width]), a, w[:, width:])
            else:
                x = torch.baddbmm(b, torch.cat([x, a], dim=-1), w)
            x = torch.relu(x)
        # One output unit: a broadcast multiply and a sum instead of a matmul with a side of
        # width 1, which CPU BLAS runs several times slower, forward and backward.
        w, b = _members(self.head, n)
        return (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)


def _members(layer: EnsembleLinear, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the first ``n`` members; the parameters themselves when that is all
    of them, so the critic's own backward pass has no slicing to undo."""
    if n == layer.weight.shape[0]:
        return layer.weight, layer.bias
    return layer.weight[:n], layer.bias[:n]


class BlockCritic(nn.Module):
    """``n_q`` independent Q-networks on ``concat(s, a)`` built from normalised blocks; returns
    ``[n_q, B, out]``: ``out`` 1 for a scalar Q, ``num_atoms`` logits for a categorical one.

    ``residual``: Simba's encoder (:func:`simba_body`); else ReLU layers. ``norm``: ``"layer"``
    (Simba), ``"batch"`` (CrossQ: batch norm on the input and in every hidden layer, in Simba
    blocks instead of LayerNorm) or ``"none"``. Members are separate modules (a Python loop of
    ``n_q``): a normalisation layer's scale and shift belong to one member.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int],
        n_q: int = 2,
        residual: bool = False,
        norm: str = "none",
        out: int = 1,
        final_init: float | None = None,
    ) -> None:
        super().__init__()
        self.n_q, self.out = n_q, out
        self.members = nn.ModuleList(
            self._member(obs_dim + act_dim, hidden, residual, norm, out, final_init)
            for _ in range(n_q)
        )

    @staticmethod
    def _member(
        in_dim: int,
        hidden: Sequence[int],
        residual: bool,
        norm: str,
        out: int,
        final_init: float | None,
    ) -> nn.Sequential:
        # CrossQ normalises the raw (s, a) input too; LayerNorm models (Simba) do not.
        layers: list[nn.Module] = [_norm(norm, in_dim) if norm == "batch" else nn.Identity()]
        if residual:
            layers.append(simba_body(in_dim, hidden, norm))
            width = hidden[0]
        else:
            width = in_dim
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), _norm(norm, h)]
                width = h
        head = nn.Linear(width, out)
        if final_init is not None:
            _uniform_final(head.weight, head.bias, final_init)
        return nn.Sequential(*layers, head)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1)
        return torch.stack([m(x) for m in self.members])
