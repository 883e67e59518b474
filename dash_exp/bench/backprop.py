"""Backprop: the harness's micro-batched gradient vs a bare torch loop over the same samples and micro-batch.

The bare loop is what one writes by hand: pad each micro-batch in the given order, full forward to logits,
log-softmax, gather the response tokens, -(A * log pi) summed over tokens / the batch's token count, backward.
Both give the same gradient (checked); tokens/s counts response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dash_exp.bench import components, interleaved, median, step_prompts


def bare_loop(policy: torch.nn.Module, samples: Sequence[Any], microbatch: int, pad_id: int, norm: float,
              temperature: float = 1.0) -> int:
    """Policy-gradient backward, micro-batch by micro-batch; returns the response tokens processed."""
    tokens = 0
    for i in range(0, len(samples), microbatch):
        chunk = samples[i: i + microbatch]
        seqs = [torch.tensor(s.prompt_ids + s.response_ids) for s in chunk]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
        attention = torch.zeros_like(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for row, s in enumerate(chunk):
            attention[row, : s.length] = 1
            response[row, len(s.prompt_ids): s.length] = True
        logits = policy(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = response[:, 1:].float()
        adv = torch.tensor([s.advantage for s in chunk])[:, None]
        (-(adv * logp * mask).sum() / norm).backward()
        tokens += int(mask.sum())
    return tokens


def run(overrides: list[str], repeats: int = 5) -> dict[str, Any]:
    """Response tokens/s of one step batch's backward: harness vs bare loop, at cfg.train_microbatch."""
    from dash_exp.algorithms.losses import normalizer
    from dash_exp.algorithms.update import accumulate_gradients
    from dash_exp.batching import TrainSample
    from dash_exp.rollout.base import SamplingParams
    from dash_exp.trainer import loss_spec

    cfg, parts = components(["run_dir=bench", *overrides])
    parts.task.close()
    policy, pad_id = parts.policy, parts.tokenizer.pad_token_id
    prompts = step_prompts(cfg, parts)
    params = SamplingParams.from_config(cfg, cfg.group_size)
    rollouts = parts.sampler.generate(prompts, params, list(range(len(prompts))))
    generator = torch.Generator().manual_seed(cfg.seed)
    samples = [TrainSample(r.prompt_ids, r.response_ids, float(torch.randn(1, generator=generator)))
               for r in rollouts]
    norm = normalizer([len(s.response_ids) for s in samples], "token_mean", cfg.max_new_tokens)
    spec = loss_spec(cfg)
    policy.train()

    passes: dict[str, Callable[[], int]] = {
        "harness": lambda: accumulate_gradients(policy, samples, spec, norm, cfg.train_microbatch, pad_id).tokens,
        "bare": lambda: bare_loop(policy, samples, cfg.train_microbatch, pad_id, norm, cfg.temperature),
    }

    def gradient(backward: Callable[[], int]) -> list[torch.Tensor]:
        backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad(set_to_none=True)
        return grads

    def cleared(backward: Callable[[], int]) -> Callable[[], int]:
        """`backward`, then the gradient cleared, so that every timed run starts alike."""

        def call() -> int:
            tokens = backward()
            policy.zero_grad(set_to_none=True)
            return tokens

        return call

    ours, theirs = (gradient(backward) for backward in passes.values())
    max_grad_gap = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    runs = interleaved({name: cleared(backward) for name, backward in passes.items()}, repeats)
    tps = {name: median([n / t for t, n in r]) for name, r in runs.items()}
    return {"samples": len(samples), "microbatch": cfg.train_microbatch, "threads": torch.get_num_threads(),
            "repeats": repeats, "harness_tokens_per_s": tps["harness"], "bare_tokens_per_s": tps["bare"],
            "ratio": tps["harness"] / tps["bare"], "max_grad_gap": max_grad_gap}
