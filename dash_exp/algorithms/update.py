"""One optimizer step's gradient: micro-batched forward/backward of the kept samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dash_exp.algorithms.losses import aggregate_sum, kl_estimate, policy_loss, sft_loss
from dash_exp.batching import TrainSample, microbatches, pad_right, response_logprobs


@dataclass(frozen=True)
class LossSpec:
    """Which loss to build per token, and how to aggregate it."""

    # "pg" (policy gradient / PPO-clip, optionally + beta * KL) or "sft"
    kind: str
    aggregation: str = "token_mean"
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    estimator: str = "k3"
    # forward/backward dtype over the fp32 weights (autocast; float32 = off)
    compute_dtype: torch.dtype = torch.float32
    # tokens per LM-head chunk (None: auto)
    logprob_chunk: int | None = None


@dataclass
class UpdateStats:
    """Sums over the micro-batches of one optimizer step (divide by tokens for means)."""

    loss: float = 0.0
    pg: float = 0.0
    kl_loss: float = 0.0
    kl_sum: float = 0.0
    clipped: float = 0.0
    approx_kl_sum: float = 0.0
    tokens: int = 0
    forward_samples: int = 0


def accumulate_gradients(
    policy: torch.nn.Module,
    samples: Sequence[TrainSample],
    spec: LossSpec,
    norm: float,
    microbatch: int,
    pad_id: int,
    ref: torch.nn.Module | None = None,
) -> UpdateStats:
    """Add d(sum of weighted token losses / norm)/d(theta) of `samples` into .grad, micro-batch by micro-batch.

    The result does not depend on how samples are split into micro-batches.
    """
    stats = UpdateStats()
    for micro in microbatches(samples, microbatch):
        logp, mask = response_logprobs(policy, micro, pad_id, spec.temperature, spec.compute_dtype, spec.logprob_chunk)
        stats.forward_samples += len(micro)
        stats.tokens += int(mask.sum())
        if spec.kind == "sft":
            loss = aggregate_sum(sft_loss(logp), mask, spec.aggregation) / norm
        else:
            has_old = micro[0].old_logprobs is not None
            old = pad_right([s.old_logprobs for s in micro], logp.shape[1]) if has_old else logp.detach()
            adv = torch.tensor([s.advantage for s in micro], dtype=logp.dtype, device=logp.device)[:, None]
            pg_tokens, clipped = policy_loss(logp, old, adv, spec.clip_low, spec.clip_high)
            loss = aggregate_sum(pg_tokens, mask, spec.aggregation) / norm
            stats.clipped += float((clipped * mask).sum())
            log_ratio = (logp - old).detach()
            stats.approx_kl_sum += float(((torch.exp(-log_ratio) - 1 + log_ratio) * mask).sum())
        stats.pg += float(loss.detach())
        if spec.beta > 0:
            if ref is None:
                raise ValueError("beta > 0 needs a reference model")
            ref_lp = reference_logprobs(ref, micro, pad_id, spec, logp.shape[1])
            kl = kl_estimate(logp, ref_lp, spec.estimator)
            kl_loss = aggregate_sum(kl, mask, spec.aggregation) / norm
            loss = loss + spec.beta * kl_loss
            stats.kl_loss += float(kl_loss.detach())
            stats.kl_sum += float((kl.detach() * mask).sum())
        loss.backward()
        stats.loss += float(loss.detach())
    return stats


def reference_logprobs(
    ref: torch.nn.Module, micro: Sequence[TrainSample], pad_id: int, spec: LossSpec, width: int
) -> torch.Tensor:
    """Reference log-probs of the micro-batch, computed once per sample and cached on it."""
    missing = [s for s in micro if s.ref_logprobs is None]
    if missing:
        with torch.no_grad():
            lp, _ = response_logprobs(ref, missing, pad_id, spec.temperature, spec.compute_dtype, spec.logprob_chunk)
        for s, row in zip(missing, lp, strict=True):
            s.ref_logprobs = row[: len(s.response_ids)].clone()
    return pad_right([s.ref_logprobs for s in micro], width)


@torch.no_grad()
def old_logprobs(
    policy: torch.nn.Module, samples: Sequence[TrainSample], pad_id: int, spec: LossSpec, microbatch: int
) -> None:
    """Store log-probs of the pre-update policy on each sample (needed only for off-policy PPO)."""
    for micro in microbatches(samples, microbatch):
        lp, _ = response_logprobs(policy, micro, pad_id, spec.temperature, spec.compute_dtype, spec.logprob_chunk)
        for s, row in zip(micro, lp, strict=True):
            s.old_logprobs = row[: len(s.response_ids)].clone()
