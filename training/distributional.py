"""The categorical critic's arithmetic (C51, Bellemare et al. 2017, as FastTD3 uses it): a fixed
support of atoms, the expected value of a distribution over it, and the projection of a
shifted and scaled target distribution back onto the support.

The projection splits each shifted atom's mass between its two neighbouring atoms in
proportion to their distance, so mass is conserved, and where no atom is clipped at the support's
ends the projected distribution's mean is exactly ``reward + bootstrap * mean`` (linear
interpolation keeps the mean).
"""

from __future__ import annotations

import torch


def support(v_min: float, v_max: float, num_atoms: int, device: torch.device) -> torch.Tensor:
    """The atoms' values ``[num_atoms]``, evenly spaced from ``v_min`` to ``v_max``."""
    return torch.linspace(v_min, v_max, num_atoms, device=device)


def expected(probs: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Mean of distributions over ``atoms`` (``[..., num_atoms]`` probabilities) -> ``[...]``."""
    return (probs * atoms).sum(-1)


def project(
    probs: torch.Tensor, reward: torch.Tensor, bootstrap: torch.Tensor, atoms: torch.Tensor
) -> torch.Tensor:
    """The distribution of ``reward + bootstrap * Z`` (``Z ~ probs``, ``[B, K]``; ``reward``
    and ``bootstrap`` ``[B]``, ``bootstrap`` being ``discount * (1 - terminated)``) projected
    onto ``atoms``; values outside the support count at its ends. Returns ``[B, K]``."""
    k = atoms.numel()
    v_min, v_max = float(atoms[0]), float(atoms[-1])
    delta = (v_max - v_min) / (k - 1)
    shifted = (reward.unsqueeze(1) + bootstrap.unsqueeze(1) * atoms).clamp(v_min, v_max)
    b = ((shifted - v_min) / delta).clamp(0, k - 1)  # fractional atom index
    lower = b.floor()
    upper = b.ceil()
    # a shifted atom on an atom (lower == upper) keeps all its mass there
    w_lower = torch.where(upper == lower, torch.ones_like(b), upper - b)
    w_upper = b - lower
    out = torch.zeros_like(probs)
    out.scatter_add_(1, lower.long(), probs * w_lower)
    out.scatter_add_(1, upper.long(), probs * w_upper)
    return out
