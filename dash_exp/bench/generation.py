"""Generation on a real model: tokens/s of the harness samplers (HF, vLLM) and of their raw engines (transformers'
`generate`, vLLM's `LLM.generate`) at each batch size, against the model's FLOP floor on this machine, with the
CPU time (user, system) of the in-process calls.

    python -m dash_exp.bench generation model=smollm2-135m model.source=gguf model.path_or_id=FILE task=gsm8k

The floor is the measured fp32 matrix-multiply rate of this machine over 2 x parameters FLOPs per token (a decode
step is one matrix-vector product per weight; attention over these lengths is a few percent more).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dash_exp.bench import components, median
from dash_exp.bench.rollout import raw_engine_call


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """fp32 GEMM rate of this process's threads (GFLOP/s, best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _cpu_timed(fn: Callable[[], int]) -> dict[str, float]:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    tokens = fn()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"tokens": tokens, "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime}


def _harness_call(sampler: Any, prompts: list[list[int]], params: Any, seeded: bool | None = None) -> Callable[[], int]:
    """The harness sampler's call; `seeded` (vLLM): per-sample seeded requests or the engine's one seed."""
    def call() -> int:
        if seeded is not None:
            sampler.seeded = seeded
        return sum(len(r.response_ids) for r in sampler.generate(prompts, params, range(len(prompts))))

    return call


def run(overrides: list[str], repeats: int = 2, batches: Sequence[int] = (16, 128),
        backends: Sequence[str] = ("hf", "vllm")) -> dict[str, Any]:
    """Rows per (backend, batch): harness and raw engine tokens/s (medians of `repeats` interleaved calls)."""
    from dash_exp.rollout.base import SamplingParams

    rows, floor = [], None
    for backend in backends:
        cfg, parts = components([f"rollout={backend}", "run_dir=bench", *overrides])
        parts.task.close()
        params = SamplingParams.from_config(cfg, cfg.group_size)
        n_params = sum(p.numel() for p in parts.policy.parameters())
        if floor is None:
            gflops = matmul_gflops()
            floor = {"gflops": gflops, "params": n_params, "floor_tokens_per_s": gflops * 1e9 / (2 * n_params)}
        prompts = [parts.tokenizer.encode(p.prompt, add_special_tokens=False)
                   for p in parts.task.train[: max(batches) // params.n]]
        for batch in batches:
            group = prompts[: batch // params.n]
            calls = {"harness": _harness_call(parts.sampler, group, params),
                     "raw": raw_engine_call(parts, backend, group, params)}
            if backend == "vllm":  # rollout.seeded (one seeded request per sample) against the engine's one seed
                calls = {"harness": _harness_call(parts.sampler, group, params, seeded=True),
                         "unseeded": _harness_call(parts.sampler, group, params, seeded=False), "raw": calls["raw"]}
            if batch == batches[0]:
                for fn in calls.values():  # warm-up (vLLM's first call compiles)
                    fn()
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
            for _ in range(repeats):
                for name, fn in calls.items():
                    runs[name].append(_cpu_timed(fn))
            row: dict[str, Any] = {"backend": backend, "batch": len(group) * params.n,
                                   "max_new_tokens": params.max_new_tokens, "threads": torch.get_num_threads()}
            for name, measured in runs.items():
                row[f"{name}_tokens_per_s"] = median([m["tokens"] / m["wall_s"] for m in measured])
                row[f"{name}_vs_floor"] = row[f"{name}_tokens_per_s"] / floor["floor_tokens_per_s"]
                if backend == "hf":  # vLLM's engine core is a process of its own: its CPU time is not ours to read
                    row[f"{name}_sys_share"] = median([m["sys_s"] / max(m["user_s"] + m["sys_s"], 1e-9)
                                                       for m in measured])
            row["harness_vs_raw"] = row["harness_tokens_per_s"] / row["raw_tokens_per_s"]
            if "unseeded" in runs:
                row["seeded_vs_unseeded"] = row["harness_tokens_per_s"] / row["unseeded_tokens_per_s"]
            rows.append(row)
            print(row, flush=True)
        parts.close()
    return {**(floor or {}), "rows": rows}
