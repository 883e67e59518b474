"""SFT-M traces: sample any model on the task's training prompts and keep correct responses.

    python -m dash_exp.traces --out traces.jsonl --samples 4 model=qwen2.5-1.5b
    python -m dash_exp.run algorithm=sft algorithm.sft_source=traces algorithm.traces_path=traces.jsonl

Writes one JSON object per line: {"prompt", "response", "answer"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def make_traces(cfg: Any, out: Path, samples: int, per_prompt: int, max_prompts: int | None) -> dict[str, float]:
    """Rejection sampling over the training split; returns counts."""
    import torch

    from dash_exp.batching import TokenCache
    from dash_exp.config import resolved_inference_batch, resolved_threads
    from dash_exp.evaluation import generate_in_chunks
    from dash_exp.models import load_policy, load_tokenizer, resolve_model_path
    from dash_exp.rollout.base import SamplingParams, mix32
    from dash_exp.rollout.registry import build_sampler
    from dash_exp.tasks.registry import build_task

    torch.set_num_threads(resolved_threads(cfg))
    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    task = build_task(cfg.task, tokenizer)
    tokens = TokenCache(tokenizer)
    sampler = build_sampler(cfg, load_policy(path), tokens, path)
    problems = task.train[:max_prompts] if max_prompts else task.train
    params = SamplingParams.from_config(cfg, samples)
    seeds = [mix32(cfg.seed, -2, i) for i in range(len(problems))]
    rollouts = generate_in_chunks(sampler, [tokens(p.prompt) for p in problems], params, seeds,
                                  resolved_inference_batch(cfg))
    sampler.close()
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    graded = task.score(texts, [p for p in problems for _ in range(samples)])
    task.close()
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, problem in enumerate(problems):
            group = range(i * samples, (i + 1) * samples)
            correct = dict.fromkeys(texts[j] for j in group if graded.rewards[j] > 0 and not rollouts[j].truncated)
            for text in list(correct)[:per_prompt]:
                f.write(json.dumps({"prompt": problem.prompt, "response": text, "answer": problem.answer}) + "\n")
                written += 1
    return {"prompts": len(problems), "samples": len(texts), "accepted": sum(graded.rewards), "written": written}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="traces JSONL to write")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--per-prompt", type=int, default=1, help="most distinct correct traces kept per prompt")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N training prompts")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=qwen2.5-1.5b task=arith")
    args = parser.parse_args(argv)
    from dash_exp.config import compose_config

    cfg = compose_config(args.overrides)
    counts = make_traces(cfg, args.out, args.samples, args.per_prompt, args.max_prompts)
    print(f"wrote {counts['written']} traces to {args.out} "
          f"({counts['accepted']:.0f}/{counts['samples']} samples correct over {counts['prompts']} prompts)")


if __name__ == "__main__":
    main()
