"""The paper's four findings checked against our runs: the claim, a verdict per part with the interval it rests on,
the numbers, and why when not.

`findings_section(runs, steps)` is the "Findings" section that make_figures writes near the top of
figures/README.md. One function per finding returns a `Verdict`, computed from the frames of
`analysis.runs.load_runs` (nothing about the results is written in here). Each part of a claim compares two methods
with `analysis.stats.compare`: the difference of their means over seeds with a 95% bootstrap confidence interval,
paired by seed where both ran the same seeds. A part is "yes" when the interval lies wholly on the claim's side,
"no" when it lies wholly on the other side, "inconclusive" otherwise; the finding is "yes" / "no" / "inconclusive"
when all its parts agree, else "partly"; "not run" when the sweep (or a method it needs) has no completed runs.
Accuracy is the final held-out greedy accuracy (%) on the sweep's first evaluation set; values are mean ± std over
seeds, n = runs, and the per-run binomial standard error of the accuracy (`SE`) is given beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.ablate import Metric, arm_values, contrast, last_steps_mean
from analysis.figures import KL_DISPLAY, auto_window, display, eval_points, first_reach, time_unit
from analysis.runs import sweep_frames
from analysis.stats import Comparison, combine, compare, interval_text, rate_verdict
from analysis.tables import _mean, eval_sets, fmt, joined, mean_se

# a run "collapses" when it ends this far below its own start (about one binomial standard error of the accuracy on
# 100 problems), finding 2's stability measure
COLLAPSE_POINTS = 5.0
# finding 4: DASH's accuracy "equals" GRPO's when it is credibly no more than this many points lower (the whole
# interval of DASH - GRPO lies above -EQUAL_POINTS: a non-inferiority margin)
EQUAL_POINTS = 2.0
# what resolves an inconclusive part
RESOLVE = ("more seeds (`make reproduce SEEDS=5`, `make reproduce-smollm2 SEEDS=5`) narrow the interval; a larger "
           "held-out set (`task.n_test`) lowers each run's standard error")


@dataclass(frozen=True)
class Verdict:
    """One finding: the paper's claim, our verdict (yes / partly / no / inconclusive / not run), the verdict of
    each part of the claim, and the evidence."""

    # the paper's numbering; the code rows are "1 (code)" and "4 (code)"
    number: int | str
    claim: str
    verdict: str
    evidence: str
    parts: dict[str, str] = field(default_factory=dict)
    # the comparison each part rests on (make_figures plots them), its unit and the threshold it is judged against
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        parts = "; ".join(f"{name}: {v}" for name, v in self.parts.items())
        return (f"- **Finding {self.number}.** {self.claim} Reproduced: **{self.verdict}**"
                + (f" ({parts})" if parts else "") + f". {self.evidence}")


def _not_run(number: int | str, claim: str, sweep: str, missing: str = "") -> Verdict:
    why = f"sweep `{sweep}` has no completed {missing} runs" if missing else f"no completed runs of sweep `{sweep}`"
    return Verdict(number, claim, f"not run (make sweep SWEEP={sweep})", why + ".")


def _acc(runs: pd.DataFrame, label: str, eval_set: str, part: str = "final",
         metric: str = "accuracy") -> dict[object, float]:
    """{seed: accuracy (%)} of the runs of `label` at the initial or final evaluation (code: `metric` pass@1)."""
    return arm_values(runs, NO_STEPS, label, Metric.parse(f"{part}/eval/{eval_set}/{metric}"), by="label")


# the runs frame's columns suffice for final metrics and training time
NO_STEPS = pd.DataFrame(columns=["run_dir", "step", "is_train"])
LENGTH = Metric.parse("response/length_mean")
TIME = Metric.parse("time_elapsed")


def _stat(values: dict[object, float] | list[float], digits: int = 1, se: float = math.nan) -> str:
    vals = list(values.values()) if isinstance(values, dict) else list(values)
    se_txt = f", SE {se:.{digits}f}" if math.isfinite(se) else ""
    return f"{fmt(vals, digits=digits)} (n={len(vals)}{se_txt})"


def _acc_stat(runs: pd.DataFrame, label: str, eval_set: str, metric: str = "accuracy") -> str:
    se = mean_se(runs[runs["label"] == label], eval_set) if metric == "accuracy" else math.nan
    return _stat(_acc(runs, label, eval_set, metric=metric), se=se)


def _measure(eval_set: str, metric: str) -> str:
    """How a finding names its accuracy measure."""
    if metric == "accuracy":
        return f"Final greedy {eval_set} accuracy (%)"
    return f"Final {eval_set} {metric} (%, unbiased, from each problem's samples)"


# the code findings (sweep `code`, the embedded pycode task or MBPP+): pass@1 instead of greedy accuracy
CODE_METRIC = "pass@1"


def _std(values: dict[object, float] | list[float]) -> float:
    vals = list(values.values()) if isinstance(values, dict) else list(values)
    return float(pd.Series(vals, dtype=float).std()) if len(vals) > 1 else 0.0


def _steps_of(runs: pd.DataFrame, label: str) -> str:
    """Training steps the runs of `label` completed: '60', or '59 ± 1' where they differ (time budget)."""
    return fmt(runs.loc[runs["label"] == label, "steps_done"], digits=0).removesuffix(" ± 0")


def _inconclusive(parts: dict[str, str]) -> str:
    open_parts = [name for name, v in parts.items() if v == "inconclusive"]
    if not open_parts:
        return ""
    return (f" Inconclusive ({', '.join(open_parts)}): not decided at 95% confidence (the interval includes the "
            f"threshold, or the collapse counts are not significant); {RESOLVE}.")


# ---------------------------------------------------------------------------------------------------- finding 1
def finding1(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "sft_vs_rl", metric: str = "accuracy",
             number: int | str = 1) -> Verdict:
    """DASH's final greedy accuracy (code: pass@1) above SFT-M's and above SFT-H's (one part each)."""
    claim = ("On-policy RL (DASH) ends above SFT on model traces (SFT-M) and on human-style solutions (SFT-H)."
             if metric == "accuracy" else
             f"On code, on-policy RL (DASH) ends above SFT on human-style solutions (SFT-H) in {metric}.")
    runs, _ = sweep_frames(runs, steps, sweep)
    sfts = [lb for lb in ("sft_m", "sft_h") if not runs.empty and lb in set(runs["label"])]
    if runs.empty or "dash" not in set(runs["label"]) or not sfts:
        return _not_run(number, claim, sweep, "" if runs.empty else "DASH and SFT")
    s = eval_sets(runs[runs["label"] == "dash"])[0]
    dash = _acc(runs, "dash", s, metric=metric)
    base = _mean(_acc(runs, "base" if "base" in set(runs["label"]) else "dash", s, "initial", metric).values())
    comparisons = {f"DASH > {display(lb)}": compare(dash, _acc(runs, lb, s, metric=metric)) for lb in sfts}
    parts = {name: c.verdict() for name, c in comparisons.items()}
    evidence = (f"{_measure(s, metric)}: DASH {_acc_stat(runs, 'dash', s, metric)}, "
                + ", ".join(f"{display(lb)} {_acc_stat(runs, lb, s, metric)}" for lb in sfts)
                + f"; base model {base:.1f}"
                + (f"; the SFT-M teacher itself {_acc_stat(runs, 'teacher', s, metric)}"
                   if "teacher" in set(runs["label"]) and "sft_m" in sfts else "") + ". "
                + "; ".join(f"DASH − {display(lb)}: {comparisons[f'DASH > {display(lb)}'].text('points')}"
                            for lb in sfts) + ".")
    traces = runs.loc[runs["label"] == "sft_m", "algorithm.traces_path"] if "algorithm.traces_path" in runs else []
    for lb in (lb for lb in sfts if parts[f"DASH > {display(lb)}"] == "no"):
        source = f" by imitating correct traces from `{traces.iloc[0]}`" if lb == "sft_m" and len(traces) else ""
        evidence += (f" Why not: {display(lb)} gains {_mean(_acc(runs, lb, s, metric=metric).values()) - base:+.1f} "
                     "points over "
                     f"the base in {_steps_of(runs, lb)} steps{source}, DASH {_mean(dash.values()) - base:+.1f} in "
                     f"{_steps_of(runs, 'dash')} steps of RL on its own samples.")
    return Verdict(number, claim, combine(parts), evidence + _inconclusive(parts), parts, comparisons,
                   dict.fromkeys(parts, "points"))


# ---------------------------------------------------------------------------------------------------- finding 2
def collapsed(runs: pd.DataFrame, label: str, eval_set: str) -> tuple[int, int]:
    """(runs of `label` whose final greedy accuracy ends more than COLLAPSE_POINTS below their start, runs)."""
    sel = runs[runs["label"] == label]
    drop = 100 * (sel[f"initial/eval/{eval_set}/accuracy"] - sel[f"final/eval/{eval_set}/accuracy"])
    return int((drop > COLLAPSE_POINTS).sum()), int(drop.notna().sum())


def _any_of(verdicts: list[str]) -> str:
    """'Some variant does X': yes when one credibly does, no when every one credibly does not, else inconclusive."""
    return "yes" if "yes" in verdicts else "no" if verdicts and set(verdicts) == {"no"} else "inconclusive"


def finding2(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "pg_vs_ppo") -> Verdict:
    """PPO Multi / Mini vs DASH at equal wall-clock. Accuracy: some PPO variant ends above DASH (interval of
    PPO - DASH above 0). Stability: some PPO variant collapses in more of its runs than DASH (one-sided Fisher exact
    test at 5%)."""
    claim = ("PPO-style off-policy updates (Multi: 3 passes per batch, Mini: 32 mini-batch steps) can raise accuracy "
             "over plain policy gradient (DASH) at equal training time, but are less stable.")
    runs, _ = sweep_frames(runs, steps, sweep)
    ppos = [lb for lb in ("ppo_multi", "ppo_mini") if not runs.empty and lb in set(runs["label"])]
    if runs.empty or "dash" not in set(runs["label"]) or not ppos:
        return _not_run(2, claim, sweep, "" if runs.empty else "DASH and PPO")
    s = eval_sets(runs)[0]
    dash = _acc(runs, "dash", s)
    comparisons = {f"{display(lb)} > DASH": compare(_acc(runs, lb, s), dash) for lb in ppos}
    falls = {lb: collapsed(runs, lb, s) for lb in ("dash", *ppos)}
    tests = {lb: rate_verdict(*falls[lb], *falls["dash"]) for lb in ppos}
    parts = {"accuracy": _any_of([c.verdict() for c in comparisons.values()]),
             "stability": _any_of([v for v, _ in tests.values()])}
    evidence = (f"Final greedy {s} accuracy (%): " + ", ".join(f"{display(lb)} {_acc_stat(runs, lb, s)}"
                                                              for lb in ("dash", *ppos)) + ". "
                + "; ".join(f"{display(lb)} − DASH: {comparisons[f'{display(lb)} > DASH'].text('points')}"
                            for lb in ppos)
                + f". Stability, collapsed runs (final more than {COLLAPSE_POINTS:g} points below their start): "
                + ", ".join(f"{display(lb)} {k}/{n}" for lb, (k, n) in falls.items())
                + " (one-sided Fisher exact p that PPO collapses more often: "
                + ", ".join(f"{display(lb)} {p:.2f}" for lb, (_, p) in tests.items()) + ").")
    if parts["accuracy"] == "no":
        budget = runs["time_budget_s"].dropna() if "time_budget_s" in runs else pd.Series(dtype=float)
        within = f" within the same {budget.max():g} s budget" if len(budget) else ""
        evidence += (" Why not (accuracy): " + ", ".join(
            f"{display(lb)} ran {_steps_of(runs, lb)} steps" + (f" and collapsed in {falls[lb][0]}/{falls[lb][1]}"
                                                                  if falls[lb][0] else "") for lb in ppos)
            + f" against DASH's {_steps_of(runs, 'dash')}{within}.")
    if not any(falls[lb][0] for lb in ppos):
        evidence += (" No PPO variant collapsed; spread over seeds: "
                     + ", ".join(f"{display(lb)} ± {_std(_acc(runs, lb, s)):.1f}" for lb in ("dash", *ppos)) + ".")
    return Verdict(2, claim, combine(parts), evidence + _inconclusive(parts), parts, comparisons,
                   dict.fromkeys(comparisons, "points"))


# ---------------------------------------------------------------------------------------------------- finding 3
def finding3(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "kl") -> Verdict:
    """No KL vs KL. Length: training responses (mean over the last steps) shorter without KL (interval of
    No-KL - KL below 0). Accuracy: final greedy accuracy higher without KL (interval above 0)."""
    claim = "Without the KL penalty, responses are shorter and accuracy is higher."
    runs, steps = sweep_frames(runs, steps, sweep)
    if runs.empty or not {"on", "off"} <= set(runs["kl"]):
        return _not_run(3, claim, sweep, "" if runs.empty else "KL and No-KL")
    s = eval_sets(runs)[0]
    end, start = last_steps_mean(steps, "response/length_mean"), last_steps_mean(steps, "response/length_mean", True)
    window = auto_window(int(runs["steps_done"].max()))
    last = f"last {window} steps" if window > 1 else "last step"
    side = {kl: runs[runs["kl"] == kl] for kl in ("on", "off")}
    accuracy = Metric.parse(f"final/eval/{s}/accuracy")
    acc = {kl: arm_values(runs, steps, kl, accuracy, by="kl") for kl in side}
    length = {kl: arm_values(runs, steps, kl, LENGTH, by="kl") for kl in side}
    comparisons = {"shorter": contrast(runs, steps, "off", "on", LENGTH, by="kl"),
                   "higher accuracy": contrast(runs, steps, "off", "on", accuracy, by="kl")}
    parts = {"shorter": comparisons["shorter"].verdict(greater=False),
             "higher accuracy": comparisons["higher accuracy"].verdict()}
    se = {kl: mean_se(sel, s) for kl, sel in side.items()}
    eval_len = f"final/eval/{s}/length_mean"
    evidence = (f"KL -> No-KL: training response length (mean of the {last}) {_stat(length['on'])} -> "
                f"{_stat(length['off'])} tokens, No-KL − KL {comparisons['shorter'].text('tokens')}")
    if eval_len in runs:
        evidence += (f"; held-out greedy length {fmt(side['on'][eval_len])} -> {fmt(side['off'][eval_len])} tokens")
    evidence += (f"; final greedy {s} accuracy (%) {_stat(acc['on'], se=se['on'])} -> "
                 f"{_stat(acc['off'], se=se['off'])}, No-KL − KL {comparisons['higher accuracy'].text('points')}.")
    if parts["shorter"] == "no":
        drift = {kl: _mean(end.reindex(sel["run_dir"])) - _mean(start.reindex(sel["run_dir"]))
                 for kl, sel in side.items()}
        kl_end = _mean(last_steps_mean(steps, "kl/mean").reindex(side["on"]["run_dir"]))
        kl_txt = f"; the KL runs' mean KL to the reference at the end is {kl_end:.3g}" if math.isfinite(kl_end) else ""
        flat = abs(drift["on"]) < 0.05 * _mean(start)
        evidence += (f" Why not (length): responses changed by {drift['on']:+.1f} ({KL_DISPLAY['on']}) and "
                     f"{drift['off']:+.1f} ({KL_DISPLAY['off']}) tokens from the first to the {last}"
                     + (" (under 5%), so with KL there was no growth for the penalty to hold back" if flat else "")
                     + f"{kl_txt}.")
    if parts["higher accuracy"] == "no":
        evidence += (f" Why not (accuracy): No-KL ends {comparisons['higher accuracy'].diff:+.1f} points from KL, "
                     "with the whole interval below zero.")
    return Verdict(3, claim, combine(parts), evidence + _inconclusive(parts), parts, comparisons,
                   {"shorter": "tokens", "higher accuracy": "points"})


# ---------------------------------------------------------------------------------------------------- finding 4
def finding4(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "algorithms", metric: str = "accuracy",
             number: int | str = 4) -> Verdict:
    """DASH vs GRPO. Time: less total training time (interval of GRPO - DASH above 0). Accuracy: DASH no more than
    EQUAL_POINTS below GRPO (interval of DASH - GRPO above -EQUAL_POINTS). Also the time each takes to first reach
    GRPO's final mean accuracy."""
    claim = ("DASH reaches GRPO's accuracy in less training time." if metric == "accuracy" else
             f"On code, DASH reaches GRPO's {metric} in less training time.")
    runs, steps = sweep_frames(runs, steps, sweep)
    if runs.empty or not {"dash", "grpo"} <= set(runs["label"]):
        return _not_run(number, claim, sweep, "" if runs.empty else "GRPO and DASH")
    s = eval_sets(runs)[0]
    times = {lb: arm_values(runs, steps, lb, TIME, by="label") for lb in ("grpo", "dash")}
    acc = {lb: _acc(runs, lb, s, metric=metric) for lb in ("grpo", "dash")}
    div, unit = time_unit(max([*times["grpo"].values(), *times["dash"].values()]))
    comparisons = {"faster": compare({k: v / div for k, v in times["grpo"].items()},
                                     {k: v / div for k, v in times["dash"].items()}),
                   "equal accuracy": compare(acc["dash"], acc["grpo"])}
    parts = {"faster": comparisons["faster"].verdict(),
             "equal accuracy": comparisons["equal accuracy"].verdict(threshold=-EQUAL_POINTS)}
    ratio = _mean(times["grpo"].values()) / _mean(times["dash"].values())
    speed = f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"
    target = _mean(acc["grpo"].values()) / 100
    reach_txt = ""
    if metric == "accuracy":  # the periodic evaluations track greedy accuracy
        reach = first_reach(eval_points(runs[runs["label"].isin(["grpo", "dash"])], steps, s), target)
        reach_txt = " Time to first reach GRPO's final mean ({:.1f}%): {}.".format(100 * target, ", ".join(
            f"{display(lb)} {_reached(reach[reach['label'] == lb], div, unit)}" for lb in ("dash", "grpo")))
    evidence = (f"Training time ({unit}): GRPO {_stat([t / div for t in times['grpo'].values()])}, DASH "
                f"{_stat([t / div for t in times['dash'].values()])}: DASH {speed}, GRPO − DASH "
                f"{comparisons['faster'].text(unit, digits=2)}. {_measure(s, metric)}: "
                f"GRPO {_acc_stat(runs, 'grpo', s, metric)}, DASH {_acc_stat(runs, 'dash', s, metric)}, DASH − GRPO "
                f"{comparisons['equal accuracy'].text('points')} (equal when the whole interval lies above "
                f"−{EQUAL_POINTS:g} points).{reach_txt}")
    if parts["faster"] == "no":
        evidence += (f" Why not (time): DASH's median step takes "
                     f"{_median_step(steps, 'dash'):.2f} s against GRPO's {_median_step(steps, 'grpo'):.2f} s.")
    if parts["equal accuracy"] == "no":
        evidence += (f" Why not (accuracy): DASH ends {comparisons['equal accuracy'].diff:+.1f} points from GRPO, "
                     f"credibly more than {EQUAL_POINTS:g} points below.")
    return Verdict(number, claim, combine(parts), evidence + _inconclusive(parts), parts, comparisons,
                   {"faster": unit, "equal accuracy": "points"}, {"equal accuracy": -EQUAL_POINTS})


def _reached(reach: pd.DataFrame, div: float, unit: str) -> str:
    """'12.3 ± 1.0 s (reached 2/3)' from rows of `first_reach`; 'never (reached 0/3)'."""
    hit = reach[reach["reached"]]
    return (f"{fmt(hit['time_s'] / div)} {unit}" if len(hit) else "never") + f" (reached {len(hit)}/{len(reach)})"


def _median_step(steps: pd.DataFrame, label: str) -> float:
    sel = steps[steps["is_train"] & (steps["label"] == label)]
    return float(sel["time/step"].median()) if "time/step" in sel else math.nan


# ------------------------------------------------------------------------------------------------------ section
FINDING_FUNCS = (finding1, finding2, finding3, finding4)
# the paper's code rows (Tables 2 and 4), from the `code` sweep
CODE_SWEEP = "code"


def verdicts(runs: pd.DataFrame, steps: pd.DataFrame) -> list[Verdict]:
    """Every finding's verdict, in the paper's order; then the code rows of findings 1 and 4 where the `code`
    sweep ran."""
    found = [func(runs, steps) for func in FINDING_FUNCS]
    if not runs.empty and CODE_SWEEP in set(runs["sweep"]):
        found += [finding1(runs, steps, CODE_SWEEP, CODE_METRIC, "1 (code)"),
                  finding4(runs, steps, CODE_SWEEP, CODE_METRIC, "4 (code)")]
    return found


def interval_frame(found: list[Verdict]) -> pd.DataFrame:
    """One row per compared pair of a verdict: finding, part (what is compared), the difference and its interval,
    the threshold, the unit and the part's verdict (what `figures.fig_verdicts` plots)."""
    rows = [{"finding": v.number, "part": name, "diff": c.diff, "low": c.low, "high": c.high,
             "threshold": v.thresholds.get(name, 0.0), "unit": v.units.get(name, ""),
             "verdict": v.parts.get(name) or c.verdict(v.thresholds.get(name, 0.0)), "paired": c.paired, "n": c.n_a}
            for v in found for name, c in v.comparisons.items()]
    return pd.DataFrame(rows)


def findings_section(runs: pd.DataFrame, steps: pd.DataFrame, found: list[Verdict] | None = None,
                     figure: str = "") -> str:
    """The "## Findings" Markdown section: one bullet per finding of the paper, in the paper's order (and the
    figure of every verdict's interval, when given)."""
    found = verdicts(runs, steps) if found is None else found
    models = ", ".join(sorted(map(str, runs["model"].dropna().unique()))) if not runs.empty else "–"
    tasks = ", ".join(sorted(map(str, runs["task"].dropna().unique()))) if not runs.empty else "–"
    intro = (f"The paper's four findings against our runs (model `{models}`, task `{tasks}`): does each hold in the "
             "same direction? Verdicts are computed from the runs by `analysis.findings`. Each part of a claim is a "
             "difference between two methods with its 95% bootstrap confidence interval over seeds (paired by seed "
             "where both ran the same seeds; `analysis.stats`): **yes** when the whole interval lies on the claim's "
             "side, **no** when it lies on the other side, **inconclusive** when it straddles the threshold; a "
             "finding is yes / no / inconclusive when all its parts agree, else partly. P(improve): the probability "
             "that a run of the first method beats a run of the second. Accuracy: final held-out greedy accuracy; "
             "mean ± std over seeds, n = runs, SE = the mean binomial standard error of one run's accuracy on its "
             "held-out problems (the same problems for every method). Details in each finding's section below.")
    blocks = ["## Findings", intro, "\n".join(v.markdown() for v in found)]
    if figure:
        blocks.append(f"![every verdict's difference and 95% interval]({figure}.png) ([PDF]({figure}.pdf))")
    return "\n\n".join(blocks)


def _eval_seconds(runs: pd.DataFrame, steps: pd.DataFrame) -> float:
    """Seconds of held-out evaluation (`time/eval`: at the start, periodic, at the end) of the given runs, each run
    counted once however many findings' views hold it (steps hold each run's rows once, matched by run_dir)."""
    if runs.empty or "time/eval" not in steps:
        return 0.0
    return float(steps.loc[steps["run_dir"].isin(set(runs["run_dir"])), "time/eval"].sum())


def results_section(runs: pd.DataFrame, steps: pd.DataFrame, found: list[Verdict] | None = None,
                    paragraphs: bool = True,
                    command: str = " --readme README.md --readme docs/reproducing.md") -> str:
    """What a reproduction found, as the README shows it (`make_figures --readme`): which runs (dates, seeds, model
    directories), one row per compared pair with its difference, interval and verdict, then (`paragraphs`) each
    finding's bullet."""
    found = verdicts(runs, steps) if found is None else found
    runs = runs.drop_duplicates("run_dir")  # a run of an all-findings sweep is in several findings' views
    when = pd.to_datetime(runs["finished_at"].dropna(), unit="s") if "finished_at" in runs else pd.Series()
    dates = (f"{when.min():%Y-%m-%d %H:%M} to {when.max():%Y-%m-%d %H:%M} UTC" if len(when) else "?")
    seeds = sorted(int(x) for x in runs["seed"].dropna().unique()) if "seed" in runs else []
    arms = runs.groupby(["label", "kl"], dropna=False).size()
    counts = ", ".join(f"{display(lb)}{' with KL' if kl == 'on' else ''} {n}" for (lb, kl), n in arms.items())
    hours = runs["time_elapsed"].sum() / 3600 if "time_elapsed" in runs else math.nan
    eval_hours = _eval_seconds(runs, steps) / 3600
    provenance = (f"Generated by `python -m analysis.make_figures{command}` from {len(runs)} runs finished "
                  f"{dates}; seeds {', '.join(map(str, seeds)) or '?'} per configuration; models "
                  f"{joined(runs, 'model_dir')} (model directories); task {joined(runs, 'task')}. Runs per arm: "
                  f"{counts}; compute time of all runs together {hours + eval_hours:.2f} h: training {hours:.2f} h, "
                  f"held-out evaluations {eval_hours:.2f} h (model loading and engine start-up excluded). "
                  "Differences are the first method minus the second, with a 95% bootstrap CI over seeds (paired by "
                  "seed).")
    frame = interval_frame(found)
    rows = ["| finding | compared | difference [95% CI] | unit | threshold | verdict |", "|---|---|---|---|---|---|"]
    for r in frame.itertuples():
        ci = interval_text(r.diff, r.low, r.high, 2)
        rows.append(f"| {r.finding} | {r.part} | {ci} | {r.unit} | {r.threshold:g} | {r.verdict} |")
    parts = [provenance, "\n".join(rows)] + (["\n".join(v.markdown() for v in found)] if paragraphs else [])
    return "\n\n".join(parts)
