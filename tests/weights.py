"""Snapshots of a network's weights, for tests that check what an update moved."""

from __future__ import annotations

import torch


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s floating-point parameters and buffers, by name."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether any tensor of snapshot ``a`` differs from ``b``'s of the same name."""
    return any(not torch.equal(a[k], b[k]) for k in a)
