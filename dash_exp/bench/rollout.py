"""Benchmarks, measured side by side in one process (ratios, medians of repeated runs).

    python -m dash_exp.bench rollout --backend hf      # harness sampler vs transformers' generate
    python -m dash_exp.bench rollout --backend vllm    # harness sampler vs a raw LLM.generate; weight-sync time

Extra arguments are Hydra overrides (e.g. model=qwen2.5-0.5b on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    """(seconds, tokens) of one call."""
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def raw_engine_call(parts: Any, backend: str, prompts: list[list[int]], params: Any) -> Callable[[], int]:
    """The backend's own batched generate on the same prompts and settings, returning generated tokens."""
    if backend == "vllm":
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        llm = parts.sampler.llm
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sampling = VLLMParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                              max_tokens=params.max_new_tokens, logprobs=0)
        return lambda: sum(len(c.token_ids) for o in llm.generate(inputs, sampling, use_tqdm=False) for c in o.outputs)
    tok, model = parts.tokenizer, parts.policy
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    eos, pad = tok.eos_token_id, tok.pad_token_id

    @torch.inference_mode()
    def call() -> int:
        out = model.generate(**batch, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k, max_new_tokens=params.max_new_tokens,
                             num_return_sequences=params.n, eos_token_id=eos, pad_token_id=pad, use_cache=True)
        new = out[:, batch["input_ids"].shape[1]:]
        # tokens up to and including EOS, as the harness counts them
        stopped = (new == eos).any(1)
        return int(torch.where(stopped, (new == eos).int().argmax(1) + 1, new.shape[1]).sum())

    return call


def bench_rollout(overrides: list[str], backend: str, repeats: int) -> dict[str, Any]:
    """Rollout tokens/s through the harness sampler vs the raw engine call at the same batch; vLLM sync time."""
    from dash_exp.config import compose_config, resolved_threads
    from dash_exp.rollout.base import SamplingParams
    from dash_exp.run import build, seed_everything

    cfg = compose_config([f"rollout={backend}", "run_dir=bench", *overrides])
    seed_everything(cfg.seed, resolved_threads(cfg))
    parts = build(cfg)
    parts.task.close()
    problems = parts.task.train[: cfg.prompts_per_step]
    prompts = [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    params = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens)
    seeds = list(range(len(prompts)))

    def harness() -> int:
        return sum(len(r.response_ids) for r in parts.sampler.generate(prompts, params, seeds))

    raw = raw_engine_call(parts, backend, prompts, params)
    harness(), raw()  # warm-up (vLLM's first call compiles)
    # interleave so drift in machine load hits both equally
    harness_runs, raw_runs = [], []
    for _ in range(repeats):
        harness_runs.append(_timed(harness))
        raw_runs.append(_timed(raw))
    h_time = statistics.median(t for t, _ in harness_runs)
    r_time = statistics.median(t for t, _ in raw_runs)
    h_tps = statistics.median(n / t for t, n in harness_runs)
    r_tps = statistics.median(n / t for t, n in raw_runs)
    result = {
        "backend": backend, "batch": len(prompts) * params.n, "max_new_tokens": params.max_new_tokens,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "harness_s": h_time, "raw_s": r_time, "harness_tokens_per_s": h_tps, "raw_tokens_per_s": r_tps,
        "ratio": h_tps / r_tps,
    }
    if backend == "vllm":
        result["sync_s"] = statistics.median(_timed(lambda: parts.sampler.sync(parts.policy) or 0)[0]
                                             for _ in range(repeats))
        result["params_m"] = sum(p.numel() for p in parts.policy.parameters()) / 1e6
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    rollout = sub.add_parser("rollout", help="harness sampler vs the raw engine call")
    rollout.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    rollout.add_argument("--repeats", type=int, default=5)
    rollout.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    rollout.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args(argv)
    result = bench_rollout(args.overrides, args.backend, args.repeats)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
