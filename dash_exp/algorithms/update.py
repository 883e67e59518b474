"""One optimizer step's gradient: micro-batched forward/backward of the kept samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dash_exp.algorithms.correction import ROLLOUT_CORRECTIONS, mismatch_sums
from dash_exp.algorithms.losses import POLICY_LOSSES, Clip, aggregate_sum, kl_estimate
from dash_exp.batching import TrainSample, microbatches, pad_right, response_logprobs, to_device


@dataclass(frozen=True)
class LossSpec:
    """Which loss to build per token, and how to aggregate it."""

    # the per-token policy loss (losses.POLICY_LOSSES: ppo_clip, gspo, sft), plus beta * KL where beta > 0
    policy_loss: str = "ppo_clip"
    aggregation: str = "token_mean"
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    estimator: str = "k3"
    # entropy bonus: minus this x the aggregated entropy of the policy at each response token (0: not computed)
    entropy_coef: float = 0.0
    # weights for the sampler-vs-trainer gap (correction.ROLLOUT_CORRECTIONS: none, tis, mis) and their band
    rollout_correction: str = "none"
    correction_low: float = 0.5
    correction_high: float = 2.0
    # forward/backward dtype over the fp32 weights (autocast; float32 = off)
    compute_dtype: torch.dtype = torch.float32
    # tokens per LM-head chunk (None: auto)
    logprob_chunk: int | None = None
    # a micro-batch's samples share one forward of their prompt, or of their prompts' common prefix
    # (batching.response_logprobs; the same gradient to rounding)
    share_prompt: bool = False


# the float sums of UpdateStats, in the order of UpdateStats.sums
SUMS = ("loss", "pg", "kl_loss", "kl_sum", "clipped", "approx_kl_sum", "capped", "entropy_sum", "mismatch_ratio_sum",
        "mismatch_outside", "mismatch_tokens", "corrected")


def _sum(index: int, doc: str) -> property:
    return property(lambda self: self.read()[index], doc=doc)


@dataclass
class UpdateStats:
    """Sums over the micro-batches of one optimizer step (divide by tokens for means).

    `tokens` and `forward_samples` are host ints (counted from the samples' lengths). The float sums stay on the
    device while the micro-batches run (`sums`, float64, in SUMS order: no device sync per micro-batch) and are read
    to Python floats all at once, by `read` or on first access to one of them (`loss`, `pg`, ...), then cached.
    """

    sums: torch.Tensor
    tokens: int = 0
    forward_samples: int = 0
    _floats: list[float] | None = field(default=None, repr=False, compare=False)

    loss = _sum(0, "total loss: policy gradient (or SFT) + beta * KL, over the normaliser")
    pg = _sum(1, "policy-gradient (or SFT) loss over the normaliser")
    kl_loss = _sum(2, "KL loss over the normaliser (without beta)")
    kl_sum = _sum(3, "per-token KL estimate, summed over response tokens")
    clipped = _sum(4, "response tokens whose PPO ratio was clipped")
    approx_kl_sum = _sum(5, "per-token approximate KL to the pre-update policy, summed over response tokens")
    capped = _sum(6, "response tokens whose importance ratio was truncated at the cap (samples of older weights)")
    entropy_sum = _sum(7, "entropy of the policy at each response token, summed (entropy_coef > 0 only)")
    mismatch_ratio_sum = _sum(8, "pi_trainer / pi_sampler of each sampled response token, summed")
    mismatch_outside = _sum(9, "sampled response tokens whose trainer / sampler ratio lies outside [0.9, 1.1]")
    mismatch_tokens = _sum(10, "response tokens that carry the sampler's log-probs")
    corrected = _sum(11, "response tokens whose rollout-correction weight is not their ratio (truncated or masked)")

    def read(self, *extra: torch.Tensor) -> list[float]:
        """The float sums (SUMS order) followed by the values of the 0-dim tensors `extra`, in ONE device read
        (`.tolist()` of one concatenated tensor); the sums are cached, so reading them again costs nothing."""
        tensors = [e.detach().reshape(1).double() for e in extra]
        if self._floats is None:
            tensors.insert(0, self.sums)
        values = torch.cat(tensors).tolist() if tensors else []
        if self._floats is None:
            self._floats, values = values[: len(SUMS)], values[len(SUMS):]
        return [*self._floats, *values]

    def as_dict(self) -> dict[str, float]:
        """Every statistic by name (the sums read to floats)."""
        return {**dict(zip(SUMS, self.read(), strict=True)), "tokens": self.tokens,
                "forward_samples": self.forward_samples}


def accumulate_gradients(
    policy: torch.nn.Module,
    samples: Sequence[TrainSample],
    spec: LossSpec,
    norm: float,
    microbatch: int,
    pad_id: int,
    ref: torch.nn.Module | None = None,
    passes: int | None = None,
) -> UpdateStats:
    """Add d(sum of weighted token losses / norm)/d(theta) of `samples` into .grad, micro-batch by micro-batch.

    The result does not depend on how samples are split into micro-batches. No device sync: the statistics are
    accumulated as device tensors (read them once per optimizer step, `UpdateStats.read`). `passes` (data
    parallel): run exactly that many forward/backward passes, zero-weight ones where samples run out, so that
    every rank joins the same FSDP collectives.
    """
    stats = UpdateStats(sums=torch.zeros(len(SUMS), dtype=torch.float64, device=next(policy.parameters()).device))
    for micro in microbatches(samples, microbatch, passes, by_prompt=spec.share_prompt):
        if not micro:
            idle_pass(policy, pad_id, spec, backward=True)
            continue
        logp, mask, *entropy = response_logprobs(policy, micro, pad_id, spec.temperature, spec.compute_dtype,
                                                 spec.logprob_chunk, entropy=spec.entropy_coef > 0,
                                                 share_prompt=spec.share_prompt)
        stats.forward_samples += len(micro)
        stats.tokens += sum(len(s.response_ids) for s in micro)
        zero = logp.new_zeros(())
        kl_loss = kl_sum = entropy_sum = ratio_sum = outside = sampled = corrected = zero
        old = behaviour_logprobs(micro, logp)
        adv = torch.tensor([s.advantage for s in micro], dtype=logp.dtype, device=logp.device)[:, None]
        cap = torch.tensor([s.ratio_cap for s in micro], dtype=logp.dtype, device=logp.device)[:, None]
        terms = POLICY_LOSSES[spec.policy_loss](logp, old, adv, mask, Clip(spec.clip_low, spec.clip_high, cap))
        token_loss = terms.loss
        sampler = sampler_logprobs(micro, logp)
        if sampler is not None:  # the sampler's own log-probs of these tokens: measure (and correct) the gap
            sampled_mask = mask * sampler[1]
            ratio = torch.exp(old - sampler[0])
            ratio_sum, outside = mismatch_sums(ratio, sampled_mask)
            sampled = sampled_mask.sum()
            weights, changed = ROLLOUT_CORRECTIONS[spec.rollout_correction](ratio, spec.correction_low,
                                                                            spec.correction_high)
            if weights is not None:
                token_loss = token_loss * torch.where(sampler[1] > 0, weights, torch.ones_like(weights))
                corrected = (changed * sampled_mask).sum()
        loss = aggregate_sum(token_loss, mask, spec.aggregation) / norm
        clipped_sum = (terms.clipped * mask).sum()
        capped_sum = (terms.capped * mask).sum()
        log_ratio = (logp - old).detach()
        approx_kl = ((torch.exp(-log_ratio) - 1 + log_ratio) * mask).sum()
        if entropy:
            loss = loss - spec.entropy_coef * aggregate_sum(entropy[0], mask, spec.aggregation) / norm
            entropy_sum = (entropy[0].detach() * mask).sum()
        pg = loss.detach()
        if spec.beta > 0:
            if ref is None:
                raise ValueError("beta > 0 needs a reference model")
            ref_lp = reference_logprobs(ref, micro, pad_id, spec, logp.shape[1])
            kl = kl_estimate(logp, ref_lp, spec.estimator)
            kl_loss = aggregate_sum(kl, mask, spec.aggregation) / norm
            loss = loss + spec.beta * kl_loss
            kl_sum = (kl.detach() * mask).sum()
        loss.backward()
        with torch.no_grad():
            # in float64, from 0.0, in micro-batch order: the sums the Python floats once gave, bit for bit
            stats.sums += torch.stack([loss, pg, kl_loss, kl_sum, clipped_sum, approx_kl, capped_sum, entropy_sum,
                                       ratio_sum, outside, sampled, corrected]).double()
    return stats


def behaviour_logprobs(micro: Sequence[TrainSample], logp: torch.Tensor) -> torch.Tensor:
    """The ratio's denominator per sample: its `old_logprobs` where set (PPO's pre-update policy, or the sampler's
    log-probs of a sample from older weights), else the current log-probs detached (ratio exactly 1)."""
    if all(s.old_logprobs is None for s in micro):
        return logp.detach()
    current = logp.detach()
    rows = [s.old_logprobs if s.old_logprobs is not None else row for s, row in zip(micro, current, strict=True)]
    return pad_right(rows, logp.shape[1])


def sampler_logprobs(micro: Sequence[TrainSample], logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sampler's log-probs of the micro-batch's response tokens [B, T] and the mask of samples that carry them
    ([B, 1]: 1 where set), built on the host and sent in one copy; None where no sample carries them (SFT)."""
    if all(s.sampler_logprobs is None for s in micro):
        return None
    rows = torch.zeros(logp.shape, dtype=logp.dtype)
    has = torch.zeros((len(micro), 1), dtype=logp.dtype)
    for i, s in enumerate(micro):
        if s.sampler_logprobs is not None:
            rows[i, : len(s.sampler_logprobs)] = torch.tensor(s.sampler_logprobs, dtype=logp.dtype)
            has[i] = 1.0
    return to_device(rows, logp.device), to_device(has, logp.device)


def idle_pass(policy: torch.nn.Module, pad_id: int, spec: LossSpec, backward: bool) -> None:
    """A forward (and backward) of one pad token with zero weight: a data-parallel rank with nothing left to do
    still takes part in the sharded model's collectives; the gradient is unchanged."""
    logp, _ = response_logprobs(policy, [TrainSample([pad_id], [pad_id])], pad_id, spec.temperature,
                                spec.compute_dtype, spec.logprob_chunk, share_prompt=spec.share_prompt)
    if backward:
        (logp.sum() * 0.0).backward()


def reference_logprobs(
    ref: torch.nn.Module, micro: Sequence[TrainSample], pad_id: int, spec: LossSpec, width: int
) -> torch.Tensor:
    """Reference log-probs of the micro-batch, computed once per sample and cached on it."""
    missing = [s for s in micro if s.ref_logprobs is None]
    if missing:
        with torch.no_grad():
            lp, _ = response_logprobs(ref, missing, pad_id, spec.temperature, spec.compute_dtype, spec.logprob_chunk,
                                      share_prompt=spec.share_prompt)
        for s, row in zip(missing, lp, strict=True):
            s.ref_logprobs = row[: len(s.response_ids)].clone()
    return pad_right([s.ref_logprobs for s in micro], width)


@torch.no_grad()
def old_logprobs(
    policy: torch.nn.Module, samples: Sequence[TrainSample], pad_id: int, spec: LossSpec, microbatch: int,
    passes: int | None = None,
) -> None:
    """Store log-probs of the pre-update policy on each sample (needed only for off-policy PPO); `passes` as in
    accumulate_gradients."""
    for micro in microbatches(samples, microbatch, passes, by_prompt=spec.share_prompt):
        if not micro:
            idle_pass(policy, pad_id, spec, backward=False)
            continue
        lp, _ = response_logprobs(policy, micro, pad_id, spec.temperature, spec.compute_dtype, spec.logprob_chunk,
                                  share_prompt=spec.share_prompt)
        for s, row in zip(micro, lp, strict=True):
            s.old_logprobs = row[: len(s.response_ids)].clone()
