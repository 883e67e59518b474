"""Advantage estimators (a registry: `algorithm.advantage`), gradient filtering (DASH) and the backprop set.

Every estimator maps the step batch's rewards [B] (consecutive groups of `group_size` samples of one prompt) to one
advantage per sample [B]; the loss gives each response token its sample's advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from dash_exp.algorithms.losses import AGGREGATIONS
from dash_exp.algorithms.registry import Registry
from dash_exp.batching import TrainSample

# (rewards [B], group_size, eps) -> advantages [B]
Estimator = Callable[[torch.Tensor, int, float], torch.Tensor]
ADVANTAGES: Registry[Estimator] = Registry("algorithm.advantage")


def _centered(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_i - mean_g, as [groups, group_size]."""
    groups = rewards.view(-1, group_size)
    return groups - groups.mean(dim=1, keepdim=True)


@ADVANTAGES.register("grpo", source="Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300")
def grpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), std the sample (Bessel) std of the group, as TRL's GRPO."""
    return (_centered(rewards, group_size) / (rewards.view(-1, group_size).std(dim=1, keepdim=True) + eps)).reshape(-1)


@ADVANTAGES.register("drgrpo", source="Liu et al. 2025 (Dr. GRPO), arXiv 2503.20783")
def drgrpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A_i = r_i - mean_g: GRPO without the std division (no bias toward groups of small reward spread)."""
    return _centered(rewards, group_size).reshape(-1)


@ADVANTAGES.register("rloo", source="Ahmadian et al. 2024 (RLOO), arXiv 2402.14740; Kool et al. 2019")
def rloo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g): the leave-one-out baseline (unbiased)."""
    return (_centered(rewards, group_size) * (group_size / (group_size - 1))).reshape(-1)


@ADVANTAGES.register("reinforce_pp", source="Hu et al. 2025 (REINFORCE++-baseline), arXiv 2501.03262")
def reinforce_pp(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A_i = c_i / (std_B c + eps), c_i = r_i - mean_g: the group baseline, whitened over the whole step batch.

    Each sample weighs 1 in the batch (Bessel) std, and the batch mean of c is 0 (every group's is), so it is not
    subtracted: a group of equal rewards keeps A exactly 0 (the gradient filter drops it as under GRPO). OpenRLHF and
    verl whiten over tokens instead (a sample weighs its length, and the shift by the token mean is not 0).
    """
    centered = _centered(rewards, group_size).reshape(-1)
    return centered / (centered.std() + eps)


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
    weight = AGGREGATIONS[aggregation].sample_weight
    total = sum(weight(len(s.response_ids)) for s in samples)
    return beta * sum(weight(len(s.response_ids)) for s, k in zip(samples, keep, strict=True) if k) / max(total, 1)
