"""Rollout: harness sampler vs the backend's raw batched generate at the same batch; vLLM weight-sync time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dash_exp.bench import components, interleaved, median, step_prompts, timed


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


def run(overrides: list[str], backend: str = "hf", repeats: int = 5) -> dict[str, Any]:
    """Rollout tokens/s through the harness sampler vs the raw engine call on one step batch; vLLM sync time."""
    from dash_exp.rollout.base import SamplingParams

    cfg, parts = components([f"rollout={backend}", "run_dir=bench", *overrides])
    parts.task.close()
    prompts = step_prompts(cfg, parts)
    params = SamplingParams.from_config(cfg, cfg.group_size)
    seeds = list(range(len(prompts)))

    def harness() -> int:
        return sum(len(r.response_ids) for r in parts.sampler.generate(prompts, params, seeds))

    raw = raw_engine_call(parts, backend, prompts, params)
    harness(), raw()  # warm-up (vLLM's first call compiles)
    runs = interleaved({"harness": harness, "raw": raw}, repeats)
    tps = {name: median([n / t for t, n in r]) for name, r in runs.items()}
    result = {
        "backend": backend, "batch": len(prompts) * params.n, "max_new_tokens": params.max_new_tokens,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "harness_s": median([t for t, _ in runs["harness"]]), "raw_s": median([t for t, _ in runs["raw"]]),
        "harness_tokens_per_s": tps["harness"], "raw_tokens_per_s": tps["raw"], "ratio": tps["harness"] / tps["raw"],
    }
    if backend == "vllm":
        result["sync_s"] = median([timed(lambda: parts.sampler.sync(parts.policy))[0] for _ in range(repeats)])
        result["params_m"] = sum(p.numel() for p in parts.policy.parameters()) / 1e6
    return result
