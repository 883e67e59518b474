"""A generic ablation report: every arm of a sweep against a baseline arm, on any metric.

    python -m analysis.ablate --runs multirun/zoo [--baseline dash] [--metric final/eval/arith/sampled_accuracy]
    python -m analysis.ablate --wandb-project entity/dash_exp --sweep zoo

Arms are found, not named: the config keys whose values differ between the runs (the seed, paths and logging
aside), reduced to those that are not implied by others (`algorithm.label` first, so `algorithm=rloo` reads
`rloo`, not every component rloo sets). The baseline is `--baseline` (an arm's name) or the sweep's first arm (its
lowest Hydra job number). Per metric each arm gets its mean over seeds and, against the baseline, the difference
with its 95% bootstrap interval (paired by seed where both ran the same seeds), the probability of improvement and a
verdict: better / worse (the interval excludes 0 in that direction; higher / lower for metrics without a better
direction) or inconclusive. P(better) is the probability that a run of the arm beats a run of the baseline. The
statistics are `analysis.stats.compare`, the ones the paper's Findings use (`analysis.findings` reads its numbers
through `arm_values` and `contrast` below).

Metrics: a column of the runs frame (`final/eval/<set>/accuracy`, `time_elapsed`, any `final/...` or config
key), or a training metric of metrics.jsonl (`response/length_mean`, `kl/mean`, ...: its mean over each run's last
steps). Default: the final greedy accuracy of the first evaluation set, training time, and response length.
Accuracies are in points (x100). A metric's better direction is `:higher` or `:lower` after its name, else guessed
(accuracy and pass@k higher, time lower, anything else neither).

Writes <out>/ablation.md (the table), ablation.csv and ablation.png (one panel per metric: each arm's difference
from the baseline with its interval); out defaults to <runs>/ablation.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.figures import auto_window
from analysis.runs import ALIASES, latest_sweeps, load_runs, load_wandb
from analysis.stats import CONFIDENCE, Comparison, compare
from analysis.tables import by_seed

# config keys that never define an arm: the seed (the pairing key), paths, logging, threads and caches
NOT_ARMS = ("seed", "run_dir", "sweep_name", "threads", "resume")
NOT_ARM_PREFIXES = ("logger.", "hydra.", "model.cache_dir", "task.cache_dir", "rollout.kv_cache_gb")
# runs-frame columns that are not config keys: by prefix, and by name
DERIVED_PREFIXES = ("initial/", "final/")
DERIVED = ("time_elapsed", "steps_done", "resumed", "model_dir", "eval_sets", "sweep_dir", "finished_at", "arm",
           *ALIASES)
VERDICT_WORDS = {"higher": ("better", "worse"), "lower": ("worse", "better"), "": ("higher", "lower")}


@dataclass(frozen=True)
class Metric:
    """A metric of the report: its column, how it reads, the scale shown and which way is better."""

    name: str
    # 'higher', 'lower' or '' (no better direction: the verdict says higher / lower)
    better: str
    scale: float = 1.0
    unit: str = ""

    @classmethod
    def parse(cls, spec: str) -> Metric:
        name, _, better = spec.partition(":")
        if better not in ("", "higher", "lower"):
            raise ValueError(f"--metric {spec}: expected NAME, NAME:higher or NAME:lower")
        accuracy = "accuracy" in name or "pass@" in name
        if not better:
            better = "higher" if accuracy else "lower" if "time" in name else ""
        return cls(name, better, 100.0 if accuracy else 1.0, "points" if accuracy else
                   "s" if "time" in name else "")


def _text(values: pd.Series) -> pd.Series:
    """Config values as text, a missing one (null in config.yaml, NaN in the frame) as 'null'."""
    return values.map(lambda v: "null" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def arm_keys(runs: pd.DataFrame) -> list[str]:
    """The config keys that tell the arms apart: those that vary across the runs, minus the ones the others
    imply (checked in order, `algorithm.label` first)."""
    config = [c for c in runs.columns if c not in DERIVED and c not in NOT_ARMS
              and not c.startswith((*DERIVED_PREFIXES, *NOT_ARM_PREFIXES))]
    text = {c: _text(runs[c]) for c in config}
    varying = [c for c in config if text[c].nunique() > 1]
    varying.sort(key=lambda c: (c != "algorithm.label", c != "kl.name", text[c].nunique(), c))
    kept: list[str] = []
    for key in varying:
        if kept and (text[key].groupby([text[k] for k in kept]).nunique() <= 1).all():
            continue  # implied by the keys kept so far
        kept.append(key)
    return kept


def _short(key: str) -> str:
    reverse = {v: k for k, v in ALIASES.items()}
    return reverse.get(key, key)


def arm_names(runs: pd.DataFrame, keys: list[str] | None = None) -> pd.Series:
    """Each run's arm: `rloo`, `kl=on`, `dash, filter_threshold=0.0` ... (the label alone where it is a key)."""
    keys = arm_keys(runs) if keys is None else keys
    if not keys:
        return pd.Series("all", index=runs.index)
    parts = [_text(runs[k]) if k == "algorithm.label" else f"{_short(k)}=" + _text(runs[k]) for k in keys]
    return pd.concat(parts, axis=1).agg(", ".join, axis=1)


def _job_number(run_dir: str) -> float:
    head = Path(str(run_dir)).name.split("_", 1)[0]
    return float(head) if head.isdigit() else math.inf


def arm_order(runs: pd.DataFrame) -> list[str]:
    """Arms in the sweep's order: by the lowest Hydra job number among their runs (then by name)."""
    first = runs.assign(_job=runs["run_dir"].map(_job_number)).groupby("arm")["_job"].min()
    return sorted(first.index, key=lambda a: (first[a], a))


def arm_values(runs: pd.DataFrame, steps: pd.DataFrame, arm: object, metric: Metric,
               by: str = "arm") -> dict[object, float]:
    """{seed: value} of `metric` over the runs whose column `by` is `arm` (scaled: accuracies in points; the last
    run of a seed wins; missing and non-finite values are left out)."""
    sel = runs[runs[by] == arm]
    if metric.name not in runs:  # a training metric: its last steps, over this arm's runs only
        mine = steps[steps["run_dir"].isin(sel["run_dir"])] if "run_dir" in steps else steps
        sel = sel.assign(**{metric.name: sel["run_dir"].map(last_steps_mean(mine, metric.name))})
    return by_seed(sel, metric.name, metric.scale)


def last_steps_mean(steps: pd.DataFrame, metric: str, first: bool = False) -> pd.Series:
    """Per run_dir: the mean of a training metric over its last (or first) auto_window(n) training steps."""
    if metric not in steps:
        return pd.Series(dtype=float)
    rows = steps[steps["is_train"] & steps[metric].notna()].sort_values(["run_dir", "step"])
    pick = (lambda s: s.head(auto_window(len(s)))) if first else (lambda s: s.tail(auto_window(len(s))))
    return rows.groupby("run_dir")[metric].apply(lambda s: pick(s).mean())


def contrast(runs: pd.DataFrame, steps: pd.DataFrame, arm: object, baseline: object, metric: Metric,
             by: str = "arm") -> Comparison:
    """arm - baseline on `metric`, paired by seed where both ran the same seeds."""
    return compare(arm_values(runs, steps, arm, metric, by), arm_values(runs, steps, baseline, metric, by))


def verdict(comparison: Comparison, metric: Metric) -> str:
    """better / worse (higher / lower without a better direction) where the interval excludes 0, else
    inconclusive."""
    up, down = VERDICT_WORDS[metric.better]
    return {"yes": up, "no": down}.get(comparison.verdict(0.0, greater=True), "inconclusive")


def default_metrics(runs: pd.DataFrame) -> list[Metric]:
    sets = next((s for s in runs.get("eval_sets", []) if s), ())
    accuracy = [f"final/eval/{sets[0]}/accuracy"] if sets else []
    return [Metric.parse(m) for m in (*accuracy, "time_elapsed", "response/length_mean")]


def ablation(runs: pd.DataFrame, steps: pd.DataFrame, metrics: list[Metric] | None = None,
             baseline: str | None = None) -> pd.DataFrame:
    """One row per (metric, arm): n, mean, difference from the baseline [95% CI], P(improve), verdict."""
    runs = runs.assign(arm=arm_names(runs))
    arms = arm_order(runs)
    baseline = baseline or arms[0]
    if baseline not in arms:
        raise ValueError(f"--baseline {baseline!r}: not an arm of these runs; expected one of {', '.join(arms)}")
    rows = []
    for metric in metrics or default_metrics(runs):
        base = arm_values(runs, steps, baseline, metric)
        for arm in arms:
            values = arm_values(runs, steps, arm, metric)
            mean = sum(values.values()) / len(values) if values else math.nan
            row = {"metric": metric.name, "unit": metric.unit, "better": metric.better, "arm": arm, "n": len(values),
                   "mean": mean}
            if arm == baseline:
                row.update(diff=math.nan, low=math.nan, high=math.nan, paired=True, p_improve=math.nan,
                           verdict="baseline")
            else:
                c = compare(values, base)
                # P(a run of the arm beats one of the baseline): higher, or lower where lower is better
                p = 1 - c.p_improve if metric.better == "lower" else c.p_improve
                row.update(diff=c.diff, low=c.low, high=c.high, paired=c.paired, p_improve=p,
                           verdict=verdict(c, metric))
            rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["baseline"] = baseline
    return table


def markdown(table: pd.DataFrame) -> str:
    """The report as markdown: one table per metric."""
    out = [f"Baseline: **{table.attrs.get('baseline', '')}**. Differences are arm − baseline with the "
           f"{100 * CONFIDENCE:g}% bootstrap interval over seeds (paired by seed where both ran the same seeds)."]
    for name, part in table.groupby("metric", sort=False):
        unit, better = part["unit"].iloc[0], part["better"].iloc[0]
        direction = f"{better} is better" if better else "no better direction"
        out += ["", f"**{name}**" + (f" ({unit}; {direction})" if unit else f" ({direction})"), "",
                f"| arm | n | mean | − baseline [95% CI] | P({'better' if better else 'higher'}) | verdict |",
                "|---|---|---|---|---|---|"]
        for r in part.itertuples():
            ci = f"{r.low:+.2f}, {r.high:+.2f}" if math.isfinite(r.low) else "no interval"
            diff = "" if r.verdict == "baseline" else f"{r.diff:+.2f} [{ci}]"
            p = "" if r.verdict == "baseline" else f"{r.p_improve:.2f}"
            out.append(f"| {r.arm} | {r.n} | {r.mean:.2f} | {diff} | {p} | {r.verdict} |")
    return "\n".join(out)


def figure(table: pd.DataFrame, path: Path) -> None:
    """One panel per metric: each arm's difference from the baseline with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(table.groupby("metric", sort=False))
    # the arm names label the first panel's rows only (long where several keys were swept)
    names = max((len(str(a)) for a in table["arm"]), default=10)
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts) + 0.075 * names,
                                                     1.3 + 0.4 * table["arm"].nunique()),
                             squeeze=False, sharey=True, layout="constrained")
    colors = {"better": "#2a9d3f", "worse": "#c0392b", "higher": "#2a6f9d", "lower": "#9d6f2a"}
    arms = [a for a in dict.fromkeys(table["arm"]) if a != table.attrs.get("baseline")][::-1]
    for i, (ax, (name, part)) in enumerate(zip(axes[0], parts, strict=True)):
        rows = part.set_index("arm")
        for y, arm in enumerate(arms):
            r = rows.loc[arm]
            c = colors.get(r["verdict"], "#777777")
            if math.isfinite(r["low"]):
                ax.plot([r["low"], r["high"]], [y, y], color=c, lw=2)
            ax.plot([r["diff"]], [y], "o", color=c)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(arms)), arms)
        ax.tick_params(labelleft=i == 0)
        unit = part["unit"].iloc[0]
        ax.set_title(f"{name}" + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_xlabel("arm − baseline")
    fig.suptitle(f"baseline: {table.attrs.get('baseline', '')}; 95% bootstrap intervals over seeds", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None, help="a sweep's directory (searched recursively for run dirs)")
    parser.add_argument("--wandb-project", default=None, help="read the runs from this W&B project instead")
    parser.add_argument("--sweep", default=None, help="only the runs of this sweep (sweep_name)")
    parser.add_argument("--latest", action="store_true", help="only the newest multirun directory of each sweep")
    parser.add_argument("--baseline", default=None, help="the arm every other arm is compared with "
                        "(default: the sweep's first)")
    parser.add_argument("--metric", action="append", default=None,
                        help="NAME[:higher|:lower], repeatable (default: final accuracy, time, response length)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <runs>/ablation)")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.wandb_project):
        parser.error("give one of --runs DIR or --wandb-project ENTITY/PROJECT")
    runs, steps = load_runs(args.runs) if args.runs else load_wandb(args.wandb_project)
    if args.latest:
        runs, steps = latest_sweeps(runs, steps)
    if args.sweep:
        runs = runs[runs["sweep"] == args.sweep].reset_index(drop=True)
    if runs.empty:
        parser.error(f"no completed runs in {args.runs or args.wandb_project}")
    try:
        metrics = [Metric.parse(m) for m in args.metric] if args.metric else None
        table = ablation(runs, steps, metrics, args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or (Path(args.runs) / "ablation" if args.runs else Path("ablation"))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table)
    (out / "ablation.md").write_text(text + "\n")
    table.to_csv(out / "ablation.csv", index=False)
    figure(table, out / "ablation.png")
    print(text)
    print(f"\nwritten: {out / 'ablation.md'}, ablation.csv, ablation.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
