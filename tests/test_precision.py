"""Mixed precision: fp32 master weights and optimizer state, bf16 compute under autocast, on the real tiny model.

model.dtype=bfloat16 used to load the trainable policy in bf16, where AdamW's steps of ~lr round away: 5 steps at
lr 3e-6 changed 2.7% of the weights. Now one step changes (nearly) all of them, the bf16-autocast gradient points
where the fp32 one does, checkpoints hold the fp32 masters, and the samplers see the compute dtype.
"""

import copy
import random

import pytest
import torch

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample, response_logprobs
from dash_exp.checkpoint import latest_checkpoint, load_checkpoint
from dash_exp.factory import build
from dash_exp.models import load_policy, resolve_model_path
from dash_exp.rollout.base import SamplingParams
from dash_exp.rollout.hf import HFSampler
from dash_exp.run import train

pytestmark = pytest.mark.integration

# the tests' short ids -> the registered policy losses
LOSSES = {"pg": "ppo_clip", "sft": "sft"}

BF16 = "model.dtype=bfloat16"


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(t.numel() for t in before.values())


def test_one_bf16_step_at_the_recipe_lr_changes_every_weight_and_checkpoints_hold_fp32(make_cfg, tmp_path):
    cfg = make_cfg(BF16, "lr=3e-6", "algorithm=grpo", "steps=1", "group_size=8", "train_microbatch=8")
    start = dict(load_policy(resolve_model_path(cfg.model, cfg.task), torch.device("cpu")).named_parameters())
    train(cfg)
    state, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    after = {k: v for k, v in state["policy"].items() if k in start}
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert {v.dtype for s in state["optimizer"]["state"].values() for v in s.values() if v.dim()} == {torch.float32}
    fraction = changed_fraction({k: v.detach() for k, v in start.items()}, after)
    print(f"one bf16-compute step at lr 3e-6 changed {100 * fraction:.2f}% of the weights")
    assert fraction >= 0.99


def test_pure_bf16_weights_would_round_the_same_step_away(make_cfg):
    # the failure this design prevents, measured on the same model: AdamW on bf16 weights at lr 3e-6
    cfg = make_cfg()
    policy = load_policy(resolve_model_path(cfg.model, cfg.task), torch.device("cpu")).to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(policy.parameters(), lr=3e-6).step()
    fraction = changed_fraction(before, {k: v.detach() for k, v in policy.named_parameters()})
    print(f"pure bf16: one AdamW step at lr 3e-6 changed {100 * fraction:.2f}% of the weights")
    assert fraction < 0.2


@pytest.fixture(scope="module")
def rl_samples():
    rng = random.Random(0)
    return [TrainSample([rng.randrange(3, 90) for _ in range(rng.randint(5, 20))],
                        [rng.randrange(3, 90) for _ in range(rng.randint(5, 30))], advantage=rng.uniform(-2, 2))
            for _ in range(12)]


@pytest.mark.parametrize("kind", ["pg", "sft"])
def test_bf16_autocast_gradients_agree_with_fp32(make_cfg, rl_samples, kind):
    cfg = make_cfg()
    policy = load_policy(resolve_model_path(cfg.model, cfg.task), torch.device("cpu"))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy.zero_grad(set_to_none=True)
        spec = LossSpec(policy_loss=LOSSES[kind], temperature=0.9, compute_dtype=dtype)
        accumulate_gradients(policy, copy.deepcopy(rl_samples), spec, 100.0, 4, 0)
        grads[dtype] = torch.cat([p.grad.flatten() for p in policy.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in policy.parameters())
    cosine = float(torch.nn.functional.cosine_similarity(grads[torch.float32].double(),
                                                         grads[torch.bfloat16].double(), dim=0))
    print(f"{kind}: cosine(bf16-autocast grad, fp32 grad) = {cosine:.5f}")
    assert cosine >= 0.99
    assert not torch.equal(grads[torch.float32], grads[torch.bfloat16])  # autocast really ran in bf16


def test_bf16_compute_keeps_fp32_masters_a_bf16_reference_and_a_bf16_sampler(make_cfg):
    parts = build(make_cfg(BF16, "kl=on"))
    parts.task.close()
    assert {p.dtype for p in parts.policy.parameters()} == {torch.float32}
    # the reference's linear layers in bf16 (what autocast computes them in), the rest in fp32 like the policy's
    linear = {id(m.weight) for m in parts.ref.modules() if isinstance(m, torch.nn.Linear)}
    embedding = {id(m.weight) for m in parts.ref.modules() if isinstance(m, torch.nn.Embedding)}
    for p in parts.ref.parameters():
        assert p.dtype == (torch.bfloat16 if id(p) in linear - embedding else torch.float32)
    assert not any(p.requires_grad for p in parts.ref.parameters())
    assert parts.sampler.compute_dtype == torch.bfloat16
    # the HF sampler generates under bf16 autocast: its log-probs are those of the bf16-compute policy, within bf16
    # rounding (incremental decoding vs the training forward), and differ from an fp32 sampler's
    prompts = [parts.tokenizer.encode(p.prompt) for p in parts.task.test[:4]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=30)
    rollouts = parts.sampler.generate(prompts, params, range(4))
    samples = [TrainSample(r.prompt_ids, r.response_ids) for r in rollouts]
    with torch.no_grad():
        logp, _ = response_logprobs(parts.policy, samples, parts.tokenizer.pad_token_id, 1.0, torch.bfloat16)
    gap = max(float((logp[i, : len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max())
              for i, r in enumerate(rollouts))
    print(f"HF sampler (bf16 autocast) vs bf16-compute training log-probs: max gap {gap:.4f}")
    assert gap < 0.1
    fp32 = HFSampler(parts.policy, parts.tokenizer.pad_token_id, [parts.tokenizer.eos_token_id])
    assert [r.logprobs for r in fp32.generate(prompts, params, range(4))] != [r.logprobs for r in rollouts]


def test_the_kl_is_exactly_zero_at_step_0_under_bf16_compute(make_cfg, rl_samples):
    """The reference runs in the policy's numerics (bf16 matmuls under autocast, fp32 embeddings and norms): before
    any update the KL of every token is 0, as it is in fp32 (an all-bf16 reference gave 0.09 over 168 tokens)."""
    parts = build(make_cfg(BF16, "kl=on"))
    parts.task.close()
    spec = LossSpec(beta=0.04, compute_dtype=torch.bfloat16)
    stats = accumulate_gradients(parts.policy, copy.deepcopy(rl_samples), spec, 100.0, 4, 0, parts.ref)
    assert stats.tokens > 0 and stats.kl_sum == 0.0
