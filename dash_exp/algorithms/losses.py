"""Per-token losses, KL estimators and aggregation. Pure tensor math, no I/O.

Notation (per response token t of sample i): logp = log pi_theta, old = log pi_old (pre-update policy),
ref = log pi_ref (frozen start policy), A_i the sample's advantage, ratio = exp(logp - old).

  policy gradient / PPO-clip:  l = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
      (on-policy: old = logp.detach(), so ratio == 1 and the gradient is -A * grad logp)
  off-policy correction (overlapped rollout, samples from older weights): old = the behaviour policy's log-probs
      as the sampler recorded them (never recomputed), and where A < 0 the ratio is truncated at `cap`:
      l = -cap * A once ratio > cap (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729; verl's clip_ratio_c), so a
      stale sample's weight is bounded on both sides (A > 0: by the clip at 1 + eps_high)
  KL penalty (Schulman's estimators of KL(pi_theta || pi_ref), with log_r = ref - logp):
      k1 = -log_r      k2 = log_r^2 / 2      k3 = exp(log_r) - 1 - log_r
  SFT: l = -logp  (on reference/trace tokens; with kl=on the same beta * k term pulls toward pi_ref)
  total: l + beta * k

Aggregation: every micro-batch contributes a SUM of weighted token losses; the step divides by one
normalizer computed from the step's batch BEFORE gradient filtering, so any micro-batching leaves the gradient
unchanged, and so does filtering samples of advantage 0 when beta = 0. With beta > 0 such a sample still has a KL
gradient: `filter_kl` drops it with the sample (the paper's DASH) or keeps it (`advantages.backprop_set`).
  token_mean:               weight 1,           normalizer = total response tokens
  seq_mean_token_mean:      weight 1/len_i,     normalizer = number of sequences
  seq_mean_token_sum_norm:  weight 1,           normalizer = sequences * max_new_tokens  (Dr.GRPO)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta."""
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"kl estimator {estimator!r}: expected one of k1, k2, k3")


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
    cap: torch.Tensor | float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip per-token loss (ratio truncated at `cap` where A < 0), the mask of tokens where the clip is active
    and the mask of tokens where the cap is.

    advantages and cap broadcast against logp (shape [B, 1] for per-sample values; cap inf = no cap).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    capped = (advantages < 0) & (ratio > cap)
    loss = torch.where(capped, -cap * advantages, -torch.minimum(unclipped, clipped))
    return loss, clipped < unclipped, capped


def sft_loss(logp: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy on the target tokens."""
    return -logp


def aggregate_sum(token_loss: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Sum of weighted token losses of one micro-batch (divide by `normalizer` of the step)."""
    masked = token_loss * mask
    if aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        return masked.sum()
    if aggregation == "seq_mean_token_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    raise ValueError(f"aggregation {aggregation!r}: expected token_mean, seq_mean_token_mean "
                     "or seq_mean_token_sum_norm")


def normalizer(response_lengths: Sequence[int], aggregation: str, max_new_tokens: int) -> float:
    """The step's divisor, from ALL of its samples (before filtering)."""
    if aggregation == "token_mean":
        return float(max(sum(response_lengths), 1))
    if aggregation == "seq_mean_token_mean":
        return float(len(response_lengths))
    if aggregation == "seq_mean_token_sum_norm":
        return float(len(response_lengths) * max_new_tokens)
    raise ValueError(f"aggregation {aggregation!r}: expected token_mean, seq_mean_token_mean "
                     "or seq_mean_token_sum_norm")
