"""Overlapped rollout against the synchronous loop, whole runs on 2 cores (python -m dash_exp.bench overlap).

Each layout trains the embedded default (or whatever the overrides say) for the same steps and seeds, as its own
command line, one after another:
  sync      one process, 2 threads: generate, grade, backprop, in turn
  dp        torchrun, 2 ranks of 1 thread: synchronous data parallel (each rank samples and trains half)
  split     torchrun, 1 trainer + 1 generator of 1 thread each, overlap 0: separate processes, no overlap
  overlap   the same with rollout.overlap=1: the generator samples step t + 1 while the trainer updates step t
Per layout: seconds per step (median over steps, then over seeds), generation and update per step, the idle shares,
held-out accuracy after training (mean ± std over seeds), and for the split layouts max(generation, update + sync):
what a step would cost if the two overlapped perfectly.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# --standalone: a free port of its own, not torchrun's default 29500 that another launch may hold
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "dash_exp.run"]
LAYOUTS: dict[str, list[str]] = {
    "sync": [sys.executable, "-m", "dash_exp.run", "threads=2"],
    "dp": [*TORCHRUN, "threads=1"],
    "split": [*TORCHRUN, "threads=1", "rollout.generator_ranks=1", "rollout.overlap=0"],
    "overlap": [*TORCHRUN, "threads=1", "rollout.generator_ranks=1", "rollout.overlap=1"],
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One run's step timings, idle shares and held-out accuracy, from its metrics.jsonl and summary.json."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    total = sum(r["time/step"] for r in steps)
    acc = {k.rsplit("/", 1)[-1]: v for k, v in summary["final"].items() if k.endswith("accuracy")}
    start = {k.rsplit("/", 1)[-1]: v for k, v in summary["initial"].items() if k.endswith("accuracy")}
    out = {
        "s_per_step": _median([r["time/step"] for r in steps]),
        "generation": _median([r["time/inference"] for r in steps]),
        "update": _median([r["time/update"] for r in steps]),
        "bound": _median([max(r["time/inference"], r["time/update"] + r.get("time/sync", 0.0)) for r in steps]),
        "training_s": total,
        "accuracy": acc.get("accuracy"), "sampled_accuracy": acc.get("sampled_accuracy"),
        "initial_accuracy": start.get("accuracy"),
    }
    if "time/trainer_idle" in steps[0]:
        out["trainer_idle_share"] = sum(r["time/trainer_idle"] for r in steps) / total
        out["generator_idle_share"] = sum(r["time/generator_idle"] for r in steps) / total
        out["staleness_mean"] = statistics.fmean(r["async/staleness_mean"] for r in steps)
    return out


def run(overrides: list[str], seeds: int, out: Path) -> dict[str, Any]:
    """Every layout for seeds 0..seeds-1; the per-run numbers and their summary per layout."""
    results: dict[str, Any] = {}
    for layout, command in LAYOUTS.items():
        runs = []
        for seed in range(seeds):
            run_dir = out / f"{layout}-seed{seed}"
            cmd = [*command, f"seed={seed}", "logger=none", "resume=never", *overrides, f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{layout} seed {seed} failed: {proc.stderr[-2000:]}")
            runs.append({**summarize_run(run_dir), "wall_s": time.perf_counter() - start})
            print(f"{layout} seed {seed}: {runs[-1]['s_per_step']:.3f} s/step, accuracy {runs[-1]['accuracy']}",
                  flush=True)
        results[layout] = {"runs": runs, **_combine(runs)}
    return results


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], float | int)]
    out: dict[str, Any] = {k: _median([r[k] for r in runs]) for k in keys}
    for k in ("accuracy", "sampled_accuracy"):
        values = [r[k] for r in runs]
        out[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[k] = statistics.fmean(values)
    return out


def table(results: dict[str, Any]) -> str:
    """The README's table: one row per layout."""
    lines = ["| layout | s / step | generation | update | max(gen, update + sync) | trainer idle | generator idle | "
             "greedy accuracy after | sampled accuracy after |", "|---|---|---|---|---|---|---|---|---|"]
    sync = results["sync"]["s_per_step"]
    for name, r in results.items():
        idle = (f"{r['trainer_idle_share']:.0%} | {r['generator_idle_share']:.0%}" if "trainer_idle_share" in r
                else "- | -")
        bound = f"{r['bound']:.3f}" if "trainer_idle_share" in r else "-"
        lines.append(f"| {name} | {r['s_per_step']:.3f} ({sync / r['s_per_step']:.2f}x) | {r['generation']:.3f} | "
                     f"{r['update']:.3f} | {bound} | {idle} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['sampled_accuracy']:.3f} ± {r['sampled_accuracy_std']:.3f} |")
    return "\n".join(lines)
