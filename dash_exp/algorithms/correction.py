"""Rollout correction: importance weights for the gap between the sampler's and the trainer's probabilities of the
same tokens (a registry: `algorithm.rollout_correction`), and how that gap is measured.

The sampler (vLLM in bf16, say) and the trainer (fp32) give the same token different probabilities, so "on-policy"
samples are slightly off-policy. Per response token, ratio_t = pi_trainer(y_t) / pi_sampler(y_t), with pi_trainer
the pre-update policy (the ratio's denominator in the PPO loss) and pi_sampler the log-probs the sampler returned.
Each option maps the ratios [B, T] to the weights that multiply the per-token policy loss (detached: the weight
scales the token's gradient, it is not differentiated) and the mask of tokens whose weight is not the ratio itself.
A weight of 0 removes a token's policy-gradient term; the step's normaliser is unchanged (as for every selection
here: `losses` module docstring), where verl also takes masked tokens out of the denominator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dash_exp.algorithms.registry import Registry

# the band of ratios counted as matched in the mismatch metrics (TRL PR #7269 reports the share outside it)
MATCHED = (0.9, 1.1)

# (ratio [B, T], low, high) -> (weights [B, T] or None: no weighting, mask of tokens whose weight was changed)
Correction = Callable[[torch.Tensor, float, float], tuple[torch.Tensor | None, torch.Tensor]]
ROLLOUT_CORRECTIONS: Registry[Correction] = Registry("algorithm.rollout_correction")


@ROLLOUT_CORRECTIONS.register("none", source="the sampler's samples taken as the trainer's own")
def none(ratio: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """No weighting: every token's loss as computed (the mismatch is still measured)."""
    return None, torch.zeros_like(ratio, dtype=torch.bool)


@ROLLOUT_CORRECTIONS.register("tis", source="Yao et al. 2025, fengyao.notion.site/off-policy-rl (truncated IS)")
def tis(ratio: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Truncated importance sampling: w_t = min(ratio_t, high) (`correction_high`; `low` unused)."""
    return ratio.clamp(max=high), ratio > high


@ROLLOUT_CORRECTIONS.register("mis", source="Liu, Li et al. 2025, 'When Speed Kills Stability' (masked IS, verl "
                              "rollout_rs); IcePop (Ling Team 2025)")
def mis(ratio: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Masked importance sampling: w_t = ratio_t where low <= ratio_t <= high, else 0 (the token is dropped)."""
    outside = (ratio < low) | (ratio > high)
    return torch.where(outside, torch.zeros_like(ratio), ratio), outside


def mismatch_sums(ratio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over response tokens of ratio_t, and the count of tokens whose ratio lies outside MATCHED."""
    outside = (ratio < MATCHED[0]) | (ratio > MATCHED[1])
    return (ratio * mask).sum(), (outside * mask).sum()
