"""Per-token policy losses, KL estimators and aggregations: three registries of pure tensor functions, no I/O.

Notation (per response token t of sample i): logp = log pi_theta, old = log pi_old (pre-update policy),
ref = log pi_ref (frozen start policy), A_i the sample's advantage, ratio = exp(logp - old), mask the response
tokens. On-policy (one optimizer step per batch) old = logp.detach(): the ratio is 1 and its gradient grad logp.

Policy losses (`algorithm.policy_loss`), each (logp, old, A, mask, clip) -> PolicyTerms:
  ppo_clip:  l = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); where A < 0 and ratio > cap,
             l = -cap * A (dual-clip PPO, the bound on samples of older weights in overlapped rollout)
  gspo:      the same with the sequence's ratio s_i = exp(mean_t (logp - old)) in place of the token's
  cispo:     l = -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * logp (the weight is clipped, not the gradient)
  sft:       l = -logp (cross-entropy on the target tokens; A and old unused)
KL penalty (`kl.estimator`), estimators of KL(pi_theta || pi_ref) from samples of pi_theta, log_r = ref - logp:
  k1 = -log_r      k2 = log_r^2 / 2      k3 = exp(log_r) - 1 - log_r
total: l + beta * k

Aggregation (`algorithm.aggregation`): every micro-batch contributes a SUM of weighted token losses; the step divides
by one normaliser computed from the step's batch BEFORE gradient filtering, so any micro-batching leaves the gradient
unchanged, and so does filtering samples of advantage 0 when beta = 0. With beta > 0 such a sample still has a KL
gradient: `filter_kl` drops it with the sample (the paper's DASH) or keeps it (`advantages.backprop_set`).
  token_mean:               weight 1,           normaliser = total response tokens
  seq_mean_token_mean:      weight 1/len_i,     normaliser = number of sequences
  seq_mean_token_sum_norm:  weight 1,           normaliser = sequences * max_new_tokens  (Dr.GRPO)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dash_exp.algorithms.registry import Registry


@dataclass(frozen=True)
class Clip:
    """The ratio's trust region: [1 - low, 1 + high], and the dual-clip cap where A < 0 (inf: none)."""

    low: float = 0.2
    high: float = 0.2
    # [B, 1] per sample (samples of older weights carry one) or a float
    cap: torch.Tensor | float = math.inf


class PolicyTerms(NamedTuple):
    """A policy loss's per-token loss [B, T], and the masks of tokens where the clip and the cap are active."""

    loss: torch.Tensor
    clipped: torch.Tensor
    capped: torch.Tensor


# (logp [B, T], old [B, T], advantages [B, 1], mask [B, T], clip) -> PolicyTerms
PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Clip], PolicyTerms]
# trait `targets`: the loss trains on given target tokens (reference solutions or traces), not on sampled rollouts
POLICY_LOSSES: Registry[PolicyLoss] = Registry("algorithm.policy_loss")


def _clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, clip: Clip) -> PolicyTerms:
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip.low, 1 + clip.high) * advantages
    capped = (advantages < 0) & (ratio > clip.cap)
    loss = torch.where(capped, -clip.cap * advantages, -torch.minimum(unclipped, clipped))
    return PolicyTerms(loss, clipped < unclipped, capped)


@POLICY_LOSSES.register("ppo_clip", source="Schulman et al. 2017, arXiv 1707.06347; dual clip: Ye et al. 2020, "
                        "arXiv 1912.09729", targets=False)
def ppo_clip(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             clip: Clip) -> PolicyTerms:
    """Token-level PPO clip: -min(r_t A, clip(r_t, 1 - low, 1 + high) A), r_t = exp(logp_t - old_t); -cap A where
    A < 0 and r_t > cap."""
    return _clipped_objective(torch.exp(logp - old), advantages, clip)


@POLICY_LOSSES.register("gspo", source="Zheng et al. 2025 (GSPO), arXiv 2507.18071", targets=False)
def gspo(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
         clip: Clip) -> PolicyTerms:
    """Sequence-level PPO clip on s_i = exp(mean_t (logp_t - old_t)), per token as sg(s_i) exp(logp_t - sg(logp_t)).

    Every token of a sample shares its value s_i and clip decision; the gradient of token t is s_i grad logp_t, so
    with `seq_mean_token_mean` the sample's gradient is GSPO's s_i A_i mean_t grad logp_t (the paper's clip range is
    [1 - 3e-4, 1 + 4e-4]). The dual-clip cap applies to s_i.
    """
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    seq_log_ratio = ((logp - old) * mask).sum(dim=1, keepdim=True) / lengths
    ratio = torch.exp(seq_log_ratio.detach() + logp - logp.detach())
    return _clipped_objective(ratio, advantages, clip)


@POLICY_LOSSES.register("cispo", source="MiniMax 2025 (CISPO), arXiv 2506.13585", targets=False)
def cispo(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
          clip: Clip) -> PolicyTerms:
    """CISPO: -sg(clip(r_t, 1 - low, 1 + high)) A logp_t: the importance weight is clipped, never the gradient.

    PPO's clip zeroes the gradient of a token whose ratio left the trust region; CISPO keeps every token's gradient
    and bounds its weight instead (the cap is not needed: the weight never exceeds 1 + high). On-policy (r = 1) it
    is the policy gradient.
    """
    ratio = torch.exp(logp - old).detach()
    weight = torch.clamp(ratio, 1 - clip.low, 1 + clip.high)
    clipped = (ratio < 1 - clip.low) | (ratio > 1 + clip.high)
    return PolicyTerms(-weight * advantages * logp, clipped, torch.zeros_like(clipped))


@POLICY_LOSSES.register("sft", source="cross-entropy (SFT-H on reference solutions, SFT-M on traces)", targets=True)
def sft(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        clip: Clip) -> PolicyTerms:
    """Cross-entropy on the target tokens: -logp_t (advantage, old policy and clip unused)."""
    none = torch.zeros_like(logp, dtype=torch.bool)
    return PolicyTerms(-logp, none, none)


# (logp [B, T], ref [B, T]) -> per-token estimate [B, T]
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl.estimator")
SCHULMAN = "Schulman 2020, joschu.net/blog/kl-approx.html"


@KL_ESTIMATORS.register("k1", source=SCHULMAN)
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref: unbiased, high variance, negative per token where ref > logp."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2", source=SCHULMAN)
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (ref - logp)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (ref_logp - logp).square()


@KL_ESTIMATORS.register("k3", source=SCHULMAN)
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - 1 - (ref - logp): unbiased, low variance, >= 0 (GRPO's)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1 - log_r


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) with the registered `estimator`."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)


@dataclass(frozen=True)
class Aggregation:
    """How a step's token losses become one number: each micro-batch's weighted sum (`total` of the masked token
    losses and the mask) over one normaliser of the whole step (`normalizer` of its response lengths and
    max_new_tokens); `sample_weight` is a sample's share of that normaliser, by its response length."""

    summary: str
    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    normalizer: Callable[[Sequence[int], int], float]
    sample_weight: Callable[[int], float]


AGGREGATIONS: Registry[Aggregation] = Registry("algorithm.aggregation")
AGGREGATIONS.register("token_mean", source="Yu et al. 2025 (DAPO), arXiv 2503.14476")(Aggregation(
    "sum of token losses / the step's response tokens: every token weighs the same",
    total=lambda masked, mask: masked.sum(),
    normalizer=lambda lengths, max_new_tokens: float(max(sum(lengths), 1)),
    sample_weight=lambda length: length))
AGGREGATIONS.register("seq_mean_token_mean", source="Shao et al. 2024 (GRPO), arXiv 2402.03300")(Aggregation(
    "mean over sequences of each sequence's token mean: every sequence weighs the same",
    total=lambda masked, mask: (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum(),
    normalizer=lambda lengths, max_new_tokens: float(len(lengths)),
    sample_weight=lambda length: 1))
AGGREGATIONS.register("seq_mean_token_sum_norm", source="Liu et al. 2025 (Dr. GRPO), arXiv 2503.20783")(Aggregation(
    "sum of token losses / (sequences x max_new_tokens): a constant normaliser",
    total=lambda masked, mask: masked.sum(),
    normalizer=lambda lengths, max_new_tokens: float(len(lengths) * max_new_tokens),
    sample_weight=lambda length: length))


def aggregate_sum(token_loss: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Sum of weighted token losses of one micro-batch (divide by `normalizer` of the step)."""
    return AGGREGATIONS[aggregation].total(token_loss * mask, mask)


def normalizer(response_lengths: Sequence[int], aggregation: str, max_new_tokens: int) -> float:
    """The step's divisor, from ALL of its samples (before filtering)."""
    return AGGREGATIONS[aggregation].normalizer(response_lengths, max_new_tokens)
