"""Gradient accumulation, normalisation before filtering, and forward passes skipped by filtering."""

import copy
import random

import pytest
import torch

from dash_exp.algorithms.advantages import backprop_set, kl_beta_effective
from dash_exp.algorithms.losses import normalizer
from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample
from dash_exp.factory import build

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
