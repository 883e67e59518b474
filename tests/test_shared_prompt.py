"""Shared-prompt forward (dash_exp.shared_prompt): the flat layout, hand-checked; log-probs and gradients equal to
each sample's own forward on small random Llama (multi-head) and Qwen2 (grouped-query) models in float64; every
other forward of an enabled model unchanged."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dash_exp import shared_prompt
from dash_exp.batching import TrainSample, response_logprobs

pytestmark = pytest.mark.unit

VOCAB = 50


def model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, attn_implementation="sdpa")
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=4)).double()
    return Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=2)).double()


def samples(seed: int = 0) -> list[TrainSample]:
    """Three prompts of different lengths, 2-4 responses each, of different lengths, interleaved."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (7, 3, 11)]
    out = [TrainSample(prompts[i % 3], [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 9))],
                       advantage=rng.uniform(-1, 1)) for i in range(9)]
    return out[:8]  # the last prompt keeps two responses


def test_pack_lays_out_each_prompt_once_then_its_responses_at_their_own_positions():
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3]]
    responses = [[6, 7], [8], [9, 10, 11]]
    p = shared_prompt.pack(prompts, responses, torch.device("cpu"))
    assert p.input_ids.tolist() == [[1, 2, 3, 6, 7, 9, 10, 11, 4, 5, 8]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2]]
    lay = p.layout
    assert lay.prompt_index.tolist() == [[0, 1, 2], [8, 9, 0]]
    assert lay.prompt_real.tolist() == [[True, True, True], [True, True, False]]
    assert lay.response_index.tolist() == [[3, 4, 0], [10, 0, 0], [5, 6, 7]]
    assert lay.response_prompt.tolist() == [0, 1, 0]
    # sample 1 (prompt [4, 5]): its prompt's two real tokens, then its own tokens causally
    assert lay.response_mask[1, 0].int().tolist() == [[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 1, 1]]
    # the prediction of response token j: the prompt's last token for j = 0, else response token j - 1
    assert p.predict_at.tolist() == [2, 3, 9, 2, 5, 6]
    assert p.targets.tolist() == [6, 7, 8, 9, 10, 11]
    assert p.row.tolist() == [0, 0, 1, 2, 2, 2] and p.col.tolist() == [0, 1, 0, 0, 1, 2]
    # the two stages' outputs, concatenated, go back to their flat places
    placed = torch.cat([lay.prompt_index.flatten(), lay.response_index.flatten()])[lay.gather]
    assert placed.tolist() == list(range(11))
    assert lay.gather.tolist() == [0, 1, 2, 6, 7, 12, 13, 14, 3, 4, 9]


def test_pack_shares_the_common_prefix_when_that_runs_fewer_tokens():
    # three prompts that differ in their last token only (few-shot exemplars before the question): per prompt, 15
    # prompt tokens + 4 response tokens; sharing the 4-token common prefix, 4 + 7 (each rest of prompt + response)
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 7]]
    responses = [[8], [9, 10], [11]]
    assert shared_prompt.shared_prefixes(prompts, responses) == ([[1, 2, 3, 4]] * 3, [[5, 8], [6, 9, 10], [7, 11]],
                                                                 [1, 1, 1])
    p = shared_prompt.pack(prompts, responses, torch.device("cpu"))
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 8, 6, 9, 10, 7, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 6, 4, 5]]
    assert p.layout.prompt_index.tolist() == [[0, 1, 2, 3]]
    assert p.layout.response_index.tolist() == [[4, 5, 0], [6, 7, 8], [9, 10, 0]]
    # only response tokens are scored, each predicted by the token before it (its prompt's last one)
    assert p.predict_at.tolist() == [4, 6, 7, 9] and p.targets.tolist() == [8, 9, 10, 11]
    assert p.row.tolist() == [0, 1, 1, 2] and p.col.tolist() == [0, 0, 1, 0]
    # groups whose prompts differ in more than they share: each prompt once is cheaper (2 x 9 prompt tokens,
    # against 1 + 4 x 8)
    grouped = [[1, *range(10, 18)]] * 2 + [[1, *range(20, 28)]] * 2
    assert shared_prompt.shared_prefixes(grouped, [[5]] * 4) == (grouped, [[5]] * 4, [0] * 4)
    # nothing in common: per prompt
    assert shared_prompt.shared_prefixes([[1, 2], [3, 4]], [[5], [6]]) == ([[1, 2], [3, 4]], [[5], [6]], [0, 0])


def prefixed_samples(seed: int = 0) -> list[TrainSample]:
    """Prompts that share a 14-token prefix (one prompt is the prefix itself), two responses each: the common-prefix
    layout."""
    rng = random.Random(seed)
    common = [rng.randrange(1, VOCAB) for _ in range(14)]
    prompts = [common + [rng.randrange(1, VOCAB) for _ in range(n)] for n in (3, 0, 5, 2)]
    return [TrainSample(prompts[i % 4], [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))],
                        advantage=rng.uniform(-1, 1)) for i in range(8)]


def gradient(policy: torch.nn.Module, batch: list[TrainSample], share: bool, entropy: bool = False):
    policy.zero_grad(set_to_none=True)
    logp, mask, *ent = response_logprobs(policy, batch, 0, temperature=0.9, entropy=entropy, share_prompt=share)
    adv = torch.tensor([s.advantage for s in batch], dtype=logp.dtype)[:, None]
    loss = -(adv * logp * mask).sum() + (sum(e * mask for e in ent).sum() if ent else 0.0)
    loss.backward()
    return logp.detach(), mask, [e.detach() for e in ent], [p.grad.clone() for p in policy.parameters()]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """|a - b| within `rel` of a's largest entry: float rounding passes, a wrong mask or position does not (O(1))."""
    assert float((a - b).abs().max()) <= rel * float(a.abs().max()) + 1e-300


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("layout", ["per_prompt", "common_prefix"])
def test_shared_prompt_log_probs_and_gradient_equal_each_samples_own_forward(kind, entropy, layout):
    policy = model(kind)
    batch = samples() if layout == "per_prompt" else prefixed_samples()
    split = shared_prompt.shared_prefixes([s.prompt_ids for s in batch], [s.response_ids for s in batch])
    assert any(split[2]) == (layout == "common_prefix")
    logp, mask, ent, grads = gradient(policy, batch, share=False, entropy=entropy)
    s_logp, s_mask, s_ent, s_grads = gradient(policy, batch, share=True, entropy=entropy)
    assert torch.equal(mask, s_mask)
    # the norms compute in float32 inside the float64 model: per-token values agree to float64, gradients (summed
    # over a prompt's responses before those float32 steps, not after) to float32 rounding
    torch.testing.assert_close(s_logp, logp, rtol=1e-12, atol=1e-12)
    for a, b in zip(ent, s_ent, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads)
    for a, b in zip(grads, s_grads, strict=True):
        close(a, b, 1e-6)


def test_a_wrong_layout_is_caught(monkeypatch):
    """The comparison above fails when a response does not see its prompt (each token attends to itself only)."""
    policy = model("qwen2")
    batch = samples()
    _, _, _, grads = gradient(policy, batch, share=False)
    real = shared_prompt.pack

    def blind(prompts, responses, device):
        p = real(prompts, responses, device)
        p.layout.response_mask[..., : p.layout.prompt_index.shape[1]] = False
        return p

    monkeypatch.setattr(shared_prompt, "pack", blind)
    _, _, _, wrong = gradient(policy, batch, share=True)
    with pytest.raises(AssertionError):
        for a, b in zip(grads, wrong, strict=True):
            close(a, b, 1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_an_enabled_model_generates_and_runs_padded_batches_exactly_as_before(kind):
    policy = model(kind).eval()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        before = policy(input_ids=ids, attention_mask=attention).logits
        generated = policy.generate(ids, attention_mask=attention, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)
    shared_prompt.enable(policy)
    shared_prompt.enable(policy)  # idempotent
    assert policy.config._attn_implementation == "dash_shared_prompt:sdpa"
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids, attention_mask=attention).logits, before)
        assert torch.equal(policy.generate(ids, attention_mask=attention, max_new_tokens=5, do_sample=False,
                                           pad_token_id=0), generated)
