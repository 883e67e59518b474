"""The Performance table (docs/performance.md) from the results of `python -m dash_exp.bench`."""

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
    lines += real_model_rows(r)
    if skipped:
        lines.append(f"\nNot measured (failed; see the log above): {', '.join(skipped)}")
    return "\n".join(lines)


REAL = "SmolLM2-135M"


def real_model_rows(r: dict[str, Any]) -> list[str]:
    """Rows of the real model (the real_* benchmarks): generation against the FLOP floor, DASH vs GRPO seconds per
    step with the weight sync's share, DASH vs TRL."""
    lines = []
    if (g := r.get("real_generation")) is not None:
        cmd = f"{CMD} generation --repeats 1 +sweep=smollm2 ... task.chat_shots=0 max_new_tokens=128"
        rows = {(row["backend"], row["batch"]): row for row in g["rows"]}
        if (bf16 := r.get("real_generation_bf16")) is not None:  # the vLLM engine in bf16 (rollout.dtype)
            rows.update({("vllm-bf16", row["batch"]): row for row in bf16["rows"]})
        floor = g["floor_tokens_per_s"]
        for (backend, batch), row in rows.items():
            lines.append(_row(f"{REAL} generation, {backend} sampler, batch {batch}, {row['max_new_tokens']} new "
                              f"tokens (tokens/s; baseline: the FLOP floor, {g['gflops']:.0f} GFLOP/s)",
                              f"{row['harness_tokens_per_s']:,.0f}", f"{floor:,.0f}", row["harness_vs_floor"], "", None,
                              cmd))
        small, large = min(b for _, b in rows), max(b for _, b in rows)
        if ("hf", small) in rows and ("hf", large) in rows:
            hf_small, hf_large = rows[("hf", small)], rows[("hf", large)]
            lines.append(_row(f"{REAL} HF sampler: batch {large} vs batch {small} (tokens/s; system time "
                              f"{100 * hf_large['harness_sys_share']:.0f}% at {large})",
                              f"{hf_large['harness_tokens_per_s']:,.0f}", f"{hf_small['harness_tokens_per_s']:,.0f}",
                              hf_large["harness_tokens_per_s"] / hf_small["harness_tokens_per_s"], ">= 1x",
                              hf_large["harness_tokens_per_s"] >= hf_small["harness_tokens_per_s"], cmd))
            for backend in ("vllm", "vllm-bf16"):  # rollout=auto picks vLLM for this model on CPU
                if (backend, large) in rows:
                    auto = rows[(backend, large)]
                    lines.append(_row(f"{REAL} rollout=auto ({backend}) at batch {large} vs the HF sampler at batch "
                                      f"{small} (tokens/s)", f"{auto['harness_tokens_per_s']:,.0f}",
                                      f"{hf_small['harness_tokens_per_s']:,.0f}",
                                      auto["harness_tokens_per_s"] / hf_small["harness_tokens_per_s"], ">= 2x",
                                      auto["harness_tokens_per_s"] >= 2 * hf_small["harness_tokens_per_s"], cmd))
        for (backend, batch), row in rows.items():
            if backend.startswith("vllm"):
                lines.append(_row(f"{REAL} {backend}: harness vs raw LLM.generate, batch {batch} (tokens/s)",
                                  f"{row['harness_tokens_per_s']:,.0f}", f"{row['raw_tokens_per_s']:,.0f}",
                                  row["harness_vs_raw"], ">= 0.95x", row["harness_vs_raw"] >= 0.95, cmd))
    t = r.get("real_train")
    if t is not None:
        sync_s = t["dash"]["sync_s"] / t["steps"]
        cmd = f"{CMD} train --steps {t['steps']} --repeats {t['repeats']} --filter-batches 0 +sweep=smollm2 ..."
        dash_step, grpo_step = step_window_s(t, "dash", 1, t["steps"]), step_window_s(t, "grpo", 1, t["steps"])
        lines += [
            _row(f"{REAL} DASH vs GRPO: seconds per optimizer step (median of {t['steps']} steps, same samples)",
                 f"{dash_step:.1f} s", f"{grpo_step:.1f} s", dash_step / grpo_step, "< 1x", dash_step < grpo_step, cmd),
            _row(f"{REAL} weight sync to vLLM per step (time/sync) vs the DASH step", f"{sync_s:.2f} s",
                 f"{dash_step:.1f} s", sync_s / dash_step, "<= 0.05x", sync_s <= 0.05 * dash_step, cmd),
        ]
    if (trl := r.get("real_trl_dash")) is not None and t is not None:
        first, count = trl["warmup"] + 1, trl["steps"]
        ours, theirs = step_window_s(t, "dash", first, count), trl["s_per_step_median"]
        lines.append(_row(f"{REAL} DASH vs TRL {trl['trl_version']} GRPOTrainer, generation batch "
                          f"{trl['settings']['generation_batch_size']}: seconds per optimizer step", f"{ours:.1f} s",
                          f"{theirs:.1f} s", ours / theirs, "<= 0.5x", ours / theirs <= 0.5, f"make bench-env; {CMD}"))
    return lines
