"""Host syncs in the hot loops (update micro-batches, optimizer steps, decode steps) and the sampler's memory per
decode step, counted with the CPU profiler on the real tiny model.

A device read (a host sync on an accelerator) shows in the profiler as aten::_local_scalar_dense (.item(), float(),
int(), bool() of a tensor) or aten::nonzero (its output size); Tensor.tolist records no op on the CPU, so it is
wrapped here to record one. Each read is put down to the innermost Python frame of dash_exp or transformers that
made it (run with -s to see the counts).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import PurePath

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dash_exp.algorithms.update import LossSpec, accumulate_gradients, old_logprobs
from dash_exp.batching import TrainSample
from dash_exp.factory import build
from dash_exp.rollout.base import SamplingParams
from dash_exp.rollout.hf import CHECK_EVERY, HFSampler
from dash_exp.tracking import MetricSink, peak_allocated_bytes
from dash_exp.trainer import Trainer

READS = {"aten::_local_scalar_dense", "aten::nonzero", "Tensor.tolist"}
# reads of host tensors, no device sync: the index tensors response_logprobs builds from the samples' lengths,
# the rollouts' lists after generate's one copy to the host, and AdamW's step counters (kept on the host unless
# capturable or fused)
HOST = {"batching.py:response_logprobs", "hf.py:_rollouts", "optimizer",
        # the shared-prompt forward's flat layout, built on the host from the samples' token ids
        "shared_prompt.py:pack", "batching.py:_shared_prompt_logprobs"}
# the model's own: transformers checks a 2-D attention mask for padding (2 reads per forward with one)
MODEL = "transformers"


@pytest.fixture(autouse=True)
def traced_tolist(monkeypatch):
    tolist = torch.Tensor.tolist

    def traced(self):
        with record_function("Tensor.tolist"):
            return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", traced)


def origin(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if name.startswith("Optimizer.step"):
            return "optimizer"
        # Python frames: "<path, shortened by the profiler>(<line>): <function>"
        where, _, func = name.partition(": ")
        parts = PurePath(where.split("(")[0]).parts
        package = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else parts[0]
        if package == "transformers":
            return MODEL
        if "dash_exp" in parts and "site-packages" not in parts:
            return f"{parts[-1]}:{func}"
        parent = parent.cpu_parent
    return "other"


def device_reads(fn):
    """The reads made while fn() runs, by origin, and what fn() returned."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        result = fn()
    return Counter(origin(e) for e in prof.events() if e.name in READS), result


def ours(reads: Counter) -> Counter:
    return Counter({k: v for k, v in reads.items() if k not in HOST and k != MODEL})


@pytest.fixture
def parts(make_cfg):
    p = build(make_cfg("kl=on"))
    yield p
    p.task.close()


def make_samples(parts, n=8):
    rng = random.Random(0)
    vocab = len(parts.tokenizer)
    return [TrainSample([rng.randrange(3, vocab) for _ in range(rng.randint(3, 9))],
                        [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], advantage=rng.uniform(-2, 2))
            for _ in range(n)]


@pytest.mark.integration
def test_accumulate_gradients_reads_nothing_per_micro_batch(parts):
    pad = parts.tokenizer.pad_token_id
    samples = make_samples(parts)
    spec = LossSpec(beta=0.04)  # KL to the reference and PPO-clip against stored old log-probs
    old_logprobs(parts.policy, samples, pad, spec, 8)
    sums = []
    for microbatch in (8, 4, 2, 1):
        for s in samples:
            s.ref_logprobs = None
        reads, stats = device_reads(
            lambda mb=microbatch: accumulate_gradients(parts.policy, samples, spec, 50.0, mb, pad, parts.ref))
        parts.policy.zero_grad(set_to_none=True)
        print(f"accumulate_gradients, {8 // microbatch} micro-batches: {dict(reads)}")
        assert ours(reads) == Counter()
        assert stats.tokens == sum(len(s.response_ids) for s in samples) and stats.forward_samples == 8
        assert isinstance(stats.tokens, int)
        sums.append(stats.read())
    for other in sums[1:]:
        assert other == pytest.approx(sums[0], rel=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_update_reads_once_per_optimizer_step(parts, make_cfg, tmp_path, algorithm):
    cfg = make_cfg("kl=on", f"algorithm={algorithm}")
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    sink = MetricSink(run_dir, cfg.logger, "t", "t", {})
    trainer = Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir, ref=parts.ref)
    samples = make_samples(parts)
    try:
        reads, metrics = device_reads(lambda: trainer.update(samples, [True] * len(samples), 1))
    finally:
        sink.close()
    steps = metrics["ppo/optimizer_steps"]
    print(f"update {algorithm}: {steps} optimizer steps x {len(samples) // cfg.train_microbatch} micro-batches: "
          f"{dict(reads)}")
    assert steps == (3 if algorithm == "ppo" else 1)
    # the loss, the other sums and the gradient norm of a step: one .tolist()
    assert ours(reads) == Counter({"update.py:read": steps})
    assert metrics["grad/norm"] > 0


@pytest.mark.integration
def test_generate_reads_once_per_eight_decode_steps(parts):
    # an EOS that never comes: exactly max_new_tokens decode steps, no row stops
    sampler = HFSampler(parts.policy, parts.tokenizer.pad_token_id, eos_ids=[-1])
    prompts = [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in parts.task.test[:4]]
    reads = {}
    for steps in (8, 64):
        params = SamplingParams(n=2, temperature=0.9, max_new_tokens=steps)
        reads[steps], rollouts = device_reads(lambda p=params: sampler.generate(prompts, p, [1, 2, 3, 4]))
        assert all(len(r.response_ids) == steps for r in rollouts)
        print(f"generate {steps} tokens: {dict(reads[steps])}")
        # a look at the stopped rows after every CHECK_EVERY decode steps but the last
        assert reads[steps]["hf.py:_generate"] == (steps - 1) // CHECK_EVERY
    # ... and nothing else grows with the number of decode steps: the model reads its mask at the prefill only
    assert reads[64][MODEL] == reads[8][MODEL] <= 2
    assert ours(reads[64]) == Counter({"hf.py:_generate": 7})


@pytest.mark.integration
@pytest.mark.parametrize(("top_k", "top_p", "bound"), [(0, 1.0, 2.0), (50, 1.0, 2.3), (0, 0.9, 5.3)])
def test_sampling_memory_per_decode_step(top_k, top_p, bound):
    batch, vocab = 64, 151_936  # Qwen2.5's vocabulary
    unit = batch * vocab * 4  # one [batch, vocab] float32 tensor
    sampler = HFSampler(torch.nn.Identity(), pad_id=0, eos_ids=[0])
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)
    keys = torch.arange(batch)

    def step():
        with torch.inference_mode():
            logits = torch.randn(batch, vocab)  # the step's logits count too
            sampler._pick(logits, params, keys, 3)

    step()
    peak = peak_allocated_bytes(step, torch.device("cpu"))
    print(f"one decode step's sampling, batch {batch} x vocab {vocab}, top_k={top_k} top_p={top_p}: "
          f"{peak / 2**20:.1f} MiB = {peak / unit:.2f} x [batch, vocab] float32, logits included")
    # the logits and the one [batch, vocab] float32 tensor of the CDF (+ [batch]-sized bits; truncation's masks)
    assert peak <= bound * unit + 2**20
