"""HF sampler: log-probs match the training forward, EOS stops, truncation flags, chunk invariance."""

import pytest
import torch

from dash_exp.batching import TrainSample, response_logprobs
from dash_exp.rollout.base import SamplingParams
from dash_exp.rollout.hf import gumbel_noise, truncate_logits
from dash_exp.run import build


@pytest.fixture
def parts(make_cfg):
    p = build(make_cfg())
    yield p
    p.task.close()


def prompts_of(parts, n):
    return [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in parts.task.test[:n]]


def test_sampler_logprobs_match_the_training_forward(parts):
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=24)
    rollouts = parts.sampler.generate(prompts_of(parts, 4), params, seeds=[1, 2, 3, 4])
    assert len(rollouts) == 12
    samples = [TrainSample(r.prompt_ids, r.response_ids) for r in rollouts]
    logp, mask = response_logprobs(parts.policy, samples, parts.tokenizer.pad_token_id, temperature=0.7)
    for i, r in enumerate(rollouts):
        n = len(r.response_ids)
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(logp[i, :n], torch.tensor(r.logprobs), rtol=0, atol=1e-4)


def test_stops_at_eos_or_flags_truncation(parts):
    eos = parts.tokenizer.eos_token_id
    for max_new in (3, 40):
        rollouts = parts.sampler.generate(prompts_of(parts, 6), SamplingParams(n=2, max_new_tokens=max_new), range(6))
        for r in rollouts:
            assert len(r.response_ids) <= max_new
            assert eos not in r.response_ids[:-1] and parts.tokenizer.pad_token_id not in r.response_ids
            assert r.truncated == (r.response_ids[-1] != eos)
            assert not r.truncated or len(r.response_ids) == max_new
    assert all(r.truncated for r in parts.sampler.generate(prompts_of(parts, 2), SamplingParams(max_new_tokens=3),
                                                           [0, 1]))


def test_samples_do_not_depend_on_batch_composition(parts):
    prompts, params = prompts_of(parts, 6), SamplingParams(n=4, max_new_tokens=40)
    together = parts.sampler.generate(prompts, params, seeds=list(range(6)))
    apart = [r for i in range(6) for r in parts.sampler.generate(prompts[i: i + 1], params, seeds=[i])]
    assert [r.response_ids for r in together] == [r.response_ids for r in apart]
    # ... and different seeds or sample indices give different samples
    assert len({tuple(r.response_ids) for r in together}) > 6


def test_greedy_matches_transformers_generate_while_dropping_finished_rows(parts):
    prompts = prompts_of(parts, 12)
    batch_sizes = []
    hook = parts.policy.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        ours = parts.sampler.generate(prompts, SamplingParams(greedy=True, max_new_tokens=40), range(12))
    finally:
        hook.remove()
    # rows that reached EOS left the batch before the last one stopped ...
    lengths = sorted(len(r.response_ids) for r in ours)
    assert lengths[0] < lengths[-1] and batch_sizes[0] == 12 and min(batch_sizes) < 12
    # ... and that changed no token
    for prompt, r in zip(prompts, ours, strict=True):
        out = parts.policy.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, use_cache=True,
                                    eos_token_id=parts.tokenizer.eos_token_id, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == r.response_ids


def test_each_prompt_is_read_once_per_group(parts):
    prompts = prompts_of(parts, 3)
    calls = []
    hook = parts.policy.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        rollouts = parts.sampler.generate(prompts, SamplingParams(n=4, max_new_tokens=20), [7, 8, 9])
    finally:
        hook.remove()
    # one prefill row per prompt, then one decode row per sample
    assert calls[0] == (3, max(len(p) for p in prompts)) and calls[1] == (12, 1)
    # the shared prefill gives each sample the log-probs of its own full forward
    samples = [TrainSample(r.prompt_ids, r.response_ids) for r in rollouts]
    logp, _ = response_logprobs(parts.policy, samples, parts.tokenizer.pad_token_id)
    for i, r in enumerate(rollouts):
        torch.testing.assert_close(logp[i, : len(r.logprobs)], torch.tensor(r.logprobs), rtol=0, atol=1e-4)


def test_gumbel_noise_is_a_pure_function_of_key_position_token():
    keys = torch.tensor([5, 6, 5])
    a, b = gumbel_noise(keys, 3, 50), gumbel_noise(keys, 3, 50)
    assert torch.equal(a, b) and torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, gumbel_noise(keys, 4, 50))
    # Gumbel(0,1) has mean ~0.5772
    assert gumbel_noise(torch.arange(200), 0, 500).mean().item() == pytest.approx(0.5772, abs=0.02)


def test_top_k_and_top_p_truncation_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(truncate_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 covers it -> keep the first two
    assert torch.isinf(truncate_logits(logits, top_k=0, top_p=0.7)).tolist() == [[False, False, True, True]]
