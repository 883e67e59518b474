"""Held-out evaluation: greedy and sampled accuracy, unbiased pass@k, lengths, truncation and unparsed rates.

The periodic evaluation during training and the command line run this same code:

    python -m dash_exp.evaluate task=math checkpoint=runs/<run dir> n=8 out=eval.json task.eval_size=100

`checkpoint` is a run dir (its latest checkpoint), a checkpoint dir (state.pt) or a model directory saved
with save_pretrained; without it the configured model itself is evaluated. `n` is samples per problem.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dash_exp.batching import TokenCache
from dash_exp.rollout.base import Rollout, Sampler, SamplingParams
from dash_exp.rollout.hf import mix32
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
    metrics: dict[str, float] = {}
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


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(our key=value arguments: checkpoint, n, out), Hydra overrides."""
    ours, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("checkpoint", "n", "out"):
            ours[key] = value
        else:
            overrides.append(arg)
    return ours, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m dash_exp.evaluate [checkpoint=...] [n=...] [out=...] [hydra overrides]`."""
    from dash_exp.checkpoint import load_policy_weights
    from dash_exp.config import compose_config, resolved_inference_batch, resolved_threads
    from dash_exp.run import build, seed_everything
    from dash_exp.tracking import MetricSink

    ours, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(ours.get("out", "eval.json"))
    n = int(ours.get("n", "1"))
    checkpoint = ours.get("checkpoint")
    if checkpoint and (Path(checkpoint) / "config.json").is_file():  # a save_pretrained directory
        overrides += ["model.source=hub", f"model.path_or_id={checkpoint}"]
    cfg = compose_config([f"eval_samples={n}", f"run_dir={out.parent.resolve()}", *overrides])
    seed_everything(cfg.seed, resolved_threads(cfg))
    parts = build(cfg, need_train=False)
    step = 0
    sampled = SamplingParams.from_config(cfg, n, evaluation=True)
    try:
        if checkpoint and not (Path(checkpoint) / "config.json").is_file():
            step = load_policy_weights(parts.policy, Path(checkpoint))
            parts.sampler.sync(parts.policy)
        metrics = evaluate(parts.sampler, TokenCache(parts.tokenizer), parts.task, sampled, cfg.seed,
                           max(resolved_inference_batch(cfg), n), cfg.task.eval_size)
    finally:
        parts.close()
    result = {"checkpoint": checkpoint, "step": step, "model": cfg.model.name, "task": cfg.task.name, "n": n,
              "eval_size": cfg.task.eval_size, "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if cfg.logger.name == "wandb":
        sink = MetricSink(out.parent, cfg.logger, f"eval-{cfg.model.name}-{cfg.task.name}", "eval", result,
                          filename=out.stem + ".metrics.jsonl")
        sink.log(step, metrics)
        sink.close(metrics)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
