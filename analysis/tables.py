"""The paper's tables (1, 3, 5, 6) beside ours, as Markdown.

Ours: mean ± std over seeds of the final held-out greedy and sampled accuracy (%) of each evaluation set in
the runs (plus training time where the paper reports time). The paper's numbers come from its Qwen2.5 runs
on MATH-500 / GSM8K; when our runs use another model or task (the embedded default: a ~1M-parameter model
on arithmetic), compare directions (which method wins, what is faster), not values. Every function takes
the frames of `analysis.runs.load_runs` and returns Markdown; it raises `NoDataError` when its sweep has no
runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.figures import (
    KL_DISPLAY,
    NoDataError,
    batch_size_medians,
    default_targets,
    display,
    eval_points,
    first_reach,
    gain_targets,
    start_final,
    time_unit,
)
from analysis.stats import accuracy_se, compare

PAPER_SIZES = ("0.5B", "1.5B", "3B")
# Table 1: MATH / GSM8K accuracy (%) of Qwen2.5 base models
PAPER_TABLE1 = {
    "base": {"0.5B": (22.6, 30.3), "1.5B": (48.0, 58.8), "3B": (58.8, 66.0)},
    "sft_h": {"0.5B": (8.0, 7.2), "1.5B": (17.2, 32.8), "3B": (24.0, 30.6)},
    "sft_m": {"0.5B": (24.0, 22.7), "1.5B": (46.2, 46.0), "3B": (53.0, 66.0)},
    "dash": {"0.5B": (27.2, 31.1), "1.5B": (54.0, 58.8), "3B": (64.6, 64.6)},
}
# Table 3 (0.5B): training time (h), MATH, GSM8K
PAPER_TABLE3 = {"grpo": (38.9, 27.6, 32.8), "no_gf": (6.9, 27.4, 31.6), "dash": (6.6, 27.2, 31.1)}
# Table 5: MATH / GSM8K for 0.5B and 1.5B
PAPER_TABLE5 = {
    "dash": {"0.5B": (27.2, 31.1), "1.5B": (54.0, 58.8)},
    "ppo_multi": {"0.5B": (28.8, 31.5), "1.5B": (54.0, 61.0)},
    "ppo_mini": {"0.5B": (29.8, 31.6), "1.5B": (36.0, 8.1)},
}
# Table 6: time (h), MATH, GSM8K; DASH with KL (on) and without (off)
PAPER_TABLE6 = {
    "on": {"0.5B": (6.6, 27.2, 31.1), "1.5B": (12.8, 54.0, 58.8), "3B": (22.6, 64.6, 64.6)},
    "off": {"0.5B": (5.7, 31.4, 34.0), "1.5B": (10.3, 56.8, 62.1), "3B": (17.6, 66.4, 60.0)},
}
# Table 2 (code, MBPP+): pass@1 / pass@8 (%) for Qwen2.5 0.5B and 1.5B
PAPER_TABLE2 = {
    "base": {"0.5B": (2.6, 22.8), "1.5B": (7.1, 60.5)},
    "sft_h": {"0.5B": (8.77, 29.0), "1.5B": (19.3, 42.1)},
    "dash": {"0.5B": (11.4, 40.4), "1.5B": (23.7, 63.2)},
}
# Table 4 (code, 0.5B): training time (min), pass@1, pass@8
PAPER_TABLE4 = {"grpo": (35.3, 11.4, 49.1), "no_gf": (16.3, 10.5, 43.9), "dash": (16.5, 11.4, 40.4)}
PAPER_CODE_SETUP = ("Qwen2.5 base models trained on the MBPP+ training split (264 problems; 32 prompts x 4 samples "
                    "per step), pass@1 (first sample) and pass@8 (any of 8) at temperature 0.9 on the 114 test "
                    "problems")
PAPER_SETUP = ("Qwen2.5 base models trained on MATH (3 epochs, 64 prompts x 4 samples per step, 2048 new tokens), "
               "greedy accuracy (%) on MATH-500 (MATH) and GSM8K test")


def fmt(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' over the finite values (just the mean for one value, '–' for none)."""
    vals = [scale * float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def by_seed(runs: pd.DataFrame, col: str, scale: float = 1.0) -> dict[object, float]:
    """{seed: scale * value of `col`} over the given runs (the last run of a seed wins); missing values left out."""
    if col not in runs:
        return {}
    return {seed: scale * float(v) for seed, v in zip(runs["seed"], runs[col], strict=True)
            if v is not None and math.isfinite(float(v))}


def problems(runs: pd.DataFrame, eval_set: str) -> pd.Series:
    """Held-out problems behind each run's final accuracy: the logged count, else the configured eval_size."""
    logged = runs.get(f"final/eval/{eval_set}/problems", pd.Series(math.nan, index=runs.index))
    configured = runs.get("task.eval_size", pd.Series(math.nan, index=runs.index))
    return pd.to_numeric(logged, errors="coerce").fillna(pd.to_numeric(configured, errors="coerce"))


def mean_se(sel: pd.DataFrame, eval_set: str, part: str = "final") -> float:
    """Mean over the runs of the binomial standard error (%) of their greedy accuracy on `eval_set`."""
    acc = sel.get(f"{part}/eval/{eval_set}/accuracy", pd.Series(dtype=float))
    return _mean(100 * accuracy_se(float(p), int(n)) for p, n in zip(acc, problems(sel, eval_set), strict=True)
                 if math.isfinite(float(p)) and math.isfinite(float(n)))


def versus(a: pd.DataFrame, b: pd.DataFrame, eval_set: str) -> str:
    """Table cell: final greedy accuracy of runs `a` minus runs `b` (points) with its 95% bootstrap CI, paired by
    seed where the seeds match (analysis.stats.compare)."""
    col = f"final/eval/{eval_set}/accuracy"
    return compare(by_seed(a, col, 100.0), by_seed(b, col, 100.0)).short()


def _se_cell(sel: pd.DataFrame, eval_set: str, part: str = "final") -> str:
    se = mean_se(sel, eval_set, part)
    return f"{se:.1f}" if math.isfinite(se) else "–"


def _mean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else math.nan


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _select(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str | None, what: str) -> pd.DataFrame:
    if sweep is not None and not runs.empty:
        runs = runs[runs["sweep"] == sweep].reset_index(drop=True)
    if runs.empty:
        raise NoDataError(f"{what}: no completed runs of sweep {sweep!r}")
    return runs


def eval_sets(runs: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(s for t in runs["eval_sets"] for s in t))


def _values(sel: pd.DataFrame, col: str) -> list[float]:
    return list(sel[col]) if col in sel else []


def _ours_accuracy(sel: pd.DataFrame, sets: list[str], part: str = "final") -> dict[str, str]:
    out = {}
    for s in sets:
        out[f"ours {s} greedy"] = fmt(_values(sel, f"{part}/eval/{s}/accuracy"), 100)
        out[f"ours {s} sampled"] = fmt(_values(sel, f"{part}/eval/{s}/sampled_accuracy"), 100)
    return out


def _acc_columns(sets: list[str]) -> list[str]:
    return [c for s in sets for c in (f"ours {s} greedy", f"ours {s} sampled")]


def joined(runs: pd.DataFrame, col: str) -> str:
    """The distinct values of a column, sorted and comma-separated; '?' when there are none."""
    values = sorted(map(str, runs[col].dropna().unique())) if col in runs else []
    return ", ".join(values) or "?"


def _setup_note(runs: pd.DataFrame) -> str:
    sets = eval_sets(runs)
    sizes = runs["task.eval_size"] if "task.eval_size" in runs else pd.Series(dtype=float)
    size = ", ".join(sorted({"all" if pd.isna(v) else str(int(v)) for v in sizes})) or "?"
    steps = runs["steps_done"].dropna()
    steps_txt = (f"{int(steps.min())}" if steps.min() == steps.max() else f"{int(steps.min())}-{int(steps.max())}"
                 ) if len(steps) else "?"
    seeds = joined(runs, "seed")
    ours = (f"**Ours:** model `{joined(runs, 'model')}`, task `{joined(runs, 'task')}`, evaluation set(s) "
            f"{', '.join(sets)} "
            f"({size} problems each), {steps_txt} training steps, seeds {seeds}; mean ± std over "
            f"seeds, accuracy in %.")
    code = is_code(runs)
    paper_like = set(runs["model"].dropna().astype(str)) <= {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"} and \
        set(runs["task"].dropna().astype(str)) <= ({"mbpp"} if code else {"math"})
    caution = ("Same model family and task as the paper; values are comparable only as far as the training "
               "budget matches." if paper_like else
               "Different model, task and budget from the paper: compare directions (which method is better or "
               "faster), not values.")
    return f"- {ours}\n- **Paper:** {PAPER_CODE_SETUP if code else PAPER_SETUP}.\n- {caution}"


def is_code(runs: pd.DataFrame) -> bool:
    """Whether the runs are of a code task (pass rates rather than accuracies)."""
    return bool(len(runs)) and set(runs["task"].dropna().astype(str)) <= {"pycode", "mbpp"}


def _ranking(pairs: list[tuple[str, float]]) -> str:
    pairs = [(n, v) for n, v in pairs if math.isfinite(v)]
    pairs.sort(key=lambda p: -p[1])
    if not pairs:
        return "–"
    out = f"{pairs[0][0]} {pairs[0][1]:.1f}"
    for (_, prev), (name, v) in zip(pairs, pairs[1:], strict=False):
        out += f" {'=' if round(prev, 1) == round(v, 1) else '>'} {name} {v:.1f}"
    return out


def _skipped_note(runs: pd.DataFrame) -> str:
    dirs = set(runs["sweep_dir"].astype(str)) if "sweep_dir" in runs else set()
    skipped = [(d, why) for d, why in runs.attrs.get("skipped") or [] if str(Path(d).parent) in dirs]
    if not skipped:
        return ""
    return "\n\nSkipped run dirs of this sweep (not in the table): " + "; ".join(
        f"`{Path(d).name}` ({why})" for d, why in skipped) + "."


# -------------------------------------------------------------------------------------------------------- Table 1
def ordered_labels(runs: pd.DataFrame, preferred: tuple[str, ...], always: tuple[str, ...] = ()) -> list[str]:
    """The paper's row order for the labels present (plus `always`), then any other label in run order."""
    present = set(runs["label"])
    labels = [lb for lb in preferred if lb in present or lb in always]
    return labels + [lb for lb in dict.fromkeys(runs["label"]) if lb not in labels]


def table1(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "sft_vs_rl") -> str:
    """Table 1 (finding 1): Base, SFT-H, SFT-M, DASH. Ours for Base is the initial evaluation (the untrained
    model); with no base runs, the initial evaluation of every run of the sweep (they share the base)."""
    runs = _select(runs, steps, sweep, "table1")
    sets = eval_sets(runs)
    labels = ordered_labels(runs, ("base", "sft_h", "sft_m", "dash"), always=("base",))
    paper_cols = [f"paper {size} {b}" for size in PAPER_SIZES for b in ("MATH", "GSM8K")]
    rows, notes = [], []
    for label in labels:
        sel = runs[runs["label"] == label]
        if label == "base":
            if sel.empty:
                sel = runs
                notes.append("Base (ours): no `base` runs; the initial evaluation of every run is shown.")
            elif (sel["steps_done"].fillna(0) > 0).any():
                notes.append(f"Base (ours): the `base` runs trained {int(sel['steps_done'].max())} steps although "
                             "Base means no training; the initial (pre-training) evaluation is shown.")
            acc = _ours_accuracy(sel, sets, "initial")
        else:
            acc = _ours_accuracy(sel, sets)
        dash = runs[runs["label"] == "dash"]
        row = {"method": display(label), **acc, "n": len(sel),
               f"SE {sets[0]}": _se_cell(sel, sets[0], "initial" if label == "base" else "final"),
               f"DASH − method, {sets[0]} (95% CI)": "" if label in ("dash", "base") else
               versus(dash, sel, sets[0])}
        for size in PAPER_SIZES:
            math_acc, gsm = PAPER_TABLE1.get(label, {}).get(size, ("–", "–"))
            row[f"paper {size} MATH"], row[f"paper {size} GSM8K"] = math_acc, gsm
        rows.append(row)
    main = sets[0]

    def ours_mean(label: str) -> float:
        sel = runs[runs["label"] == label]
        part = "initial" if label == "base" else "final"
        return 100 * _mean(_values(sel if len(sel) else runs, f"{part}/eval/{main}/accuracy"))

    paper_rank = _ranking([(display(k), v["0.5B"][0]) for k, v in PAPER_TABLE1.items()])
    direction = (f"Direction: paper (0.5B, MATH): {paper_rank}. "
                 f"Ours ({main}, greedy): {_ranking([(display(lb), ours_mean(lb)) for lb in labels])}.")
    body = markdown(rows, ["method", *paper_cols, *_acc_columns(sets), f"SE {sets[0]}",
                           f"DASH − method, {sets[0]} (95% CI)", "n"])
    return "\n\n".join(["## Table 1: RL vs SFT (finding 1)", _setup_note(runs), body, direction, *notes]) + \
        _skipped_note(runs)


# -------------------------------------------------------------------------------------------------------- Table 3
def _time_cells(runs: pd.DataFrame, label: str, div: float, unit: str) -> dict[str, str]:
    """Training time of `label`'s runs, its speed-up over GRPO's and GRPO − method with its interval."""
    sel, grpo = runs[runs["label"] == label], runs[runs["label"] == "grpo"]
    t, grpo_time = _mean(sel["time_elapsed"]), _mean(grpo["time_elapsed"])
    return {f"ours time ({unit})": fmt(sel["time_elapsed"] / div, digits=2),
            "ours speed-up vs GRPO": f"{grpo_time / t:.2f}x" if math.isfinite(grpo_time) and t > 0 else "–",
            f"GRPO − method, time ({unit}, 95% CI)": "" if label == "grpo" else compare(
                by_seed(grpo, "time_elapsed", 1 / div), by_seed(sel, "time_elapsed", 1 / div)).short(2)}


def table3(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "algorithms") -> str:
    """Table 3 (finding 4): GRPO, No-GF, DASH; training time and accuracy."""
    runs = _select(runs, steps, sweep, "table3")
    sets = eval_sets(runs)
    labels = ordered_labels(runs, ("grpo", "no_gf", "dash"))
    div, unit = time_unit(float(runs["time_elapsed"].max()))
    grpo_time = _mean(runs.loc[runs["label"] == "grpo", "time_elapsed"])
    rows = []
    for label in labels:
        sel = runs[runs["label"] == label]
        paper = PAPER_TABLE3.get(label, ("–", "–", "–"))
        rows.append({"method": display(label), "paper time (h)": paper[0], "paper MATH": paper[1],
                     "paper GSM8K": paper[2], **_time_cells(runs, label, div, unit),
                     **_ours_accuracy(sel, sets), f"SE {sets[0]}": _se_cell(sel, sets[0]),
                     f"method − GRPO, {sets[0]} (95% CI)": "" if label == "grpo" else
                     versus(sel, runs[runs["label"] == "grpo"], sets[0]), "n": len(sel)})
    cols = ["method", "paper time (h)", "paper MATH", "paper GSM8K", f"ours time ({unit})", "ours speed-up vs GRPO",
            f"GRPO − method, time ({unit}, 95% CI)", *_acc_columns(sets), f"SE {sets[0]}",
            f"method − GRPO, {sets[0]} (95% CI)", "n"]
    direction = ("Direction: paper: DASH trains 5.9x faster than GRPO (38.9 h -> 6.6 h) at nearly the same accuracy "
                 "(27.6 -> 27.2 MATH); preemptive sampling gives most of the gain (No-GF 6.9 h), gradient filtering "
                 "the rest.")
    if "dash" in labels and math.isfinite(grpo_time):
        d = runs[runs["label"] == "dash"]
        g = runs[runs["label"] == "grpo"]
        col = f"final/eval/{sets[0]}/accuracy"
        direction += (f" Ours: DASH {grpo_time / _mean(d['time_elapsed']):.2f}x faster than GRPO, greedy "
                      f"{sets[0]} {100 * _mean(_values(g, col)):.1f} -> {100 * _mean(_values(d, col)):.1f}.")
    note = "Time: training wall-clock of the run (sum of step times; evaluation excluded)."
    return "\n\n".join(["## Table 3: GRPO vs No-GF vs DASH (finding 4)", _setup_note(runs),
                        markdown(rows, cols), direction, note]) + _skipped_note(runs)


# ---------------------------------------------------------------------------------------------- Tables 2 and 4
def _pass_cells(sel: pd.DataFrame, eval_set: str, part: str = "final") -> dict[str, str]:
    """Ours: pass@1 and pass@8 (unbiased, from 8 samples per problem) and the greedy pass rate, in %."""
    return {f"ours {k}": fmt(_values(sel, f"{part}/eval/{eval_set}/{key}"), 100)
            for k, key in (("pass@1", "pass@1"), ("pass@8", "pass@8"), ("greedy", "accuracy"))}


def _pass_versus(a: pd.DataFrame, b: pd.DataFrame, eval_set: str, k: int) -> str:
    col = f"final/eval/{eval_set}/pass@{k}"
    return compare(by_seed(a, col, 100.0), by_seed(b, col, 100.0)).short()


PASS_COLUMNS = ["ours pass@1", "ours pass@8", "ours greedy"]


def table2(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "code") -> str:
    """Table 2 (code): Base, SFT-H, DASH; pass@1 and pass@8. Ours for Base is the initial evaluation."""
    runs = _select(runs, steps, sweep, "table2")
    main = eval_sets(runs)[0]
    # the sweep's other methods (GRPO, No-GF) belong to Table 4
    labels = [lb for lb in ordered_labels(runs, ("base", "sft_h", "dash"), always=("base",))
              if lb in ("base", "sft_h", "dash")]
    dash = runs[runs["label"] == "dash"]
    rows = []
    for label in labels:
        sel = runs[runs["label"] == label]
        base = label == "base"
        row = {"method": display(label), **_pass_cells(sel if len(sel) else runs, main, "initial" if base else "final"),
               "n": len(sel)}
        for size in ("0.5B", "1.5B"):
            p1, p8 = PAPER_TABLE2.get(label, {}).get(size, ("–", "–"))
            row[f"paper {size} pass@1"], row[f"paper {size} pass@8"] = p1, p8
        for k in (1, 8):
            row[f"DASH − method, pass@{k} (95% CI)"] = "" if label in ("dash", "base") else \
                _pass_versus(dash, sel, main, k)
        rows.append(row)
    cols = ["method", "paper 0.5B pass@1", "paper 0.5B pass@8", "paper 1.5B pass@1", "paper 1.5B pass@8",
            *PASS_COLUMNS, "DASH − method, pass@1 (95% CI)", "DASH − method, pass@8 (95% CI)", "n"]
    direction = ("Direction: paper (0.5B): DASH 11.4 > SFT-H 8.77 > Base 2.6 pass@1; DASH 40.4 > SFT-H 29.0 > "
                 "Base 22.8 pass@8 (at 1.5B SFT-H's pass@8, 42.1, falls below Base's 60.5).")
    note = (f"Ours: `{main}` held-out set; pass@k is the unbiased estimator (Chen et al. 2021) from "
            "`eval_samples` samples per problem (the paper reports the first sample and any of 8); greedy is the "
            "pass rate of one greedy program.")
    return "\n\n".join(["## Table 2: RL vs SFT on code (finding 1, code)", _setup_note(runs), markdown(rows, cols),
                        direction, note]) + _skipped_note(runs)


def table4(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "code") -> str:
    """Table 4 (code): GRPO, No-GF, DASH; training time, pass@1, pass@8."""
    runs = _select(runs, steps, sweep, "table4")
    main = eval_sets(runs)[0]
    runs = runs[runs["label"].isin(["grpo", "no_gf", "dash"])]  # Base and SFT-H belong to Table 2
    if runs.empty:
        raise NoDataError("table4: no completed GRPO, No-GF or DASH runs of sweep " + repr(sweep))
    labels = ordered_labels(runs, ("grpo", "no_gf", "dash"))
    div, unit = time_unit(float(runs["time_elapsed"].max()))
    grpo = runs[runs["label"] == "grpo"]
    rows = []
    for label in labels:
        sel = runs[runs["label"] == label]
        paper = PAPER_TABLE4.get(label, ("–", "–", "–"))
        rows.append({"method": display(label), "paper time (min)": paper[0], "paper pass@1": paper[1],
                     "paper pass@8": paper[2], **_time_cells(runs, label, div, unit),
                     **_pass_cells(sel, main),
                     "method − GRPO, pass@1 (95% CI)": "" if label == "grpo" else _pass_versus(sel, grpo, main, 1),
                     "method − GRPO, pass@8 (95% CI)": "" if label == "grpo" else _pass_versus(sel, grpo, main, 8),
                     "n": len(sel)})
    cols = ["method", "paper time (min)", "paper pass@1", "paper pass@8", f"ours time ({unit})",
            "ours speed-up vs GRPO", f"GRPO − method, time ({unit}, 95% CI)", *PASS_COLUMNS,
            "method − GRPO, pass@1 (95% CI)", "method − GRPO, pass@8 (95% CI)", "n"]
    direction = ("Direction: paper: DASH trains 2.1x faster than GRPO (35.3 -> 16.5 min) at the same pass@1 (11.4) "
                 "and a lower pass@8 (49.1 -> 40.4).")
    note = "Time: training wall-clock of the run (sum of step times; evaluation excluded)."
    return "\n\n".join(["## Table 4: GRPO vs No-GF vs DASH on code (finding 4, code)", _setup_note(runs),
                        markdown(rows, cols), direction, note]) + _skipped_note(runs)


# ------------------------------------------------------------------------------------------- time to accuracy
def time_to_accuracy(points: pd.DataFrame, fractions: Iterable[float] = (0.5, 0.9),
                     targets: Iterable[float] | None = None) -> pd.DataFrame:
    """Per (target, run): when the run first reaches the target in its evaluations `points`
    (`figures.eval_points`); `target` names it: 'f% of gain' (f of the run's own final - start) for each fraction,
    then '≥ x%' for each absolute accuracy (default: `figures.default_targets`). Columns of `figures.first_reach`
    plus `target_name`, `kind`."""
    absolute = default_targets(points) if targets is None else list(targets)
    parts = [first_reach(points, gain_targets(points, f)).assign(target_name=f"{100 * f:g}% of gain", kind="gain")
             for f in fractions]
    parts += [first_reach(points, t).assign(target_name=f"≥ {100 * t:g}%", kind="absolute") for t in absolute]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _start_over_final(points: pd.DataFrame) -> tuple[float, float]:
    """(min, max) over the runs that gained of first / last evaluated accuracy, in % (NaN when none gained)."""
    start, final = start_final(points)
    ratio = (start / final)[final > start]
    return 100 * ratio.min(), 100 * ratio.max()


def _evaluated_steps(points: pd.DataFrame) -> str:
    """'0, 20, 40 and at each run's last step (60)': the periodic evaluation steps, then the final ones."""
    periodic = sorted(set(points.loc[~points["final"], "step"]))
    last = points.loc[points["final"], "step"]
    span = f"{last.min()}" if last.min() == last.max() else f"{last.min()}-{last.max()}"
    return f"{', '.join(map(str, periodic))} and at each run's last step ({span})"


def table3_time_to_accuracy(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str | None = "algorithms",
                            fractions: Iterable[float] = (0.5, 0.9), targets: Iterable[float] | None = None) -> str:
    """Beside Table 3 (finding 4): training time and samples until each run first reaches fractions of its own
    accuracy gain and fixed accuracies (held-out greedy), per method; reached k/n and mean ± std over those
    that reached it."""
    runs = _select(runs, steps, sweep, "table3_time_to_accuracy")
    steps = steps[steps["run_dir"].isin(runs["run_dir"])]
    labels = ordered_labels(runs, ("grpo", "no_gf", "dash", "ppo_multi", "ppo_mini"))
    div, unit = time_unit(float(runs["time_elapsed"].max()))
    rows, notes = [], []
    for s in eval_sets(runs):
        points = eval_points(runs, steps, s)
        if points.empty:
            continue
        reach = time_to_accuracy(points, fractions, targets)
        for name in dict.fromkeys(reach["target_name"]):
            for label in labels:
                sel = reach[(reach["target_name"] == name) & (reach["label"] == label)]
                hit = sel[sel["reached"]]
                rows.append({"target": f"{s} {name}", "method": display(label),
                             "reached": f"{len(hit)}/{len(sel)}", f"time ({unit})": fmt(hit["time_s"] / div, digits=1),
                             "training samples": fmt(hit["samples"], digits=0), "step": fmt(hit["step"], digits=0)})
        lo, hi = _start_over_final(points)
        absolute = reach.loc[reach["kind"] == "absolute", "target"].drop_duplicates()
        base = start_final(points)[0].mean()
        degenerate = (f"Fractions of the final accuracy itself would be degenerate: the runs that gain start at "
                      f"{lo:.0f}-{hi:.0f}% of their own final accuracy, so any fraction below {lo:.0f}% is met at "
                      "step 0; hence fractions of the gain (final - start). ") if math.isfinite(lo) else ""
        source = (" (given)" if targets is not None else f" (from the base accuracy {100 * base:.1f}% halfway and "
                  "all the way to the lowest final mean of the methods that end above it, rounded down)")
        notes.append(f"{s}: evaluations at steps {_evaluated_steps(points)}. {degenerate}Absolute targets: "
                     + (", ".join(f"{100 * t:g}%" for t in absolute) + source if len(absolute) else
                        "none (no method's final mean is above the base accuracy)") + ".")
    if not rows:
        raise NoDataError("table3_time_to_accuracy: no held-out evaluations in the runs")
    how = ("Per run: the first held-out greedy evaluation at or above the target (so the resolution is the "
           "evaluation interval); time on Table 3's clock (training wall-clock: sum of step times up to that step, "
           "evaluation excluded); training samples = step x prompts_per_step x group_size. reached: runs that get "
           "there / runs; a run whose final accuracy is not above its start has no gain and never reaches a "
           "fraction of it. Time, samples and step: mean ± std over the runs that reached the target.")
    title = "finding 4, beside Table 3" if sweep == "algorithms" else f"sweep `{sweep}`"
    return "\n\n".join([f"## Time to accuracy ({title})", _setup_note(runs),
                        markdown(rows, ["target", "method", "reached", f"time ({unit})", "training samples",
                                        "step"]), how, *notes]) + _skipped_note(runs)


# -------------------------------------------------------------------------------------------------------- Table 5
def table5(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "pg_vs_ppo") -> str:
    """Table 5 (finding 2): DASH vs PPO Multi vs PPO Mini at the same training wall-clock."""
    runs = _select(runs, steps, sweep, "table5")
    sets = eval_sets(runs)
    labels = ordered_labels(runs, ("dash", "ppo_multi", "ppo_mini"))
    div, unit = time_unit(float(runs["time_elapsed"].max()))
    rows = []
    for label in labels:
        sel = runs[runs["label"] == label]
        row = {"method": display(label)}
        for size in ("0.5B", "1.5B"):
            m, g = PAPER_TABLE5.get(label, {}).get(size, ("–", "–"))
            row[f"paper {size} MATH"], row[f"paper {size} GSM8K"] = m, g
        row.update({"ours steps": fmt(sel["steps_done"], digits=0), f"ours time ({unit})":
                    fmt(sel["time_elapsed"] / div, digits=2), **_ours_accuracy(sel, sets),
                    f"SE {sets[0]}": _se_cell(sel, sets[0]),
                    f"method − DASH, {sets[0]} (95% CI)": "" if label == "dash" else
                    versus(sel, runs[runs["label"] == "dash"], sets[0]), "n": len(sel)})
        rows.append(row)
    cols = ["method", *[f"paper {s} {b}" for s in ("0.5B", "1.5B") for b in ("MATH", "GSM8K")], "ours steps",
            f"ours time ({unit})", *_acc_columns(sets), f"SE {sets[0]}", f"method − DASH, {sets[0]} (95% CI)", "n"]
    budget = runs["time_budget_s"].dropna() if "time_budget_s" in runs else pd.Series(dtype=float)
    budget_txt = (f"All runs stop at a training time budget of {budget.max():g} s (`time_budget_s`) or at their "
                  "step limit, whichever comes first." if len(budget) else "No time budget was set.")
    main = sets[0]
    direction = ("Direction: paper: PPO's extra passes give little over plain policy gradient (0.5B) and Mini "
                 "collapses at 1.5B (GSM8K 8.1). Ours (" + main + ", greedy): "
                 + _ranking([(display(lb), 100 * _mean(_values(runs[runs['label'] == lb],
                                                                f'final/eval/{main}/accuracy'))) for lb in labels])
                 + ".")
    return "\n\n".join(["## Table 5: policy gradient vs PPO (finding 2)", _setup_note(runs), budget_txt,
                        markdown(rows, cols), direction]) + _skipped_note(runs)


# -------------------------------------------------------------------------------------------------------- Table 6
def table6(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "kl") -> str:
    """Table 6 (finding 3): DASH with and without the KL penalty; time, accuracy, response length, pass@k."""
    runs = _select(runs, steps, sweep, "table6")
    sets = eval_sets(runs)
    kls = [k for k in ("on", "off") if k in set(runs["kl"])]
    kls += [k for k in dict.fromkeys(runs["kl"]) if k not in kls]
    div, unit = time_unit(float(runs["time_elapsed"].max()))
    ks = sorted({int(c.rsplit("@", 1)[1]) for c in runs.columns if c.startswith(f"final/eval/{sets[0]}/pass@")})
    kmax = ks[-1] if ks else None
    rows = []
    for kl in kls:
        sel = runs[runs["kl"] == kl]
        name = "DASH (with KL)" if kl == "on" else "No-KL" if kl == "off" else KL_DISPLAY.get(kl, kl)
        row = {"method": name}
        for size in PAPER_SIZES:
            t, m, g = PAPER_TABLE6.get(kl, {}).get(size, ("–", "–", "–"))
            row[f"paper {size} time (h)"], row[f"paper {size} MATH"], row[f"paper {size} GSM8K"] = t, m, g
        row[f"ours time ({unit})"] = fmt(sel["time_elapsed"] / div, digits=2)
        row.update(_ours_accuracy(sel, sets))
        for s in sets:
            row[f"ours {s} length (tokens)"] = fmt(_values(sel, f"final/eval/{s}/length_mean"))
            if kmax:
                row[f"ours {s} pass@{kmax}"] = fmt(_values(sel, f"final/eval/{s}/pass@{kmax}"), 100)
        row[f"SE {sets[0]}"] = _se_cell(sel, sets[0])
        row[f"method − KL, {sets[0]} (95% CI)"] = "" if kl == "on" else versus(sel, runs[runs["kl"] == "on"], sets[0])
        row["n"] = len(sel)
        rows.append(row)
    cols = ["method", *[f"paper {s} {c}" for s in PAPER_SIZES for c in ("time (h)", "MATH", "GSM8K")],
            f"ours time ({unit})", *_acc_columns(sets),
            *[c for s in sets for c in (f"ours {s} length (tokens)", *([f"ours {s} pass@{kmax}"] if kmax else []))],
            f"SE {sets[0]}", f"method − KL, {sets[0]} (95% CI)", "n"]
    direction = ("Direction: paper: without KL, training is 13-22% faster and MATH accuracy higher at every size "
                 "(generations are shorter).")
    if {"on", "off"} <= set(kls):
        on, off = runs[runs["kl"] == "on"], runs[runs["kl"] == "off"]
        col = f"final/eval/{sets[0]}/accuracy"
        direction += (f" Ours: time {_mean(on['time_elapsed']) / div:.2f} -> {_mean(off['time_elapsed']) / div:.2f} "
                      f"{unit}, greedy {sets[0]} {100 * _mean(_values(on, col)):.1f} -> "
                      f"{100 * _mean(_values(off, col)):.1f}, greedy length "
                      f"{_mean(_values(on, f'final/eval/{sets[0]}/length_mean')):.1f} -> "
                      f"{_mean(_values(off, f'final/eval/{sets[0]}/length_mean')):.1f} tokens (KL -> No-KL).")
    return "\n\n".join(["## Table 6: KL penalty vs none (finding 3)", _setup_note(runs), markdown(rows, cols),
                        direction]) + _skipped_note(runs)


# ------------------------------------------------------------------------------------------------ batch sizes
def table_batch_sizes(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str | None = "batch_sizes") -> str:
    """Medians behind fig_batch_sizes (no paper table): per inference batch and per train micro-batch."""
    runs = _select(runs, steps, sweep, "table_batch_sizes")
    per_run = batch_size_medians(runs, steps[steps["run_dir"].isin(runs["run_dir"])])
    model = ", ".join(map(str, runs["model"].unique()))
    task = ", ".join(map(str, runs["task"].unique()))
    parts = ["## Batch sizes: the bottleneck (no paper table)",
             f"Model `{model}`, task `{task}`; per run the median over training steps (first step excluded), then "
             "the median over runs that share the batch size (the other one varies). Peak memory is the process's "
             "peak resident memory during the run (`mem/peak_mb`, reset at each run's start, so jobs of a multirun "
             "report their own peak; on a GPU see `mem/cuda_peak_mb`)."]
    for x, cols in (("inference_batch", [("gen_tokens_per_s", "generation tokens/s")]),
                    ("train_microbatch", [("train_tokens_per_s", "backprop tokens/s"), ("peak_mb", "peak MiB")])):
        rows = []
        for value, g in per_run.groupby(x):
            row = {x: int(value), "runs": len(g)}
            for col, name in cols:
                row[name] = f"{g[col].median():,.0f}"
            rows.append(row)
        parts.append(markdown(rows, [x, *[name for _, name in cols], "runs"]))
    return "\n\n".join(parts) + _skipped_note(runs)


def table_learning(runs: pd.DataFrame, steps: pd.DataFrame | None = None, sweep: str | None = "smollm2") -> str:
    """Does a sweep's model learn: held-out greedy and sampled accuracy before and after training, per seed and as
    mean ± std, with the paired gain's 95% interval (the smollm2 sweep: a real pretrained model)."""
    runs = _select(runs, steps, sweep, "table_learning")
    main = eval_sets(runs)[0]
    rows = []
    for key, label in (("accuracy", "greedy"), ("sampled_accuracy", "sampled")):
        before = by_seed(runs, f"initial/eval/{main}/{key}", 100.0)
        after = by_seed(runs, f"final/eval/{main}/{key}", 100.0)
        for seed in sorted(after, key=str):
            rows.append({"accuracy": label, "seed": seed, "before": f"{before.get(seed, math.nan):.1f}",
                         "after": f"{after[seed]:.1f}", "gain": f"{after[seed] - before.get(seed, math.nan):+.1f}"})
        rows.append({"accuracy": label, "seed": "mean ± std", "before": fmt(before.values()),
                     "after": fmt(after.values()), "gain": f"{compare(after, before).short()} (95% CI)"})
    minutes = fmt(runs["time_elapsed"] / 60)
    note = (f"Ours: `{main}` held-out set, accuracy in %; the gain is after − before, paired by seed. Training time "
            f"per seed: {minutes} min (evaluation excluded).")
    models = ", ".join(sorted(map(str, set(runs["model.name"])))) if "model.name" in runs else "?"
    return "\n\n".join([f"## Held-out accuracy before and after training: sweep {sweep}, {models}", _setup_note(runs),
                        markdown(rows, ["accuracy", "seed", "before", "after", "gain"]), note]) + _skipped_note(runs)


TABLE_FUNCS = {"table1": table1, "table2": table2, "table3": table3,
               "table3_time_to_accuracy": table3_time_to_accuracy, "table4": table4, "table5": table5, "table6": table6,
               "table_batch_sizes": table_batch_sizes, "table_learning": table_learning}


def main(argv: list[str] | None = None) -> int:
    """python -m analysis.tables TABLE [--runs DIR] [--sweep NAME] [--latest]: print one table of the runs under
    DIR (exit 1 when its sweep has no completed run)."""
    import argparse

    from analysis.runs import latest_sweeps, load_runs

    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=main.__doc__)
    parser.add_argument("table", choices=sorted(TABLE_FUNCS))
    parser.add_argument("--runs", default="multirun", help="directory searched recursively for run dirs")
    parser.add_argument("--sweep", default=None, help="the sweep whose runs the table reads (default: the table's)")
    parser.add_argument("--latest", action="store_true", help="only the newest multirun directory of each sweep")
    args = parser.parse_args(argv)
    runs, steps = load_runs(args.runs)
    if args.latest:
        runs, steps = latest_sweeps(runs, steps)
    func = TABLE_FUNCS[args.table]
    try:
        print(func(runs, steps, args.sweep) if args.sweep else func(runs, steps))
    except NoDataError as exc:
        print(f"{exc}: nothing to print", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
