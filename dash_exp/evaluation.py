"""Held-out evaluation, the library part: greedy and sampled accuracy, unbiased pass@k, lengths, truncation and
unparsed rates. The trainer's periodic evaluation and `python -m dash_exp.evaluate` both call `evaluate`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dash_exp.batching import TokenCache
from dash_exp.rollout.base import Rollout, Sampler, SamplingParams, mix32
from dash_exp.tasks.base import Problem

# keys eval sampling noise apart from training steps (which use step >= 1)
EVAL_STREAM = 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k) for c correct of n samples."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generate_in_chunks(sampler: Sampler, prompts: Sequence[list[int]], params: SamplingParams,
                       seeds: Sequence[int], max_samples: int) -> list[Rollout]:
    """Sampler calls of at most `max_samples` samples (whole prompts), results in prompt order."""
    per_call = max(1, max_samples // params.n)
    out: list[Rollout] = []
    for start in range(0, len(prompts), per_call):
        out += sampler.generate(prompts[start: start + per_call], params, seeds[start: start + per_call])
    return out


def evaluate_set(sampler: Sampler, tokens: TokenCache, task: Any, name: str, problems: Sequence[Problem],
                 sampled: SamplingParams, seed: int, max_samples: int) -> dict[str, float]:
    """`eval/<name>/...` metrics of one evaluation set."""
    prompts = [tokens(p.prompt) for p in problems]
    seeds = [mix32(seed, EVAL_STREAM, i) for i in range(len(problems))]
    greedy = SamplingParams(n=1, greedy=True, max_new_tokens=sampled.max_new_tokens)
    # the problem count: each accuracy's binomial standard error needs it (analysis.stats.accuracy_se)
    metrics: dict[str, float] = {f"eval/{name}/problems": len(problems)}
    for kind, params in (("greedy", greedy), ("sampled", sampled)):
        rollouts = generate_in_chunks(sampler, prompts, params, seeds, max_samples)
        texts = [tokens.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
        graded = task.score(texts, [p for p in problems for _ in range(params.n)])
        n = len(rollouts)
        prefix = f"eval/{name}/" + ("" if kind == "greedy" else "sampled_")
        metrics[prefix + "accuracy"] = sum(graded.rewards) / n
        metrics[prefix + "length_mean"] = sum(len(r.response_ids) for r in rollouts) / n
        metrics[prefix + "truncated_frac"] = sum(r.truncated for r in rollouts) / n
        metrics[prefix + "unparsed_frac"] = graded.unparsed / n
        metrics[prefix + "timeouts"] = graded.timeouts
        for key, count in graded.counts.items():
            metrics[prefix + f"{key}_frac"] = count / n
        if kind == "sampled":
            correct = [sum(graded.rewards[i * params.n: (i + 1) * params.n]) for i in range(len(problems))]
            k = 1
            while k <= params.n:
                metrics[f"eval/{name}/pass@{k}"] = sum(pass_at_k(params.n, int(c), k) for c in correct) / len(correct)
                k *= 2
    return metrics


def evaluate(sampler: Sampler, tokens: TokenCache, task: Any, sampled: SamplingParams, seed: int,
             max_samples: int, eval_size: int | None) -> dict[str, float]:
    """Metrics of every evaluation set of the task (the first `eval_size` problems of each)."""
    metrics: dict[str, float] = {}
    for name, problems in task.evals.items():
        metrics.update(evaluate_set(sampler, tokens, task, name, problems[:eval_size], sampled, seed, max_samples))
    return metrics
