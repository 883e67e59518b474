"""Held-out evaluation: greedy accuracy, sampled accuracy, response length. Used during and after training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dash_exp.batching import TokenCache
from dash_exp.rollout.base import Rollout, Sampler, SamplingParams
from dash_exp.rollout.hf import mix32
from dash_exp.tasks.base import Problem

# keys eval sampling noise apart from training steps (which use step >= 1)
EVAL_STREAM = 0


def generate_in_chunks(sampler: Sampler, prompts: Sequence[list[int]], params: SamplingParams,
                       seeds: Sequence[int], max_samples: int) -> list[Rollout]:
    """Sampler calls of at most `max_samples` samples (whole prompts), results in prompt order."""
    per_call = max(1, max_samples // params.n)
    out: list[Rollout] = []
    for start in range(0, len(prompts), per_call):
        out += sampler.generate(prompts[start: start + per_call], params, seeds[start: start + per_call])
    return out


def evaluate(sampler: Sampler, tokens: TokenCache, task: Any, problems: Sequence[Problem],
             sampled: SamplingParams, seed: int, max_samples: int) -> dict[str, float]:
    """`eval/<task>/...` metrics on `problems`: greedy and sampled accuracy, mean lengths, truncation."""
    prompts = [tokens(p.prompt) for p in problems]
    seeds = [mix32(seed, EVAL_STREAM, i) for i in range(len(problems))]
    greedy = SamplingParams(n=1, greedy=True, max_new_tokens=sampled.max_new_tokens)
    metrics: dict[str, float] = {}
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        rollouts = generate_in_chunks(sampler, prompts, params, seeds, max_samples)
        texts = [tokens.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
        graded = task.score(texts, [p for p in problems for _ in range(params.n)])
        n = len(rollouts)
        prefix = f"eval/{task.name}/" + ("" if name == "greedy" else "sampled_")
        metrics[prefix + "accuracy"] = sum(graded.rewards) / n
        metrics[prefix + "length_mean"] = sum(len(r.response_ids) for r in rollouts) / n
        metrics[prefix + "truncated_frac"] = sum(r.truncated for r in rollouts) / n
    return metrics
