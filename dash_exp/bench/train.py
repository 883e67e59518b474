"""DASH vs GRPO end to end (Fig 1 right, Table 3), and gradient filtering alone late in training.

Both algorithms train the embedded default for the same steps, i.e. on the same number of samples, with the
same seeds (and so the same rollouts at the first step). Runs alternate GRPO, DASH, GRPO, DASH, ... one pair
per seed. Gradient filtering alone: from each DASH run's final checkpoint, a few fresh step batches are each
updated with the filter (DASH) and without it (No-GF), alternately; only the update differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dash_exp.bench import interleaved, median


def _config(algorithm: str, seed: int, steps: int, run_dir: Path, overrides: list[str]) -> Any:
    from dash_exp.config import compose_config, validate

    cfg = compose_config([f"algorithm={algorithm}", f"seed={seed}", f"steps={steps}", "eval_every=0",
                          "save_every=0", "logger=none", "resume=never", f"run_dir={run_dir}", *overrides])
    validate(cfg)
    return cfg


def _run_times(run_dir: Path, summary: dict[str, Any], eval_set: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    return {
        "total_s": summary["time/elapsed"],
        "inference_s": sum(r["time/inference"] for r in steps),
        "update_s": sum(r["time/update"] for r in steps),
        "other_s": sum(r["time/step"] - r["time/inference"] - r["time/update"] for r in steps),
        "step_s": [r["time/step"] for r in steps],
        "accuracy": summary["final"][f"eval/{eval_set}/accuracy"],
        "sampled_accuracy": summary["final"][f"eval/{eval_set}/sampled_accuracy"],
    }


def filter_alone(cfg: Any, run_dir: Path, batches: int = 4, repeats: int = 3) -> list[dict[str, float]]:
    """Late in training (a finished DASH run's weights): the update time of `batches` fresh step batches, each
    with gradient filtering and without (same samples, same weights); medians of `repeats` per batch."""
    from dash_exp.checkpoint import latest_checkpoint
    from dash_exp.run import build
    from dash_exp.tracking import MetricSink
    from dash_exp.trainer import Trainer

    parts = build(cfg)
    sink = MetricSink(run_dir, cfg.logger, "bench", "bench", {}, filename="bench_metrics.jsonl")
    rows = []
    try:
        trainer = Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir, ref=parts.ref)
        trainer.resume(latest_checkpoint(run_dir))
        for i in range(1, batches + 1):
            samples, keep, metrics = trainer.collect(trainer.step + i)
            rows.append({"step": trainer.step + i, "kept_frac": metrics["filter/kept_frac"],
                         **_update_times(trainer, samples, keep, repeats)})
    finally:
        sink.close()
        parts.task.close()
    return rows


def _update_times(trainer: Any, samples: list[Any], keep: list[bool], repeats: int) -> dict[str, float]:
    """Median update time of one step batch with the gradient filter (dash) and without (no_gf), alternately."""
    everything = [True] * len(samples)
    # each update also takes an optimizer step: the weights drift a little between repeats, the cost does not
    runs = interleaved({"dash": lambda: trainer.update(samples, keep, trainer.step),
                        "no_gf": lambda: trainer.update(samples, everything, trainer.step)}, repeats)
    return {f"{name}_update_s": median([t for t, _ in r]) for name, r in runs.items()}


def run(overrides: list[str], repeats: int = 3, steps: int = 60, out: Path = Path("runs/bench")) -> dict[str, Any]:
    """GRPO and DASH, one pair of runs per seed; medians over seeds, and the median of per-seed ratios."""
    from dash_exp.run import train

    per_seed: dict[str, list[dict[str, Any]]] = {"grpo": [], "dash": []}
    batches: list[dict[str, float]] = []
    for seed in range(repeats):
        for algorithm in ("grpo", "dash"):
            run_dir = out / f"{algorithm}-seed{seed}"
            cfg = _config(algorithm, seed, steps, run_dir, overrides)
            summary = train(cfg)
            per_seed[algorithm].append(_run_times(run_dir, summary, cfg.task.name))
        batches += filter_alone(cfg, run_dir)
    result: dict[str, Any] = {"steps": steps, "repeats": repeats, "per_seed": per_seed, "filter_batches": batches}
    for algorithm, runs in per_seed.items():
        result[algorithm] = {key: median([r[key] for r in runs]) for key in runs[0] if key != "step_s"}
    result["ratio"] = {key: median([d[key] / g[key] for d, g in zip(per_seed["dash"], per_seed["grpo"], strict=True)])
                       for key in ("total_s", "inference_s", "update_s")}
    # pooled over every late batch of every seed: mean update time per step batch with and without the filter
    dash, no_gf = (sum(b[f"{name}_update_s"] for b in batches) / len(batches) for name in ("dash", "no_gf"))
    result["filter"] = {"batches": len(batches), "first_step": min(b["step"] for b in batches),
                        "kept_frac": sum(b["kept_frac"] for b in batches) / len(batches),
                        "dash_update_s": dash, "no_gf_update_s": no_gf, "ratio": dash / no_gf}
    return result


def step_window_s(train_result: dict[str, Any], algorithm: str, first: int, count: int) -> float:
    """Median seconds per optimizer step over steps first .. first + count - 1 of every seed's run (every step of
    a run shorter than that)."""
    runs = train_result["per_seed"][algorithm]
    return median([t for run in runs for t in (run["step_s"][first - 1: first - 1 + count] or run["step_s"])])
