"""Benchmarks, measured side by side in one process and reported as ratios of medians of repeated runs.

    python -m dash_exp.bench                      # everything below, then the Performance table (make bench)
    python -m dash_exp.bench rollout --backend hf # one benchmark; `--help` lists them

Each benchmark module exposes `run(overrides, repeats, ...) -> dict` and is interleaved (A, B, A, B, ...)
so drift in machine load hits both sides equally.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[tuple[float, Any]]]:
    """Run each call `repeats` times, round-robin; (seconds, result) per run, per name."""
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            runs[name].append(timed(fn))
    return runs


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def components(overrides: list[str]) -> tuple[Any, Any]:
    """The composed, validated config (logger=none) and its built components, seeded as a run is."""
    from dash_exp.config import compose_config, resolved_threads
    from dash_exp.factory import build, seed_everything

    cfg = compose_config(["logger=none", *overrides])
    seed_everything(cfg.seed, resolved_threads(cfg))
    return cfg, build(cfg)


def step_prompts(cfg: Any, parts: Any) -> list[list[int]]:
    """Token ids of the first step batch's prompts (prompts_per_step training problems)."""
    return [parts.tokenizer.encode(p.prompt, add_special_tokens=False)
            for p in parts.task.train[: cfg.prompts_per_step]]


def bench_trainer(cfg: Any, parts: Any, name: str) -> Any:
    """The real Trainer on `parts`, with its metric sink in a fresh cfg.run_dir (close trainer.sink and
    trainer.task when done)."""
    from dash_exp.tracking import MetricSink
    from dash_exp.trainer import Trainer

    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    sink = MetricSink(run_dir, cfg.logger, name, "bench", {})
    return Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir, ref=parts.ref)
