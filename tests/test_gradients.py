"""Gradient accumulation, normalisation before filtering, and forward passes skipped by filtering."""

import copy
import random
from dataclasses import replace

import pytest
import torch

from dash_exp.algorithms.advantages import backprop_set, kl_beta_effective
from dash_exp.algorithms.losses import normalizer
from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample
from dash_exp.factory import build

pytestmark = pytest.mark.integration

# the tests' short ids -> the registered policy losses
LOSSES = {"pg": "ppo_clip", "sft": "sft"}


@pytest.fixture
def policy_and_samples(make_cfg):
    torch.manual_seed(0)
    parts = build(make_cfg())
    parts.task.close()
    rng = random.Random(0)
    vocab = len(parts.tokenizer)
    samples = [
        TrainSample([rng.randrange(3, vocab) for _ in range(rng.randint(3, 9))],
                    [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], advantage=rng.uniform(-2, 2))
        for _ in range(7)
    ]
    # perturb a copy so the reference differs from the policy and the KL term has a gradient
    policy = parts.policy.double()  # float64: compare gradients tightly, free of float32 rounding
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref, samples, parts.tokenizer.pad_token_id


def grads(policy, samples, spec, norm, microbatch, pad_id, ref=None):
    policy.zero_grad(set_to_none=True)
    stats = accumulate_gradients(policy, samples, spec, norm, microbatch, pad_id, ref)
    return [p.grad.clone() for p in policy.parameters()], stats


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("kind", ["pg", "pg+kl", "sft", "sft+kl"])
def test_microbatches_of_unequal_sizes_give_the_full_batch_gradient(policy_and_samples, aggregation, kind):
    policy, ref, samples, pad = policy_and_samples
    spec = LossSpec(policy_loss=LOSSES[kind.split("+")[0]], aggregation=aggregation,
                    beta=0.04 if kind.endswith("+kl") else 0.0, temperature=0.9)
    norm = normalizer([len(s.response_ids) for s in samples], aggregation, max_new_tokens=12)
    full, full_stats = grads(policy, samples, spec, norm, 7, pad, ref)
    for s in samples:
        s.ref_logprobs = None
    micro, micro_stats = grads(policy, samples, spec, norm, 3, pad, ref)  # sizes 3, 3, 1
    assert micro_stats.forward_samples == full_stats.forward_samples == 7
    assert micro_stats.loss == pytest.approx(full_stats.loss, rel=1e-9)
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, micro, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_with_kl_filter_kl_keep_gives_the_unfiltered_gradient_and_drop_loses_the_filtered_kl_pull(policy_and_samples,
                                                                                                 aggregation):
    """beta > 0 and samples of advantage 0: filter_kl=keep backprops the filtered ones for their KL term alone and
    matches the unfiltered update exactly (float64); drop is the kept samples' update, whose KL pull is smaller
    by the filtered samples' share (kl_beta_effective)."""
    policy, ref, samples, pad = policy_and_samples
    for s in samples[::2]:
        s.advantage = 0.0
    keep = [abs(s.advantage) > 0.1 for s in samples]
    spec = LossSpec(beta=0.04, aggregation=aggregation, temperature=0.9)
    norm = normalizer([len(s.response_ids) for s in samples], aggregation, 12)

    def update(chosen):
        for s in chosen:
            s.ref_logprobs = None
        return grads(policy, chosen, spec, norm, 3, pad, ref)

    unfiltered, _ = update(samples)
    kept_set, kept_mask = backprop_set(samples, keep, "keep", spec.beta)
    assert kept_mask == [True] * 7 and [s.advantage for s in kept_set[::2]] == [0.0] * 4
    kept_grads, kept_stats = update(kept_set)
    dropped_set, dropped_mask = backprop_set(samples, keep, "drop", spec.beta)
    dropped, dropped_stats = update([s for s, k in zip(dropped_set, dropped_mask, strict=True) if k])
    assert kept_stats.forward_samples == 7 and dropped_stats.forward_samples == 3
    for a, b in zip(unfiltered, kept_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    gap = sum(float((a - b).norm()) for a, b in zip(unfiltered, dropped, strict=True))
    assert gap > 1e-3 * sum(float(a.norm()) for a in unfiltered)  # the filtered samples' KL pull is lost
    # the KL beta drop leaves: beta x the kept share of the normaliser's weight
    weight = [1 if aggregation == "seq_mean_token_mean" else len(s.response_ids) for s in samples]
    share = sum(w for w, k in zip(weight, keep, strict=True) if k) / sum(weight)
    assert kl_beta_effective(samples, keep, 0.04, aggregation) == pytest.approx(0.04 * share)
    assert kl_beta_effective(kept_set, kept_mask, 0.04, aggregation) == pytest.approx(0.04)
    # without KL (or with nothing filtered) both choices are the plain filter
    assert backprop_set(samples, keep, "keep", 0.0) == (samples, keep)


def test_filtering_zero_advantage_samples_keeps_the_gradient_and_skips_their_forward(policy_and_samples):
    """beta = 0: a sample of advantage 0 has a zero gradient, so dropping it changes nothing but the compute (with
    beta > 0 its KL term does not vanish: filter_kl, above)."""
    policy, _, samples, pad = policy_and_samples
    for s in samples[::2]:
        s.advantage = 0.0
    spec = LossSpec(beta=0.0)
    # the normalizer comes from ALL samples, before filtering
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", 12)
    everything, all_stats = grads(policy, samples, spec, norm, 2, pad)
    kept = [s for s in samples if abs(s.advantage) > 0.1]
    filtered, kept_stats = grads(policy, kept, spec, norm, 2, pad)
    assert all_stats.forward_samples == 7 and kept_stats.forward_samples == len(kept) == 3
    for a, b in zip(everything, filtered, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["pg", "pg+kl", "sft"])
def test_chunked_log_probs_give_the_unchunked_gradient(policy_and_samples, kind):
    # model.logprob_chunk: the LM head and log-softmax run a few tokens at a time (recomputed in backward)
    policy, ref, samples, pad = policy_and_samples
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", max_new_tokens=12)
    results = []
    for chunk in (None, 5, 1):
        for s in samples:
            s.ref_logprobs = None
        spec = LossSpec(policy_loss=LOSSES[kind.split("+")[0]], beta=0.04 if kind.endswith("+kl") else 0.0,
                        temperature=0.9, logprob_chunk=chunk)
        results.append(grads(policy, samples, spec, norm, 3, pad, ref))
    (full, full_stats), *chunked = results
    for grad, stats in chunked:
        assert stats.loss == pytest.approx(full_stats.loss, rel=1e-12)
        for a, b in zip(full, grad, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["pg+kl", "sft"])
def test_statistics_stay_on_the_device_and_sum_like_python_floats(policy_and_samples, kind):
    # accumulate_gradients reads nothing per micro-batch: its sums are device tensors, read once (UpdateStats.read);
    # they equal, bit for bit, the Python-float sums of each micro-batch's statistics
    from dash_exp.algorithms.update import SUMS
    from dash_exp.batching import microbatches

    policy, ref, samples, pad = policy_and_samples
    spec = LossSpec(policy_loss=LOSSES[kind.split("+")[0]], beta=0.04 if kind.endswith("+kl") else 0.0, temperature=0.9)
    for s in samples:
        s.old_logprobs = torch.zeros(len(s.response_ids), dtype=torch.float64)  # PPO-clip against stored log-probs
    _, stats = grads(policy, samples, spec, 40.0, 3, pad, ref)
    assert isinstance(stats.sums, torch.Tensor) and stats.sums.dtype == torch.float64
    assert isinstance(stats.tokens, int) and stats.tokens == sum(len(s.response_ids) for s in samples)
    expected = dict.fromkeys(SUMS, 0.0)
    for micro in microbatches(samples, 3):
        _, one = grads(policy, micro, spec, 40.0, len(micro), pad, ref)
        for name in SUMS:
            expected[name] += getattr(one, name)
    assert {name: getattr(stats, name) for name in SUMS} == expected
    assert stats.read() == [expected[name] for name in SUMS]
    assert stats.loss != 0 and (kind == "sft" or (stats.kl_sum > 0 and stats.approx_kl_sum > 0))


def with_sampler_logprobs(policy, samples, pad, offsets):
    """Copies of the samples carrying 'sampler' log-probs = the policy's own + a per-token offset (ratio
    pi_trainer / pi_sampler = exp(-offset)), and the policy's log-probs [B, T] and mask."""
    from dash_exp.batching import response_logprobs

    with torch.no_grad():
        logp, mask = response_logprobs(policy, samples, pad)
    out = []
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        out.append(TrainSample(s.prompt_ids, s.response_ids, s.advantage,
                               sampler_logprobs=(logp[i, :n] + offsets[i, :n]).tolist()))
    return out, logp, mask


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
def test_rollout_correction_weights_each_tokens_policy_gradient(policy_and_samples, correction):
    """The corrected gradient equals the float64 re-derivation sum_t w_t (-A_i) grad logp_t / norm, with the weights
    computed here from the ratios; the mismatch statistics are the ratios' mean and the share outside [0.9, 1.1]."""
    from dash_exp.batching import response_logprobs

    policy, _, samples, pad = policy_and_samples
    width = max(len(s.response_ids) for s in samples)
    offsets = torch.randn(len(samples), width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampled, logp, mask = with_sampler_logprobs(policy, samples, pad, offsets)
    ratio = torch.exp(-offsets)
    low, high = 0.5, 2.0
    weights = {"none": torch.ones_like(ratio), "tis": ratio.clamp(max=high),
               "mis": torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))}[correction]
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", 12)
    spec = LossSpec(rollout_correction=correction, correction_low=low, correction_high=high)
    ours, stats = grads(policy, sampled, spec, norm, 3, pad)
    policy.zero_grad(set_to_none=True)
    logp, _ = response_logprobs(policy, samples, pad)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float64)[:, None]
    (-(weights * adv * logp * mask).sum() / norm).backward()
    for a, b in zip(ours, [p.grad for p in policy.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    tokens = mask.sum().item()
    assert stats.mismatch_tokens == tokens
    assert stats.mismatch_ratio_sum / tokens == pytest.approx(((ratio * mask).sum() / tokens).item(), rel=1e-6)
    outside = (((ratio < 0.9) | (ratio > 1.1)) * mask).sum().item()
    assert stats.mismatch_outside == outside
    changed = {"none": 0, "tis": ((ratio > high) * mask).sum().item(),
               "mis": ((((ratio < low) | (ratio > high))) * mask).sum().item()}[correction]
    assert stats.corrected == changed and (correction == "none" or changed > 0)


def test_samples_without_sampler_logprobs_are_not_corrected(policy_and_samples):
    policy, _, samples, pad = policy_and_samples
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", 12)
    plain, stats = grads(policy, samples, LossSpec(), norm, 3, pad)
    tis, tis_stats = grads(policy, samples, LossSpec(rollout_correction="tis"), norm, 3, pad)
    assert all(torch.equal(a, b) for a, b in zip(plain, tis, strict=True))
    assert stats.mismatch_tokens == tis_stats.mismatch_tokens == 0


def full_logits_terms(policy, samples, pad, temperature):
    """From the model's whole [B, L, V] logits (float64, no chunking; the right-padded batch through the decoder,
    as the trainer runs it): each response token's log-prob and entropy -sum_v p_v log p_v [B, T], and the mask."""
    width = max(len(s.response_ids) for s in samples)
    ids = torch.full((len(samples), max(s.length for s in samples)), pad)
    for i, s in enumerate(samples):
        ids[i, : s.length] = torch.tensor(s.prompt_ids + s.response_ids)
    logits = policy.get_output_embeddings()(policy.get_decoder()(input_ids=ids).last_hidden_state) / temperature
    logp, ent = torch.zeros(len(samples), width, dtype=torch.float64), torch.zeros(len(samples), width,
                                                                                  dtype=torch.float64)
    mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        n, p = len(s.response_ids), len(s.prompt_ids)
        log_probs = torch.log_softmax(logits[i, p - 1: p - 1 + n], -1)
        logp[i, :n] = log_probs.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        ent[i, :n] = -(log_probs.exp() * log_probs).sum(-1)
        mask[i, :n] = 1
    return logp, ent, mask


@pytest.mark.parametrize("chunk", [None, 3])
def test_entropy_bonus_gradient_and_value_against_full_logits(policy_and_samples, chunk):
    """-coef x the aggregated entropy, from the LM head in chunks, against the same loss built from the whole
    logits. Compared as one loss, in one backward: the decoder's backward is not bitwise additive (the sum of two
    separately backpropagated terms differs from their joint backward at ~1e-7 relative), so the reference
    backpropagates the policy-gradient and entropy terms together, as the trainer does."""
    policy, _, samples, pad = policy_and_samples
    norm = normalizer([len(s.response_ids) for s in samples], "seq_mean_token_mean", 12)
    spec = LossSpec(aggregation="seq_mean_token_mean", temperature=0.9, logprob_chunk=chunk, entropy_coef=0.1)
    ours, stats = grads(policy, samples, spec, norm, 3, pad)
    policy.zero_grad(set_to_none=True)
    logp, ent, mask = full_logits_terms(policy, samples, pad, 0.9)
    assert stats.entropy_sum == pytest.approx((ent * mask).sum().item(), rel=1e-12)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float64)[:, None]
    token_mean = lambda x: ((x * mask).sum(1) / mask.sum(1)).sum()  # noqa: E731
    ((token_mean(-adv * logp) - 0.1 * token_mean(ent)) / norm).backward()
    for a, b in zip(ours, [p.grad for p in policy.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # and the bonus is there: without it the gradient is another
    plain, _ = grads(policy, samples, LossSpec(aggregation="seq_mean_token_mean", temperature=0.9), norm, 3, pad)
    assert max((a - b).abs().max().item() for a, b in zip(ours, plain, strict=True)) > 1e-3


def grouped(samples: list[TrainSample], group: int = 3) -> list[TrainSample]:
    """The fixture's samples regrouped: every `group` consecutive samples answer the same prompt."""
    return [TrainSample(samples[i - i % group].prompt_ids, s.response_ids, advantage=s.advantage)
            for i, s in enumerate(samples)]


def close_to(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    """Within `rel` of a's largest entry: the tiny model's norms run in float32 inside the float64 model, and the
    shared forward sums a prompt's gradient over its responses before those steps (not after)."""
    assert float((a - b).abs().max()) <= rel * float(a.abs().max())


@pytest.mark.parametrize("kind", ["pg", "pg+kl", "sft", "pg+entropy"])
def test_the_shared_prompt_forward_gives_the_separate_gradient_in_any_micro_batches(policy_and_samples, kind):
    """model.share_prompt: a group's prompt runs once per micro-batch; in micro-batches of 7, 3 and 1 sample (one:
    nothing shared) the gradient, loss and statistics are those of each sample's own forward."""
    policy, ref, samples, pad = policy_and_samples
    samples = grouped(samples)
    spec = LossSpec(policy_loss=LOSSES[kind.split("+")[0]], beta=0.04 if kind.endswith("+kl") else 0.0,
                    entropy_coef=0.01 if kind.endswith("+entropy") else 0.0, temperature=0.9)
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", max_new_tokens=12)
    separate, separate_stats = grads(policy, samples, spec, norm, 7, pad, ref)
    shared = replace(spec, share_prompt=True)
    assert any(g.abs().sum() > 0 for g in separate)
    for microbatch in (7, 3, 1):
        for s in samples:
            s.ref_logprobs = None
        grad, stats = grads(policy, samples, shared, norm, microbatch, pad, ref)
        assert stats.forward_samples == 7 and stats.tokens == separate_stats.tokens
        for key, value in separate_stats.as_dict().items():
            assert stats.as_dict()[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
        for a, b in zip(separate, grad, strict=True):
            close_to(a, b)


def test_the_shared_prompt_forward_of_the_filtered_batch_gives_the_unfiltered_gradient(policy_and_samples):
    policy, _, samples, pad = policy_and_samples
    samples = grouped(samples)
    for s in samples[1::3]:
        s.advantage = 0.0
    spec = LossSpec()
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", 12)
    everything, _ = grads(policy, samples, spec, norm, 7, pad)
    kept = [s for s in samples if abs(s.advantage) > 0.1]
    filtered, stats = grads(policy, kept, replace(spec, share_prompt=True), norm, 2, pad)
    assert stats.forward_samples == len(kept) == 5
    for a, b in zip(everything, filtered, strict=True):
        close_to(a, b)


def test_ppo_old_log_probs_of_the_shared_forward_equal_the_separate_ones(policy_and_samples):
    from dash_exp.algorithms.update import old_logprobs

    policy, _, samples, pad = policy_and_samples
    samples = grouped(samples)
    old_logprobs(policy, samples, pad, LossSpec(), 7)
    separate = [s.old_logprobs for s in samples]
    old_logprobs(policy, samples, pad, LossSpec(share_prompt=True), 3)
    for a, b in zip(separate, (s.old_logprobs for s in samples), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
