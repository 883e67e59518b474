"""Group-relative advantages (GRPO) and gradient filtering (DASH)."""

from __future__ import annotations

from dataclasses import replace

import torch

from dash_exp.batching import TrainSample


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


def backprop_set(samples: list[TrainSample], keep: list[bool], filter_kl: str,
                 beta: float) -> tuple[list[TrainSample], list[bool]]:
    """The samples the update backpropagates and their mask, after gradient filtering (`keep`).

    drop (DASH, Huang et al. 2025, Sec. 4.2): a filtered sample leaves the batch whole. Its policy-gradient term is
      (about) zero, but with beta > 0 its KL term beta * d KL_i / d theta is not: it is lost, and the effective
      beta is beta x the kept share of the normaliser's weight (`kl_beta_effective`).
    keep: with beta > 0 every sample is backpropagated, a filtered one with advantage 0, so it adds its KL term
      alone. Where the filtered advantages are exactly 0 (|A| <= 0, or groups of equal rewards), the gradient is
      the unfiltered one; filtering then saves no compute (each sample's forward and backward, and its reference
      forward, are run).
    """
    if filter_kl == "drop" or beta == 0 or all(keep):
        return samples, keep
    return [s if k else replace(s, advantage=0.0) for s, k in zip(samples, keep, strict=True)], [True] * len(keep)


def kl_beta_effective(samples: list[TrainSample], keep: list[bool], beta: float, aggregation: str) -> float:
    """beta x the share of the KL loss's normaliser weight that the backpropagated samples carry: each sample
    weighs its tokens (token_mean, seq_mean_token_sum_norm) or 1 (seq_mean_token_mean)."""
    weight = (lambda s: 1) if aggregation == "seq_mean_token_mean" else (lambda s: len(s.response_ids))
    total = sum(weight(s) for s in samples)
    return beta * sum(weight(s) for s, k in zip(samples, keep, strict=True) if k) / max(total, 1)
