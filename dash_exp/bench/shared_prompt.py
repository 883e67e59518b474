"""Shared-prompt backprop (model.share_prompt): one real step batch's backprop, each shared prefix run once per
micro-batch (shared) against once per sample (separate), for GRPO (every sample), DASH (the gradient filter's kept
samples) and SFT (as many distinct training problems with their reference solutions).

The step batch is the trainer's own first step (`Trainer.collect`: the sampler's rollouts, the task's rewards,
group advantages and the gradient filter of the configured DASH recipe), so the prompt and response lengths, the
groups and the kept set are those of a real run. Each side is `accumulate_gradients` at the recipe's
train_microbatch (forward, backward, nothing else; the gradient is cleared after each run), interleaved; the
gradient of the two forwards is compared (the largest difference relative to the largest entry). Also counted: the
tokens each forward runs through the decoder.

    python -m dash_exp.bench shared_prompt                     # the tiny default
    python -m dash_exp.bench shared_prompt +sweep=smollm2 model.source=gguf model.path_or_id=<gguf> rollout=vllm
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dash_exp.bench import bench_trainer, components, interleaved, median


def forward_tokens(samples: list[Any], microbatch: int, share: bool) -> int:
    """Tokens the decoder runs for these samples: each sample's prompt and response (separate, right-padded to the
    micro-batch's longest), or each micro-batch's shared prefixes once plus every sample's tail (shared, no
    padding: `shared_prompt.shared_prefixes`)."""
    from dash_exp.batching import microbatches
    from dash_exp.shared_prompt import shared_prefixes

    total = 0
    for micro in microbatches(samples, microbatch, by_prompt=share):
        if share:
            prefixes, tails, _ = shared_prefixes([s.prompt_ids for s in micro], [s.response_ids for s in micro])
            total += sum(len(p) for p in {tuple(p) for p in prefixes}) + sum(len(t) for t in tails)
        else:
            total += len(micro) * max(s.length for s in micro)
    return total


def run(overrides: list[str], repeats: int = 3) -> dict[str, Any]:
    """GRPO's, DASH's and SFT's backprop of one step batch, shared vs separate; medians of `repeats` interleaved
    runs."""
    from dash_exp.algorithms.losses import normalizer
    from dash_exp.algorithms.update import accumulate_gradients
    from dash_exp.batching import TrainSample

    cfg, parts = components(["run_dir=runs/bench/shared_prompt", "algorithm=dash", *overrides])
    trainer = bench_trainer(cfg, parts, "bench-shared-prompt")
    try:
        samples, keep, metrics = trainer.collect(1)
    finally:
        trainer.sink.close({})
    parts.task.close()
    policy, pad_id, micro = parts.policy, parts.tokenizer.pad_token_id, cfg.train_microbatch
    norm = normalizer([len(s.response_ids) for s in samples], cfg.algorithm.aggregation, cfg.max_new_tokens)
    # SFT's step: as many distinct training problems, each with its reference solution (nothing shared but what
    # their prompts have in common: chat exemplar turns); advantage 1: the cross-entropy's gradient
    sft = [TrainSample(trainer.tokens(p.prompt), trainer.tokens(p.solution) + [trainer.eos_id], advantage=1.0)
           for p in parts.task.train[: len(samples)]]
    batches = {"grpo": samples, "dash": [s for s, k in zip(samples, keep, strict=True) if k], "sft": sft}
    specs = {share: dataclasses.replace(trainer.spec, share_prompt=share) for share in (False, True)}
    policy.train()

    def backprop(batch: list[Any], share: bool) -> Any:
        for s in batch:
            s.ref_logprobs = None
        stats = accumulate_gradients(policy, batch, specs[share], norm, micro, pad_id, parts.ref)
        grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        policy.zero_grad(set_to_none=True)
        return grads, stats.tokens

    calls = {f"{algorithm}_{'shared' if share else 'separate'}": (lambda b=batch, s=share: backprop(b, s))
             for algorithm, batch in batches.items() for share in (False, True)}
    runs = interleaved(calls, repeats)
    result: dict[str, Any] = {
        "model": cfg.model.name, "task": cfg.task.name, "samples": len(samples), "microbatch": micro,
        "threads": torch.get_num_threads(), "repeats": repeats, "kept_frac": metrics["filter/kept_frac"],
        "prompt_tokens_mean": sum(len(s.prompt_ids) for s in samples) / len(samples),
        "response_tokens_mean": sum(len(s.response_ids) for s in samples) / len(samples),
    }
    for algorithm, batch in batches.items():
        separate, shared = (runs[f"{algorithm}_{side}"] for side in ("separate", "shared"))
        a, b = separate[0][1][0], shared[0][1][0]
        gap = max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True)), default=0.0)
        scale = max((float(x.abs().max()) for x in a), default=0.0)
        times = {side: median([t for t, _ in r]) for side, r in (("separate", separate), ("shared", shared))}
        result[algorithm] = {
            "samples": len(batch), "groups": len({tuple(s.prompt_ids) for s in batch}),
            "separate_s": times["separate"], "shared_s": times["shared"], "ratio": times["shared"] / times["separate"],
            "separate_forward_tokens": forward_tokens(batch, micro, False),
            "shared_forward_tokens": forward_tokens(batch, micro, True),
            "max_grad_gap_rel": gap / max(scale, 1e-30),
        }
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    head = (f"{result['model']} on {result['task']}: {result['samples']} samples, prompt "
            f"{result['prompt_tokens_mean']:.0f} / response {result['response_tokens_mean']:.0f} tokens on average, "
            f"micro-batch {result['microbatch']}, {result['threads']} threads, medians of {result['repeats']}")
    lines = [head,
             "", "| arm | samples (groups) | separate s | shared s | shared / separate | decoder tokens | grad gap |",
             "|---|---|---|---|---|---|---|"]
    for algorithm in ("grpo", "dash", "sft"):
        r = result[algorithm]
        lines.append(f"| {algorithm} | {r['samples']} ({r['groups']}) | {r['separate_s']:.2f} | {r['shared_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['separate_forward_tokens']} -> {r['shared_forward_tokens']} | "
                     f"{r['max_grad_gap_rel']:.1e} |")
    return "\n".join(lines)
