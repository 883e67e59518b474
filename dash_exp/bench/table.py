"""The README's Performance table from the results of `python -m dash_exp.bench`."""

from __future__ import annotations

from typing import Any

from dash_exp.bench.train import step_window_s

CMD = "python -m dash_exp.bench"


def _row(measure: str, ours: str, baseline: str, ratio: float, goal: str, met: bool | None, command: str) -> str:
    verdict = "" if met is None else ("yes" if met else "**no**")
    return f"| {measure} | {ours} | {baseline} | {ratio:.2f}x | {goal} | {verdict} | `{command}` |"


def performance_table(r: dict[str, Any]) -> str:
    """Markdown: one row per measured ratio; benchmarks that did not run are listed as skipped."""
    lines = ["| measure | ours | baseline | ratio | goal | met | reproduce |", "|---|---|---|---|---|---|---|"]
    skipped = [name for name, result in r.items() if result is None]
    if (t := r.get("train")) is not None:
        d, g, ratio = t["dash"], t["grpo"], t["ratio"]
        cmd = f"{CMD} train --steps {t['steps']} --repeats {t['repeats']}"
        lines += [
            _row(f"DASH vs GRPO: training time, {t['steps']} steps (same samples)", f"{d['total_s']:.1f} s",
                 f"{g['total_s']:.1f} s", ratio["total_s"], "<= 0.15x", ratio["total_s"] <= 0.15, cmd),
            _row("... of which inference (time/inference)", f"{d['inference_s']:.1f} s", f"{g['inference_s']:.1f} s",
                 ratio["inference_s"], "", None, cmd),
            _row("... of which update (time/update)", f"{d['update_s']:.1f} s", f"{g['update_s']:.1f} s",
                 ratio["update_s"], "", None, cmd),
            _row("DASH vs GRPO: final greedy accuracy", f"{100 * d['accuracy']:.1f}%", f"{100 * g['accuracy']:.1f}%",
                 d["accuracy"] / g["accuracy"], "equal (+-3 points)", abs(d["accuracy"] - g["accuracy"]) <= 0.03, cmd),
        ]
        f = t["filter"]
        lines.append(_row(f"Gradient filtering alone: update time per step batch late in training ({f['batches']} "
                          f"batches from step {f['first_step']}, {100 * f['kept_frac']:.0f}% kept), DASH vs No-GF",
                          f"{f['dash_update_s']:.3f} s", f"{f['no_gf_update_s']:.3f} s", f["ratio"], "< 1x",
                          f["ratio"] < 1, cmd))
    for backend, engine in (("hf", "transformers generate"), ("vllm", "LLM.generate")):
        if (ro := r.get(f"rollout_{backend}")) is not None:
            lines.append(_row(f"Rollout {backend}: harness vs raw {engine}, batch {ro['batch']} (tokens/s)",
                              f"{ro['harness_tokens_per_s']:,.0f}", f"{ro['raw_tokens_per_s']:,.0f}", ro["ratio"],
                              ">= 0.9x", ro["ratio"] >= 0.9, f"{CMD} rollout --backend {backend}"))
    if (b := r.get("backprop")) is not None:
        lines.append(_row(f"Backprop: harness vs bare torch loop, micro-batch {b['microbatch']} (tokens/s)",
                          f"{b['harness_tokens_per_s']:,.0f}", f"{b['bare_tokens_per_s']:,.0f}", b["ratio"], ">= 0.9x",
                          b["ratio"] >= 0.9, f"{CMD} backprop"))
    for name, goal in (("dash", 0.5), ("grpo", 1.0)):
        if (trl := r.get(f"trl_{name}")) is not None and t is not None:
            # the same optimizer steps of training on both sides (TRL's first are its warm-up)
            first, count = trl["warmup"] + 1, trl["steps"]
            ours, theirs = step_window_s(t, name, first, count), trl["s_per_step_median"]
            lines.append(_row(f"{name.upper()} vs TRL {trl['trl_version']} GRPOTrainer, generation batch "
                              f"{trl['settings']['generation_batch_size']}: seconds per optimizer step (median of "
                              f"steps {first}-{first + count - 1})", f"{ours:.2f} s", f"{theirs:.2f} s",
                              ours / theirs, f"<= {goal}x", ours / theirs <= goal, f"make bench-env; {CMD}"))
    if skipped:
        lines.append(f"\nNot measured (failed; see the log above): {', '.join(skipped)}")
    return "\n".join(lines)
