"""DASH vs GRPO end to end (Fig 1 right, Table 3), and gradient filtering alone late in training.

Per seed, a GRPO trainer and a DASH trainer train the embedded default side by side in this process: one
optimizer step each in turn, the order alternating every step, so drift in machine load hits both equally.
They see the same number of samples and, for the same seed, the same rollouts at the first step. Times are
the real trainer's (time/step, time/inference, time/update). Gradient filtering alone: the trained DASH
trainer then updates a few fresh step batches with the filter (DASH) and without it (No-GF), alternately;
only the update differs. Both trainers are held at once: on a GPU with vLLM, give each engine its share
(rollout.gpu_memory_utilization=0.2) or turn on rollout.enable_sleep_mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dash_exp.bench import bench_trainer, components, interleaved, median

ALGORITHMS = ("grpo", "dash")


@dataclass
class Side:
    """One algorithm's trainer and its per-step metrics."""

    trainer: Any
    rows: list[dict[str, float]] = field(default_factory=list)

    def step(self, step: int) -> None:
        """One optimizer step of the real trainer, timed as Trainer.fit times it, logged to metrics.jsonl."""
        metrics = self.trainer.timed_step(step)
        self.trainer.sink.log(step, metrics)
        self.rows.append(metrics)

    def summary(self) -> dict[str, Any]:
        """Training time split as Fig 1 right, step times, final held-out accuracy."""
        final = self.trainer.evaluate()
        self.trainer.sink.log(len(self.rows), final)
        task = self.trainer.cfg.task.name
        return {
            "total_s": sum(r["time/step"] for r in self.rows),
            "inference_s": sum(r["time/inference"] for r in self.rows),
            "update_s": sum(r["time/update"] for r in self.rows),
            # the sampler's weight sync after each optimizer step (vLLM: reload_weights; HF: none unless data parallel)
            "sync_s": sum(r["time/sync"] for r in self.rows),
            "other_s": sum(r["time/step"] - r["time/inference"] - r["time/update"] for r in self.rows),
            "step_s": [r["time/step"] for r in self.rows],
            "accuracy": final[f"eval/{task}/accuracy"],
            "sampled_accuracy": final[f"eval/{task}/sampled_accuracy"],
        }

    def close(self) -> None:
        self.trainer.sink.close()
        self.trainer.task.close()


def _side(algorithm: str, seed: int, steps: int, run_dir: Path, overrides: list[str]) -> Side:
    cfg, parts = components([f"algorithm={algorithm}", f"seed={seed}", f"steps={steps}", f"run_dir={run_dir}",
                             *overrides])
    return Side(bench_trainer(cfg, parts, f"bench-{algorithm}"))


def side_by_side(seed: int, steps: int, out: Path, overrides: list[str], filter_batches: int = 4
                 ) -> tuple[dict[str, Any], list[dict]]:
    """GRPO and DASH for `steps` steps, interleaved; their summaries, then the filter probe's `filter_batches`
    batches."""
    sides = {a: _side(a, seed, steps, out / f"{a}-seed{seed}", overrides) for a in ALGORITHMS}
    try:
        for step in range(1, steps + 1):
            for algorithm in ALGORITHMS if step % 2 else reversed(ALGORITHMS):
                sides[algorithm].step(step)
        summaries = {a: side.summary() for a, side in sides.items()}
        batches = filter_alone(sides["dash"].trainer, filter_batches)
    finally:
        for side in sides.values():
            side.close()
    return summaries, batches


def filter_alone(trainer: Any, batches: int = 4, repeats: int = 3) -> list[dict[str, float]]:
    """Late in training (a trained DASH trainer): the update time of `batches` fresh step batches, each with
    gradient filtering and without (same samples, same weights); medians of `repeats` per batch."""
    rows = []
    for i in range(1, batches + 1):
        samples, keep, metrics = trainer.collect(trainer.step + i)
        rows.append({"step": trainer.step + i, "kept_frac": metrics["filter/kept_frac"],
                     **_update_times(trainer, samples, keep, repeats)})
    return rows


def _update_times(trainer: Any, samples: list[Any], keep: list[bool], repeats: int) -> dict[str, float]:
    """Median update time of one step batch with the gradient filter (dash) and without (no_gf), alternately."""
    everything = [True] * len(samples)
    # each update also takes an optimizer step: the weights drift a little between repeats, the cost does not
    runs = interleaved({"dash": lambda: trainer.update(samples, keep, trainer.step),
                        "no_gf": lambda: trainer.update(samples, everything, trainer.step)}, repeats)
    return {f"{name}_update_s": median([t for t, _ in r]) for name, r in runs.items()}


def run(overrides: list[str], repeats: int = 3, steps: int = 60, out: Path = Path("runs/bench"),
        filter_batches: int = 4) -> dict[str, Any]:
    """GRPO and DASH side by side, one pair per seed; medians over seeds, and the median of per-seed ratios; the
    filter probe (`filter_batches` late step batches per seed, 0 = none) after each pair."""
    per_seed: dict[str, list[dict[str, Any]]] = {a: [] for a in ALGORITHMS}
    batches: list[dict[str, float]] = []
    for seed in range(repeats):
        summaries, late = side_by_side(seed, steps, out, overrides, filter_batches)
        for algorithm, summary in summaries.items():
            per_seed[algorithm].append(summary)
        batches += late
    result: dict[str, Any] = {"steps": steps, "repeats": repeats, "per_seed": per_seed, "filter_batches": batches}
    for algorithm, runs in per_seed.items():
        result[algorithm] = {key: median([r[key] for r in runs]) for key in runs[0] if key != "step_s"}
    result["ratio"] = {key: median([d[key] / g[key] for d, g in zip(per_seed["dash"], per_seed["grpo"], strict=True)])
                       for key in ("total_s", "inference_s", "update_s")}
    if not batches:
        return result
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
