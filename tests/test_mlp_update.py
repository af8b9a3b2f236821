"""The hand-written update (training/mlp_update.py) against autograd, the reference.

Adam divides by the gradient's own scale, so equal weights after a few steps would not catch a
gradient off by a constant factor: these tests compare the gradients themselves, then the whole
agent state (weights, batch-norm statistics, optimiser moments) after several updates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from training.agent import DDPGAgent
from training.config import make_config
from training.mlp_update import _grad_views
from training.replay import Batch

OBS, ACT = 11, 3
LOW = np.array([-2.0, -0.5, 0.0], dtype=np.float32)
HIGH = np.array([2.0, 1.0, 3.0], dtype=np.float32)

CASES = {
    "paper": ("paper", {}),
    "paper without batch norm": ("paper", {"batch_norm": False}),
    "td3": ("td3", {}),
    "td3, action at layer 1, three layers": (
        "td3",
        {"critic_action_layer": 1, "critic_hidden": (32, 24, 16), "actor_hidden": (20, 12, 8)},
    ),
    "td3 with batch norm, action at layer 2": (
        "td3",
        {"batch_norm": True, "critic_hidden": (32, 24, 16), "critic_action_layer": 2},
    ),
    "single critic, policy noise": ("paper", {"policy_noise": 0.3, "noise_clip": 0.4}),
}


def _agent(preset: str, fast: bool, **overrides: Any) -> DDPGAgent:
    torch.manual_seed(0)
    small = {"actor_hidden": (40, 30), "critic_hidden": (40, 30), "batch_size": 16}
    cfg = make_config(preset, fast_update=fast, **(small | overrides))
    return DDPGAgent(cfg, OBS, LOW, HIGH, torch.device("cpu"))


def _batches(n: int, size: int, n_step: bool = False) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        obs = torch.randn(size, OBS, generator=g) * 3 + 1
        action = torch.rand(size, ACT, generator=g) * torch.from_numpy(
            HIGH - LOW
        ) + torch.from_numpy(LOW)
        discount = 0.99 ** torch.randint(1, 4, (size,), generator=g).float() if n_step else None
        out.append(
            Batch(
                obs,
                action,
                torch.randn(size, generator=g),
                torch.randn(size, OBS, generator=g) * 3 + 1,
                (torch.rand(size, generator=g) < 0.2).float(),
                discount,
            )
        )
    return out


def _run(agent: DDPGAgent, batches: list[Batch]) -> list[dict[str, float]]:
    metrics = []
    for batch in batches:
        torch.manual_seed(5)  # the same target policy noise for both agents
        metrics.append({k: float(v) for k, v in agent.update(batch).items()})
    return metrics


def _flat_state(agent: DDPGAgent) -> dict[str, torch.Tensor]:
    state = agent.state_dict()
    out = {}
    for net in ("actor", "critic", "actor_target", "critic_target"):
        out |= {f"{net}.{k}": v for k, v in state[net].items()}
    for opt in ("actor_opt", "critic_opt"):
        for key, value in state[opt]["state"][0].items():
            out[f"{opt}.{key}"] = value
    return out


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_autograd(case: str) -> None:
    preset, overrides = CASES[case]
    ref, fast = _agent(preset, False, **overrides), _agent(preset, True, **overrides)
    assert fast._mlp is not None and ref._mlp is None
    # Two updates: a critic step each, and an actor step in the second at least (td3's delay).
    for batch in _batches(2, 16):
        _run(ref, [batch])
        _run(fast, [batch])
        actor_step = ref.updates % ref.cfg.policy_delay == 0
        for net in ("critic", "actor") if actor_step else ("critic",):
            opt_ref, opt_fast = getattr(ref, f"{net}_opt"), getattr(fast, f"{net}_opt")
            views = zip(
                getattr(ref, net).named_parameters(),
                _grad_views(getattr(ref, net), opt_ref.param.grad),
                _grad_views(getattr(fast, net), opt_fast.param.grad),
                strict=True,
            )
            # Parameter by parameter: the paper's small final layers make some gradients
            # thousands of times smaller than others.
            for (name, _), g_ref, g_fast in views:
                assert g_ref.norm() > 0, f"{net}.{name}"
                tol = 1e-5 * float(g_ref.abs().max())
                torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=tol, msg=f"{net}.{name}")


@pytest.mark.parametrize("case", CASES)
def test_same_state_as_autograd_after_updates(case: str) -> None:
    preset, overrides = CASES[case]
    ref, fast = _agent(preset, False, **overrides), _agent(preset, True, **overrides)
    batches = _batches(6, 16)
    m_ref, m_fast = _run(ref, batches), _run(fast, batches)
    for a, b in zip(m_ref, m_fast, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    s_ref, s_fast = _flat_state(ref), _flat_state(fast)
    assert s_ref.keys() == s_fast.keys()
    for key in s_ref:
        torch.testing.assert_close(s_fast[key], s_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert ref.updates == fast.updates == 6


def test_n_step_discount_equals_autograd() -> None:
    ref, fast = _agent("td3", False), _agent("td3", True)
    batch = _batches(1, 16, n_step=True)[0]
    _run(ref, [batch])
    _run(fast, [batch])
    torch.testing.assert_close(fast.critic_opt.param.grad, ref.critic_opt.param.grad)


def test_pixel_and_compiled_agents_use_autograd() -> None:
    assert _agent("paper", True, compile=True)._mlp is None
