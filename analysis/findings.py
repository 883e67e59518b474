"""The paper's four findings checked against our runs: the claim, a verdict, the numbers, and why when not.

`findings_section(runs, steps)` is the "Findings" section that make_figures writes near the top of
figures/README.md. One function per finding returns a `Verdict`, computed from the frames of
`analysis.runs.load_runs` (nothing about the results is written in here): "yes" when every part of the claim
holds in our runs, "partly" when some part does, "no" when none does, "not run" when the sweep (or a method it
needs) has no completed runs. Accuracy is the final held-out greedy accuracy (%) on the sweep's first evaluation
set; values are mean ± std over seeds, n = runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.figures import KL_DISPLAY, auto_window, display, eval_points, first_reach, time_unit
from analysis.runs import sweep_frames
from analysis.tables import _mean, eval_sets, fmt

# a run "collapses" when it ends this far below its own start (about one binomial standard error of the accuracy on
# 100 problems), finding 2's stability measure
COLLAPSE_POINTS = 5.0
# finding 4: DASH's accuracy "equals" GRPO's when it is at most max(this, GRPO's std over seeds) points lower
EQUAL_POINTS = 2.0


@dataclass(frozen=True)
class Verdict:
    """One finding: the paper's claim, our verdict (yes / partly / no / not run) and the evidence."""

    number: int
    claim: str
    verdict: str
    evidence: str

    def markdown(self) -> str:
        return f"- **Finding {self.number}.** {self.claim} Reproduced: **{self.verdict}**. {self.evidence}"


def _verdict(parts: list[bool]) -> str:
    return "yes" if all(parts) else "partly" if any(parts) else "no"


def _not_run(number: int, claim: str, sweep: str, missing: str = "") -> Verdict:
    why = f"sweep `{sweep}` has no completed {missing} runs" if missing else f"no completed runs of sweep `{sweep}`"
    return Verdict(number, claim, f"not run (make sweep SWEEP={sweep})", why + ".")


def _acc(runs: pd.DataFrame, label: str, eval_set: str, part: str = "final") -> list[float]:
    """Accuracy (%) per run of `label` at the initial or final evaluation."""
    col = f"{part}/eval/{eval_set}/accuracy"
    sel = runs[runs["label"] == label]
    return [100 * float(v) for v in sel[col].dropna()] if col in sel else []


def _stat(values: list[float], digits: int = 1) -> str:
    return f"{fmt(values, digits=digits)} (n={len(values)})"


def _std(values: list[float]) -> float:
    return float(pd.Series(values, dtype=float).std()) if len(values) > 1 else 0.0


def _steps_of(runs: pd.DataFrame, label: str) -> str:
    """Training steps the runs of `label` completed: '60', or '59 ± 1' where they differ (time budget)."""
    return fmt(runs.loc[runs["label"] == label, "steps_done"], digits=0).removesuffix(" ± 0")


# ---------------------------------------------------------------------------------------------------- finding 1
def finding1(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "sft_vs_rl") -> Verdict:
    """DASH's final greedy accuracy above SFT-M's and above SFT-H's."""
    claim = "On-policy RL (DASH) ends above SFT on model traces (SFT-M) and on human-style solutions (SFT-H)."
    runs, _ = sweep_frames(runs, steps, sweep)
    sfts = [lb for lb in ("sft_m", "sft_h") if not runs.empty and lb in set(runs["label"])]
    if runs.empty or "dash" not in set(runs["label"]) or not sfts:
        return _not_run(1, claim, sweep, "" if runs.empty else "DASH and SFT")
    s = eval_sets(runs[runs["label"] == "dash"])[0]
    dash = _acc(runs, "dash", s)
    base = _mean(_acc(runs, "base" if "base" in set(runs["label"]) else "dash", s, "initial"))
    wins = {lb: _mean(dash) > _mean(_acc(runs, lb, s)) for lb in sfts}
    evidence = (f"Final greedy {s} accuracy (%): DASH {_stat(dash)}, "
                + ", ".join(f"{display(lb)} {_stat(_acc(runs, lb, s))}" for lb in sfts)
                + f"; base model {base:.1f}.")
    traces = runs.loc[runs["label"] == "sft_m", "algorithm.traces_path"] if "algorithm.traces_path" in runs else []
    for lb in (lb for lb, won in wins.items() if not won):
        source = f" by imitating correct traces from `{traces.iloc[0]}`" if lb == "sft_m" and len(traces) else ""
        evidence += (f" Why not: {display(lb)} gains {_mean(_acc(runs, lb, s)) - base:+.1f} points over the base in "
                     f"{_steps_of(runs, lb)} steps{source}, DASH {_mean(dash) - base:+.1f} in "
                     f"{_steps_of(runs, 'dash')} steps of RL on its own samples.")
    return Verdict(1, claim, _verdict(list(wins.values())), evidence)


# ---------------------------------------------------------------------------------------------------- finding 2
def collapsed(runs: pd.DataFrame, label: str, eval_set: str) -> tuple[int, int]:
    """(runs of `label` whose final greedy accuracy ends more than COLLAPSE_POINTS below their start, runs)."""
    sel = runs[runs["label"] == label]
    drop = 100 * (sel[f"initial/eval/{eval_set}/accuracy"] - sel[f"final/eval/{eval_set}/accuracy"])
    return int((drop > COLLAPSE_POINTS).sum()), int(drop.notna().sum())


def finding2(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "pg_vs_ppo") -> Verdict:
    """PPO Multi / Mini vs DASH at equal wall-clock: some PPO variant ends above DASH (accuracy) and some PPO
    variant collapses in a larger fraction of its runs than DASH (stability)."""
    claim = ("PPO-style off-policy updates (Multi: 3 passes per batch, Mini: 32 mini-batch steps) can raise accuracy "
             "over plain policy gradient (DASH) at equal training time, but are less stable.")
    runs, _ = sweep_frames(runs, steps, sweep)
    ppos = [lb for lb in ("ppo_multi", "ppo_mini") if not runs.empty and lb in set(runs["label"])]
    if runs.empty or "dash" not in set(runs["label"]) or not ppos:
        return _not_run(2, claim, sweep, "" if runs.empty else "DASH and PPO")
    s = eval_sets(runs)[0]
    dash = _mean(_acc(runs, "dash", s))
    higher = {lb: _mean(_acc(runs, lb, s)) > dash for lb in ppos}
    falls = {lb: collapsed(runs, lb, s) for lb in ("dash", *ppos)}
    rate = {lb: k / n if n else math.nan for lb, (k, n) in falls.items()}
    less_stable = [lb for lb in ppos if rate[lb] > rate["dash"]]
    evidence = (f"Final greedy {s} accuracy (%): " + ", ".join(f"{display(lb)} {_stat(_acc(runs, lb, s))}"
                                                              for lb in ("dash", *ppos))
                + f". Stability, collapsed runs (final more than {COLLAPSE_POINTS:g} points below their start): "
                + ", ".join(f"{display(lb)} {k}/{n}" for lb, (k, n) in falls.items()) + ".")
    if not any(higher.values()):
        budget = runs["time_budget_s"].dropna() if "time_budget_s" in runs else pd.Series(dtype=float)
        within = f" within the same {budget.max():g} s budget" if len(budget) else ""
        evidence += (" Why not (accuracy): " + ", ".join(
            f"{display(lb)} ran {_steps_of(runs, lb)} steps" + (f" and collapsed in {falls[lb][0]}/{falls[lb][1]}"
                                                                  if falls[lb][0] else "") for lb in ppos)
            + f" against DASH's {_steps_of(runs, 'dash')}{within}.")
    if not less_stable:
        evidence += (" Why not (stability): no PPO variant collapsed more often than DASH; spread over seeds: "
                     + ", ".join(f"{display(lb)} ± {_std(_acc(runs, lb, s)):.1f}" for lb in ("dash", *ppos)) + ".")
    return Verdict(2, claim, _verdict([any(higher.values()), bool(less_stable)]), evidence)


# ---------------------------------------------------------------------------------------------------- finding 3
def last_steps_mean(steps: pd.DataFrame, metric: str, first: bool = False) -> pd.Series:
    """Per run_dir: mean of a training metric over its last (or first) auto_window(n) training steps."""
    rows = steps[steps["is_train"] & steps[metric].notna()] if metric in steps else steps.iloc[0:0]
    rows = rows.sort_values(["run_dir", "step"])
    pick = (lambda s: s.head(auto_window(len(s)))) if first else (lambda s: s.tail(auto_window(len(s))))
    return rows.groupby("run_dir")[metric].apply(lambda s: pick(s).mean())


def finding3(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "kl") -> Verdict:
    """No KL vs KL: shorter training responses (mean over the last steps) and higher final greedy accuracy."""
    claim = "Without the KL penalty, responses are shorter and accuracy is higher."
    runs, steps = sweep_frames(runs, steps, sweep)
    if runs.empty or not {"on", "off"} <= set(runs["kl"]):
        return _not_run(3, claim, sweep, "" if runs.empty else "KL and No-KL")
    s = eval_sets(runs)[0]
    end, start = last_steps_mean(steps, "response/length_mean"), last_steps_mean(steps, "response/length_mean", True)
    window = auto_window(int(runs["steps_done"].max()))
    last = f"last {window} steps" if window > 1 else "last step"
    acc = {kl: [100 * float(v) for v in runs.loc[runs["kl"] == kl, f"final/eval/{s}/accuracy"].dropna()]
           for kl in ("on", "off")}
    length = {kl: list(end.reindex(runs.loc[runs["kl"] == kl, "run_dir"]).dropna()) for kl in ("on", "off")}
    shorter, higher = _mean(length["off"]) < _mean(length["on"]), _mean(acc["off"]) > _mean(acc["on"])
    eval_len = f"final/eval/{s}/length_mean"
    evidence = (f"KL -> No-KL: training response length (mean of the {last}) {_stat(length['on'])} -> "
                f"{_stat(length['off'])} tokens")
    if eval_len in runs:
        evidence += (f", held-out greedy length {fmt(runs.loc[runs['kl'] == 'on', eval_len])} -> "
                     f"{fmt(runs.loc[runs['kl'] == 'off', eval_len])} tokens")
    evidence += f"; final greedy {s} accuracy (%) {_stat(acc['on'])} -> {_stat(acc['off'])}."
    if not shorter:
        drift = {kl: _mean(end.reindex(runs.loc[runs["kl"] == kl, "run_dir"]))
                 - _mean(start.reindex(runs.loc[runs["kl"] == kl, "run_dir"])) for kl in ("on", "off")}
        kl_end = _mean(last_steps_mean(steps, "kl/mean").reindex(runs.loc[runs["kl"] == "on", "run_dir"]))
        kl_txt = f"; the KL runs' mean KL to the reference at the end is {kl_end:.3g}" if math.isfinite(kl_end) else ""
        flat = abs(drift["on"]) < 0.05 * _mean(start)
        evidence += (f" Why not (length): responses changed by {drift['on']:+.1f} ({KL_DISPLAY['on']}) and "
                     f"{drift['off']:+.1f} ({KL_DISPLAY['off']}) tokens from the first to the {last}"
                     + (" (under 5%), so with KL there was no growth for the penalty to hold back" if flat else "")
                     + f"{kl_txt}.")
    if not higher:
        diff, spread = _mean(acc["off"]) - _mean(acc["on"]), max(_std(acc["on"]), _std(acc["off"]))
        evidence += (f" Why not (accuracy): No-KL ends {diff:+.1f} points from KL, "
                     + ("within" if abs(diff) <= spread else "beyond") + f" the spread over seeds (± {spread:.1f}).")
    return Verdict(3, claim, _verdict([shorter, higher]), evidence)


# ---------------------------------------------------------------------------------------------------- finding 4
def finding4(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str = "algorithms") -> Verdict:
    """DASH vs GRPO: less total training time, final greedy accuracy at least GRPO's minus max(EQUAL_POINTS,
    GRPO's std); also the time each takes to first reach GRPO's final mean accuracy."""
    claim = "DASH reaches GRPO's accuracy in less training time."
    runs, steps = sweep_frames(runs, steps, sweep)
    if runs.empty or not {"dash", "grpo"} <= set(runs["label"]):
        return _not_run(4, claim, sweep, "" if runs.empty else "GRPO and DASH")
    s = eval_sets(runs)[0]
    times = {lb: list(runs.loc[runs["label"] == lb, "time_elapsed"].dropna()) for lb in ("grpo", "dash")}
    acc = {lb: _acc(runs, lb, s) for lb in ("grpo", "dash")}
    ratio = _mean(times["grpo"]) / _mean(times["dash"])
    tol = max(EQUAL_POINTS, _std(acc["grpo"]))
    faster, equal = ratio > 1, _mean(acc["dash"]) >= _mean(acc["grpo"]) - tol
    div, unit = time_unit(max(times["grpo"] + times["dash"]))
    speed = f"{ratio:.2f}x faster" if faster else f"{1 / ratio:.2f}x slower"
    target = _mean(acc["grpo"]) / 100
    reach = first_reach(eval_points(runs[runs["label"].isin(["grpo", "dash"])], steps, s), target)
    reach_txt = ", ".join(f"{display(lb)} {_reached(reach[reach['label'] == lb], div, unit)}"
                          for lb in ("dash", "grpo"))
    evidence = (f"Training time ({unit}): GRPO {_stat([t / div for t in times['grpo']])}, DASH "
                f"{_stat([t / div for t in times['dash']])}: DASH {speed}. Final greedy {s} accuracy (%): "
                f"GRPO {_stat(acc['grpo'])}, DASH {_stat(acc['dash'])} (equal when DASH is at most {tol:.1f} points "
                f"lower: max({EQUAL_POINTS:g}, GRPO's std)). Time to first reach GRPO's final mean "
                f"({100 * target:.1f}%): {reach_txt}.")
    if not faster:
        evidence += (f" Why not (time): DASH's median step takes "
                     f"{_median_step(steps, 'dash'):.2f} s against GRPO's {_median_step(steps, 'grpo'):.2f} s.")
    if not equal:
        evidence += (f" Why not (accuracy): DASH ends {_mean(acc['dash']) - _mean(acc['grpo']):+.1f} points from "
                     "GRPO, more than the tolerance.")
    return Verdict(4, claim, _verdict([faster, equal]), evidence)


def _reached(reach: pd.DataFrame, div: float, unit: str) -> str:
    """'12.3 ± 1.0 s (reached 2/3)' from rows of `first_reach`; 'never (reached 0/3)'."""
    hit = reach[reach["reached"]]
    return (f"{fmt(hit['time_s'] / div)} {unit}" if len(hit) else "never") + f" (reached {len(hit)}/{len(reach)})"


def _median_step(steps: pd.DataFrame, label: str) -> float:
    sel = steps[steps["is_train"] & (steps["label"] == label)]
    return float(sel["time/step"].median()) if "time/step" in sel else math.nan


# ------------------------------------------------------------------------------------------------------ section
FINDING_FUNCS = (finding1, finding2, finding3, finding4)


def findings_section(runs: pd.DataFrame, steps: pd.DataFrame) -> str:
    """The "## Findings" Markdown section: one bullet per finding of the paper, in the paper's order."""
    verdicts = [func(runs, steps) for func in FINDING_FUNCS]
    models = ", ".join(sorted(map(str, runs["model"].dropna().unique()))) if not runs.empty else "–"
    tasks = ", ".join(sorted(map(str, runs["task"].dropna().unique()))) if not runs.empty else "–"
    intro = (f"The paper's four findings against our runs (model `{models}`, task `{tasks}`): does each hold in the "
             "same direction? Verdicts are computed from the runs by `analysis.findings` (yes: every part of the "
             "claim holds; partly: some part; no: none). Accuracy: final held-out greedy accuracy; mean ± std over "
             "seeds, n = runs. Details in each finding's section below.")
    return "\n\n".join(["## Findings", intro, "\n".join(v.markdown() for v in verdicts)])
