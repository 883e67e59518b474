"""Group-relative advantages (GRPO) and gradient filtering (DASH)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) over each consecutive group of `group_size` samples.

    norm="mean" gives A_i = r_i - mean_g. std is the sample (Bessel-corrected) std, as in TRL's GRPO.
    An all-equal group gets A = 0 for every member.
    """
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if norm == "std":
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def gradient_filter(advantages: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean mask of samples kept for backprop: |A| > threshold (None keeps every sample)."""
    if threshold is None:
        return torch.ones_like(advantages, dtype=torch.bool)
    return advantages.abs() > threshold
