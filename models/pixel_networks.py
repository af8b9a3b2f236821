"""Actor and critic networks for DDPG from pixels (the paper's convolutional variant).

Observations are stacked RGB frames, channel-first uint8 ``(3 * stack, size, size)`` as
``sim_bridge.pixels`` produces them. The networks take them as they are (uint8 or float in
0..255) and scale to [0, 1] inside ``forward``, so the exported graph takes raw uint8 frames and
nobody downstream has to normalise.

The encoder is the paper's: 3 convolutions of 32 filters, 3x3, ReLU, no pooling. The paper gives
no strides. We default to 2, 2, 2: 64x64 frames give 32 x 7 x 7 = 1,568 features, and an update
costs about a quarter of DrQ-v2's 2, 1, 1 (32 x 27 x 27 = 23,328 features, a 4.7M-weight first
dense layer and a 19 MB actor), which is what makes learning from pixels affordable on a CPU.
``strides`` takes DrQ-v2's choice (or any other) where compute allows.

The actor and the critic each have their own encoder (the paper trains them as separate
networks), or, as in DrQ-v2, the actor's ``encoder`` is the critic's: one encoder, trained by
the critic's loss alone, whose features the actor reads (``training.agent``'s
``shared_encoder``). The actor holds it either way, so its exported graph takes frames.

The critic's action joins after the first dense layer, i.e. at the second dense layer, as in
the paper ("actions were not included until the 2nd hidden layer of Q"). Its dense
part is the state :class:`~models.networks.Critic` on the encoder's features, so it has the same
API: ``critic(obs, act) -> [n_q, B]`` and ``critic.q1(obs, act) -> [B]``, with one encoder shared
by the ``n_q`` heads (as DrQ-v2 shares it between its twin Qs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.networks import Critic, _uniform_final, register_action_bounds

PAPER_HIDDEN = (200, 200)
PAPER_FINAL_INIT = 3e-4
CONV_FILTERS = 32
CONV_STRIDES = (2, 2, 2)


def _check_obs_shape(obs_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in obs_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"pixel obs_shape must be (C, H, W), got {tuple(obs_shape)}")
    return shape  # type: ignore[return-value]


class PixelEncoder(nn.Module):
    """``(B, C, H, W)`` uint8 or float in 0..255 -> ``(B, feature_dim)`` float features."""

    def __init__(
        self,
        obs_shape: Sequence[int] = (9, 64, 64),
        strides: Sequence[int] = CONV_STRIDES,
        feature_dim: int = 0,
    ) -> None:
        """``feature_dim`` > 0 adds DrQ-v2's projection: Linear to that many features, LayerNorm,
        tanh. Bounded, few features keep the critic's action input from drowning among 1,568
        unnormalised ones and keep the actor's pre-tanh output in range."""
        super().__init__()
        self.obs_shape = _check_obs_shape(obs_shape)
        if len(strides) != 3 or min(strides) < 1:
            raise ValueError(f"strides must be 3 positive integers, got {tuple(strides)}")
        channels, h, w = self.obs_shape
        layers: list[nn.Module] = []
        for stride in strides:
            if h < 3 or w < 3:
                raise ValueError(f"pixel obs_shape {self.obs_shape} is too small for 3 convs")
            layers += [nn.Conv2d(channels, CONV_FILTERS, 3, stride=stride), nn.ReLU()]
            channels, h, w = CONV_FILTERS, (h - 3) // stride + 1, (w - 3) // stride + 1
        self.convs = channels_last(nn.Sequential(*layers))
        self.feature_dim = channels * h * w
        self.project: nn.Module = nn.Identity()
        if feature_dim < 0:
            raise ValueError(f"feature_dim must be >= 0, got {feature_dim}")
        if feature_dim:
            self.project = nn.Sequential(
                nn.Linear(self.feature_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh()
            )
            self.feature_dim = feature_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # Cast to the weights' dtype (not always float32) so a float64 copy, the export's parity
        # reference, runs on the same input; in ONNX this is a Cast and a Div inside the graph.
        # Channels-last activations (with channels-last weights, see `channels_last`) halve the
        # convolutions' CPU time in oneDNN; the layout changes no value, and the exported graph
        # has no such notion. The uint8 input is reordered before the cast (a quarter of the
        # bytes), and the cast always copies, so dividing in place never touches the caller's.
        x = obs.contiguous(memory_format=torch.channels_last)
        x = x.to(self.convs[0].weight.dtype, copy=True).div_(255.0)
        return self.project(self.convs(x).flatten(1))


class PixelActor(nn.Module):
    """Deterministic pixel policy: encoder, dense ReLU layers, tanh scaled to the bounds.

    ``action_scale``/``action_bias`` buffers and :meth:`normalized` mirror the state
    :class:`~models.networks.Actor`, so the trainer and the exporter treat both alike. There is
    deliberately no ``obs_norm``/``body`` attribute: code that mirrors the state actor's MLP
    layer by layer (``training.agent._numpy_actor``) must not mistake this one for an MLP.
    """

    def __init__(
        self,
        obs_shape: Sequence[int],
        act_low: Sequence[float] | torch.Tensor,
        act_high: Sequence[float] | torch.Tensor,
        hidden: Sequence[int] = PAPER_HIDDEN,
        final_init: float | None = PAPER_FINAL_INIT,
        strides: Sequence[int] = CONV_STRIDES,
        feature_dim: int = 0,
    ) -> None:
        super().__init__()
        self.act_dim = register_action_bounds(self, act_low, act_high)
        self.encoder = PixelEncoder(obs_shape, strides, feature_dim)
        self.obs_shape = self.encoder.obs_shape
        layers: list[nn.Module] = []
        width = self.encoder.feature_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, self.act_dim)
        if final_init is not None:
            _uniform_final(self.head.weight, self.head.bias, final_init)

    def normalized(self, obs: torch.Tensor) -> torch.Tensor:
        """The policy's action in [-1, 1]."""
        return self.from_features(self.encoder(obs))

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The action in [-1, 1] for the encoder's ``features`` (a shared encoder's, computed
        once per batch)."""
        return torch.tanh(self.head(self.trunk(features)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The policy's action in the environment's units."""
        return self.normalized(obs) * self.action_scale + self.action_bias


class PixelCritic(nn.Module):
    """``n_q`` Q-networks on one pixel encoder; the state :class:`Critic`'s API.

    ``critic(obs, action) -> [n_q, B]`` and ``critic.q1(obs, action) -> [B]``, ``action`` in the
    actor's normalized [-1, 1] units as for the state critic. ``action_layer`` 1 (default, the
    paper) joins the action at the second dense layer.
    """

    def __init__(
        self,
        obs_shape: Sequence[int],
        act_dim: int,
        hidden: Sequence[int] = PAPER_HIDDEN,
        n_q: int = 1,
        action_layer: int = 1,
        final_init: float | None = PAPER_FINAL_INIT,
        strides: Sequence[int] = CONV_STRIDES,
        feature_dim: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = PixelEncoder(obs_shape, strides, feature_dim)
        self.obs_shape = self.encoder.obs_shape
        self.n_q = n_q
        self.q = Critic(
            self.encoder.feature_dim,
            act_dim,
            hidden,
            n_q=n_q,
            action_layer=action_layer,
            final_init=final_init,
        )

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q(self.encoder(obs), action)

    def q1(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The first Q-network only, ``[B]`` (the actor's objective)."""
        return self.q.q1(self.encoder(obs), action)


def channels_last(module: nn.Module) -> nn.Module:
    """Put ``module``'s convolution weights in channels-last layout, in place; returns it
    (the encoder does this to its own; ``Module.to`` and ``deepcopy`` keep the layout).

    Measured on this 2-core CPU for the three-convolution encoder at batch 16: forward plus
    backward 16.5 ms in the default layout, 12.6 ms with channels-last input only, 8.5 ms with
    channels-last weights too."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def random_shift(
    x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DrQ-v2's augmentation: replicate-pad by ``pad`` and crop back at a random offset, per
    sample. For training only (the policy is served unaugmented).

    Done as one gather with clamped indices, which is exactly replicate padding and an integer
    crop, in any dtype (uint8 stays uint8, bit-exact) and with no Python loop over the batch.
    ``x`` is ``(B, C, H, W)``; the result has the same shape and dtype; ``pad`` 0 returns ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"random_shift expects (B, C, H, W), got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return x
    b, _, h, w = x.shape
    device = x.device
    shifts = torch.randint(-pad, pad + 1, (b, 2), generator=generator, device=device)
    rows = (torch.arange(h, device=device) + shifts[:, :1]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=device) + shifts[:, 1:]).clamp_(0, w - 1)  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]
    # x[b, :, rows[b, i], cols[b, j]] -> (B, H, W, C): the sliced channel axis goes last.
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
