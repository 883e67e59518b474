"""HF sampler: log-probs match the training forward, EOS stops, truncation flags, chunk invariance."""

import pytest
import torch

from dash_exp.batching import TrainSample, response_logprobs
from dash_exp.factory import build
from dash_exp.rollout.base import SamplingParams
from dash_exp.rollout.hf import HFSampler, inverse_cdf_sample, truncation_mask, uniform_noise


@pytest.fixture
def parts(make_cfg):
    p = build(make_cfg())
    yield p
    p.task.close()


def prompts_of(parts, n):
    return [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in parts.task.test[:n]]


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_samples_do_not_depend_on_batch_composition(parts):
    prompts, params = prompts_of(parts, 6), SamplingParams(n=4, max_new_tokens=40)
    together = parts.sampler.generate(prompts, params, seeds=list(range(6)))
    apart = [r for i in range(6) for r in parts.sampler.generate(prompts[i: i + 1], params, seeds=[i])]
    assert [r.response_ids for r in together] == [r.response_ids for r in apart]
    # ... and different seeds or sample indices give different samples
    assert len({tuple(r.response_ids) for r in together}) > 6


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.unit
def test_uniform_noise_is_a_pure_function_of_key_and_position():
    keys = torch.tensor([5, 6, 5])
    a, b = uniform_noise(keys, 3), uniform_noise(keys, 3)
    assert a.shape == (3,) and torch.equal(a, b) and a[0] == a[2] and a[0] != a[1]
    assert not torch.equal(a, uniform_noise(keys, 4))
    # U(0, 1]: never 0 (the first token of the CDF is then drawn with its own probability), flat over 20 bins
    u = torch.cat([uniform_noise(torch.arange(2000), t) for t in range(10)])
    assert float(u.min()) > 0 and float(u.max()) <= 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert float(((counts - 1000) ** 2 / 1000).sum()) < 60  # chi-square, 19 dof: p < 1e-5


def pick_many(logits_row: torch.Tensor, params: SamplingParams, n: int = 10000, positions: int = 1):
    """The HF sampler's pick for n rows (keys 0..n-1) sharing one logits row, at `positions` positions."""
    sampler = HFSampler(torch.nn.Identity(), pad_id=0, eos_ids=[0])
    logits = logits_row.expand(n, -1).contiguous()
    # a fresh copy per call: _pick may scale its logits in place
    picks = [sampler._pick(logits.clone(), params, torch.arange(n), t) for t in range(positions)]
    return torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks])


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    seen = expected > 0
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


@pytest.mark.unit
def test_inverse_cdf_sampling_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 1.5])
    params = SamplingParams(temperature=0.7)
    tokens, logp = pick_many(logits, params, n=10000, positions=3)
    probs = torch.softmax(logits / 0.7, -1)
    assert chi_square(tokens, probs) < 40  # 7 dof: p ~ 1e-6
    # the log-prob returned is log softmax(logits / T) of the drawn token
    torch.testing.assert_close(logp, torch.log(probs)[tokens], rtol=0, atol=1e-6)


@pytest.mark.unit
def test_inverse_cdf_never_draws_a_zero_weight():
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]]).expand(4096, -1).contiguous()
    u = torch.cat([torch.tensor([1e-9, 0.3, 0.34, 1.0]), uniform_noise(torch.arange(4092), 0)])
    tokens = inverse_cdf_sample(weights.clone(), u)
    assert set(tokens.tolist()) == {1, 4} and tokens[:4].tolist() == [1, 1, 4, 4]


@pytest.mark.unit
@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.7), (4, 0.8)])
def test_top_k_top_p_sampling_draws_only_kept_tokens_in_proportion(top_k, top_p):
    logits = torch.tensor([0.2, 2.0, 1.0, -0.5, 1.7, 0.0, 0.9, -1.0])
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)
    tokens, logp = pick_many(logits, params, n=10000, positions=2)
    kept = ~truncation_mask(logits[None] / 0.9, top_k, top_p)[0]
    assert 1 < int(kept.sum()) < 8 and bool(kept[tokens].all())
    probs = torch.softmax((logits / 0.9).masked_fill(~kept, float("-inf")), -1)
    assert chi_square(tokens, probs) < 40
    # the log-prob is that of the untruncated softmax
    torch.testing.assert_close(logp, torch.log_softmax(logits / 0.9, -1)[tokens], rtol=0, atol=1e-6)


@pytest.mark.unit
def test_top_k_and_top_p_truncation_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert truncation_mask(logits, top_k=2, top_p=1.0).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 covers it -> keep the first two
    assert truncation_mask(logits, top_k=0, top_p=0.7).tolist() == [[False, False, True, True]]


@pytest.mark.unit
def test_the_preallocated_kv_cache_holds_what_dynamic_cache_holds_without_reallocating():
    """Prompt rows repeated per sample, decode steps written in place (the buffer never moves), rows dropped: the
    keys and values seen by attention equal DynamicCache's at every step."""
    from transformers.cache_utils import DynamicCache

    from dash_exp.rollout.kv_cache import preallocate

    torch.manual_seed(0)
    prompt_k, prompt_v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    theirs, ours = DynamicCache(), DynamicCache()
    for cache in (theirs, ours):
        cache.update(prompt_k, prompt_v, 0)
    theirs.batch_repeat_interleave(3)
    preallocate(ours, capacity=9, repeats=3)
    buffer = ours.layers[0].key_buffer.data_ptr()
    for step in range(4):
        k, v = torch.randn(6 if step < 2 else 4, 3, 1, 4), torch.randn(6 if step < 2 else 4, 3, 1, 4)
        got, want = ours.update(k, v, 0), theirs.update(k, v, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert ours.get_seq_length() == theirs.get_seq_length() == 6 + step
        if step == 1:  # two of the six rows finish
            keep = torch.tensor([0, 2, 3, 5])
            ours.reorder_cache(keep)
            theirs.reorder_cache(keep)
            buffer = ours.layers[0].key_buffer.data_ptr()
        assert ours.layers[0].key_buffer.data_ptr() == buffer
    with pytest.raises(RuntimeError, match="KV cache full"):
        ours.update(torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4), 0)


@pytest.mark.unit
def test_preallocated_kv_cache_drops_rows_in_place_as_dynamic_cache_does():
    from transformers.cache_utils import DynamicLayer

    from dash_exp.rollout.kv_cache import PreallocatedLayer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    ours = PreallocatedLayer(keys, values, capacity=9, repeats=3)  # 2 prompts x 3 samples
    theirs = DynamicLayer()
    theirs.update(keys.repeat_interleave(3, dim=0), values.repeat_interleave(3, dim=0))
    storage = ours.key_buffer.untyped_storage().data_ptr()
    for rows in (None, torch.tensor([0, 2, 3, 5]), torch.tensor([1, 3])):
        if rows is not None:
            ours.batch_select_indices(rows)
            theirs.batch_select_indices(rows)
        step = torch.randn(len(theirs.keys), 3, 1, 4, generator=g), torch.randn(len(theirs.keys), 3, 1, 4, generator=g)
        for got, want in zip(ours.update(*step), theirs.update(*step), strict=True):
            assert torch.equal(got, want)
    assert ours.get_seq_length() == 8 and ours.key_buffer.untyped_storage().data_ptr() == storage  # never reallocated
