"""Benchmarks, measured side by side in one process and reported as ratios of medians of repeated runs.

    python -m dash_exp.bench                      # everything below, then the Performance table (make bench)
    python -m dash_exp.bench rollout --backend hf # one benchmark; `--help` lists them

Each benchmark module exposes `run(overrides, repeats, ...) -> dict` and is interleaved (A, B, A, B, ...)
so drift in machine load hits both sides equally.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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
