"""The paper's figures from our runs: one function per figure.

Every function takes the frames of `analysis.runs.load_runs` (all runs; it selects its sweep), an output
directory, and writes `<name>.png` and `<name>.pdf` there. It returns the plotted data as a long DataFrame
(one row per plotted point) and raises `NoDataError` when its sweep has nothing to plot. Figures are closed
after saving, so this works headless (Agg); notebooks show the saved PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.runs import sweep_frames

# one name and one color per algorithm label (and per KL setting), in every figure and table
DISPLAY = {"base": "Base", "sft_h": "SFT-H", "sft_m": "SFT-M", "grpo": "GRPO", "no_gf": "No-GF", "dash": "DASH",
           "ppo_multi": "PPO Multi", "ppo_mini": "PPO Mini"}
COLORS = {"base": "#7f7f7f", "sft_h": "#9467bd", "sft_m": "#8c564b", "grpo": "#d62728", "no_gf": "#ff7f0e",
          "dash": "#1f77b4", "ppo_multi": "#2ca02c", "ppo_mini": "#e377c2"}
KL_DISPLAY = {"on": "KL", "off": "No-KL"}
KL_COLORS = {"on": "#bcbd22", "off": "#1f77b4"}
# dashed/dotted series are drawn after solid ones, so curves that coincide (same samples) both stay visible
LINESTYLES = {"no_gf": "--", "ppo_multi": "--", "ppo_mini": ":", "on": "--"}
FIGURES = ["fig_sft_vs_rl", "fig1_right", "fig3", "fig_time_to_accuracy", "fig4", "fig5", "fig6", "fig_batch_sizes"]


class NoDataError(ValueError):
    """The runs given have nothing this figure or table can show."""


def display(label: str) -> str:
    return DISPLAY.get(str(label), str(label))


def color(label: str) -> str:
    return COLORS.get(str(label), "#333333")


def time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, unit) so that `seconds` reads well: s below 5 min, min below 5 h, else h."""
    if not np.isfinite(seconds) or seconds < 300:
        return 1.0, "s"
    return (60.0, "min") if seconds < 5 * 3600 else (3600.0, "h")


def save(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """<out_dir>/<name>.png (150 dpi) and .pdf; closes the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _select(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str | None, labels: list[str] | None = None,
            what: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    if sweep is not None:
        runs, steps = sweep_frames(runs, steps, sweep)
    if labels is not None and not runs.empty:
        runs = runs[runs["label"].isin(labels)]
        steps = steps[steps["run_dir"].isin(runs["run_dir"])]
    if runs.empty:
        raise NoDataError(f"{what}: no completed runs of sweep {sweep!r}" + (f" with labels {labels}" if labels
                                                                             else ""))
    return runs.reset_index(drop=True), steps.reset_index(drop=True)


def _order(values, preferred: list[str]) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


def _train(steps: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in steps:
        return steps.iloc[0:0]
    return steps[steps["is_train"] & steps[metric].notna()]


def auto_window(n_steps: int) -> int:
    """Rolling-mean window for noisy per-step curves: about 1/12 of the run, at least 1."""
    return max(1, int(n_steps) // 12)


def _seed_band(steps: pd.DataFrame, group: str, x: str, y: str, window: int | None = None) -> pd.DataFrame:
    """Per (group, step): mean of x, mean/std/n over runs of y (rolling mean over `window` steps per run)."""
    rows = _train(steps, y)
    if rows.empty:
        return pd.DataFrame(columns=[group, "step", x, "mean", "std", "n"])
    rows = rows.sort_values(["run_dir", "step"])
    w = window or auto_window(rows.groupby("run_dir")["step"].count().max())
    rows = rows.assign(_y=rows.groupby("run_dir")[y].transform(lambda s: s.rolling(w, min_periods=1).mean()))
    agg = rows.groupby([group, "step"]).agg(**{x: (x, "mean"), "mean": ("_y", "mean"), "std": ("_y", "std"),
                                               "n": ("_y", "count")}).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    agg.attrs["window"] = w
    return agg


def _plot_band(ax, data: pd.DataFrame, x: str, label: str, col: str, name: str) -> None:
    ax.plot(data[x], data["mean"], color=col, label=name, marker="o" if len(data) < 8 else None, ms=3,
            ls=LINESTYLES.get(str(label), "-"), lw=1.8)
    if (data["n"] > 1).any():
        ax.fill_between(data[x], data["mean"] - data["std"], data["mean"] + data["std"], color=col, alpha=0.2,
                        linewidth=0)


def _seeds_note(runs: pd.DataFrame, by: str = "label") -> str:
    n = runs.groupby(by)["run_dir"].count()
    return f"{n.min()} seed{'s' if n.min() > 1 else ''}" if n.min() == n.max() else f"{n.min()}-{n.max()} seeds"


def _setup(runs: pd.DataFrame) -> str:
    models = ", ".join(sorted(map(str, runs["model"].dropna().unique())))
    tasks = ", ".join(sorted(map(str, runs["task"].dropna().unique())))
    return f"{models} on {tasks}"


# --------------------------------------------------------------------------------------------- Table 1 / finding 1
def fig_sft_vs_rl(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "sft_vs_rl"
                  ) -> pd.DataFrame:
    """Finding 1 (Table 1 as bars): final greedy and sampled held-out accuracy per method, mean ± std over
    seeds, one panel per evaluation set. Base is the untrained model (its runs' initial evaluation)."""
    runs, _ = _select(runs, steps, sweep, what="fig_sft_vs_rl")
    labels = _order(runs["label"], ["base", "sft_h", "sft_m", "dash"])
    sets = list(dict.fromkeys(s for t in runs["eval_sets"] for s in t))
    rows = []
    for label in labels:
        sel = runs[runs["label"] == label]
        part = "initial" if label == "base" else "final"
        for s in sets:
            for kind, key in (("greedy", "accuracy"), ("sampled", "sampled_accuracy")):
                vals = 100 * sel.get(f"{part}/eval/{s}/{key}", pd.Series(dtype=float)).dropna()
                if len(vals):
                    rows.append({"label": label, "eval_set": s, "kind": kind, "mean": vals.mean(),
                                 "std": vals.std() if len(vals) > 1 else 0.0, "n": len(vals)})
    data = pd.DataFrame(rows)
    if data.empty:
        raise NoDataError("fig_sft_vs_rl: no final accuracy in the runs")
    fig, axes = plt.subplots(1, len(sets), figsize=(1.6 + 1.5 * len(labels) * len(sets), 3.8), squeeze=False,
                             layout="constrained")
    width = 0.38
    for ax, s in zip(axes[0], sets, strict=True):
        d = data[data["eval_set"] == s]
        for i, label in enumerate(labels):
            for j, kind in enumerate(("greedy", "sampled")):
                r = d[(d["label"] == label) & (d["kind"] == kind)]
                if r.empty:
                    continue
                mean, std = r["mean"].iloc[0], r["std"].iloc[0]
                ax.bar(i + (j - 0.5) * width, mean, width, yerr=[[min(std, mean)], [std]], capsize=3,
                       color=color(label), alpha=1.0 if kind == "greedy" else 0.45, edgecolor="black",
                       linewidth=0.5)
        ax.set_xticks(range(len(labels)), [display(lb) for lb in labels])
        ax.set_ylabel(f"held-out accuracy on {s} (%)")
        ax.set_title(f"{s}: final accuracy")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="#999999", edgecolor="black", alpha=a) for a in (1.0, 0.45)]
    axes[0][-1].legend(handles, ["greedy", "sampled"], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.suptitle(f"Finding 1: RL vs SFT ({_setup(runs)}, mean ± std over {_seeds_note(runs)})", fontsize=10)
    save(fig, out_dir, "fig_sft_vs_rl")
    return data


# ------------------------------------------------------------------------------------------- Fig 1 right / Table 3
FIG1_PAPER_HOURS = {"grpo": (32.4, 6.5), "dash": (4.2, 2.4)}  # Qwen2.5-0.5B: (inference h, update h)


def fig1_right(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "algorithms"
               ) -> pd.DataFrame:
    """Fig 1 (right): total inference and update time per run (sum over steps), stacked, mean over seeds;
    GRPO, No-GF, DASH; the paper's hours beside ours."""
    runs, steps = _select(runs, steps, sweep, ["grpo", "no_gf", "dash"], "fig1_right")
    rows = []
    for run_dir, g in _train(steps, "time/update").groupby("run_dir"):
        rows.append({"run_dir": run_dir, "label": g["label"].iloc[0], "inference": g["time/inference"].sum(),
                     "update": g["time/update"].sum()})
    per_run = pd.DataFrame(rows)
    if per_run.empty:
        raise NoDataError("fig1_right: no training steps")
    data = per_run.groupby("label").agg(inference_s=("inference", "mean"), inference_std=("inference", "std"),
                                        update_s=("update", "mean"), update_std=("update", "std"),
                                        n=("run_dir", "count")).reset_index().fillna(0.0)
    labels = _order(data["label"], ["grpo", "no_gf", "dash"])
    data = data.set_index("label").loc[labels].reset_index()
    div, unit = time_unit(float((data["inference_s"] + data["update_s"]).max()))
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(8.5, 3.8), layout="constrained",
                                  gridspec_kw={"width_ratios": [len(labels), 2]})
    x = np.arange(len(labels))
    inf, upd = data["inference_s"] / div, data["update_s"] / div
    ax.bar(x, inf, 0.6, color=[color(lb) for lb in labels], edgecolor="black", linewidth=0.5)
    ax.bar(x, upd, 0.6, bottom=inf, color=[color(lb) for lb in labels], alpha=0.45, edgecolor="black",
           linewidth=0.5, hatch="//")
    for xi, a, b in zip(x, inf, upd, strict=True):
        ax.text(xi, a + b, f"{a + b:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [display(lb) for lb in labels])
    ax.set_ylabel(f"total time per run ({unit})")
    ax.set_title(f"ours: {_setup(runs)}\nmean over {_seeds_note(runs)}", fontsize=9)
    ax.margins(y=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="#999999", edgecolor="black"),
               plt.Rectangle((0, 0), 1, 1, facecolor="#999999", alpha=0.45, hatch="//", edgecolor="black")]
    ax.legend(handles, ["inference (sampling)", "update (backprop)"], fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    plabels = list(FIG1_PAPER_HOURS)
    pinf = [FIG1_PAPER_HOURS[lb][0] for lb in plabels]
    pupd = [FIG1_PAPER_HOURS[lb][1] for lb in plabels]
    xp = np.arange(len(plabels))
    axp.bar(xp, pinf, 0.6, color=[color(lb) for lb in plabels], edgecolor="black", linewidth=0.5)
    axp.bar(xp, pupd, 0.6, bottom=pinf, color=[color(lb) for lb in plabels], alpha=0.45, hatch="//",
            edgecolor="black", linewidth=0.5)
    for xi, a, b in zip(xp, pinf, pupd, strict=True):
        axp.text(xi, a + b, f"{a + b:.1f}", ha="center", va="bottom", fontsize=8)
    axp.set_xticks(xp, [display(lb) for lb in plabels])
    axp.set_ylabel("total training time (h)")
    axp.set_title("paper: Qwen2.5-0.5B, MATH", fontsize=9)
    axp.margins(y=0.15)
    axp.grid(axis="y", alpha=0.3)
    fig.suptitle("Fig 1 (right): inference vs update time, GRPO vs DASH", fontsize=10)
    save(fig, out_dir, "fig1_right")
    return data


# ------------------------------------------------------------------------------------------------------------ Fig 3
def fig3(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "algorithms",
         window: int | None = None) -> pd.DataFrame:
    """Fig 3: mean |advantage|, update time per step and training reward vs epoch, DASH vs No-GF; mean ± std
    over seeds (rolling mean over `window` steps per run, auto when None)."""
    runs, steps = _select(runs, steps, sweep, ["no_gf", "dash"], "fig3")
    panels = [("adv/abs_mean", "mean |advantage|"), ("time/update", "update time per step (s)"),
              ("reward/mean", "training reward (mean)")]
    labels = _order(runs["label"], ["dash", "no_gf"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    out, w = [], 1
    for ax, (metric, ylabel) in zip(axes, panels, strict=True):
        band = _seed_band(steps, "label", "epoch", metric, window)
        w = band.attrs.get("window", w)
        for label in labels:
            d = band[band["label"] == label]
            if not d.empty:
                _plot_band(ax, d, "epoch", label, color(label), display(label))
                out.append(d.assign(metric=metric))
        ax.set_xlabel("epoch (passes over the training prompts)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    smooth = f", rolling mean over {w} steps" if w > 1 else ""
    fig.suptitle(f"Fig 3: gradient filtering, DASH vs No-GF ({_setup(runs)}; mean ± std over "
                 f"{_seeds_note(runs)}{smooth})", fontsize=10)
    if not out:
        plt.close(fig)
        raise NoDataError("fig3: no training steps")
    save(fig, out_dir, "fig3")
    return pd.concat(out, ignore_index=True)


# ------------------------------------------------------------------------------------ time to accuracy / Table 3
EVAL_KINDS = {"accuracy": "greedy", "sampled_accuracy": "sampled"}


def eval_points(runs: pd.DataFrame, steps: pd.DataFrame, eval_set: str, key: str = "accuracy") -> pd.DataFrame:
    """One row per held-out evaluation of each run (`eval/<eval_set>/<key>`): run_dir, label, seed, step, time_s
    (Table 3's clock: `time/elapsed` of that step's training row, i.e. the sum of step times so far, evaluation
    excluded; 0 before training), samples (step x prompts_per_step x group_size), acc, final (the run's last
    evaluation)."""
    metric = f"eval/{eval_set}/{key}"
    columns = ["run_dir", "label", "seed", "step", "time_s", "samples", "acc", "final"]
    if metric not in steps or runs.empty:
        return pd.DataFrame(columns=columns)
    evals = steps[steps[metric].notna() & steps["run_dir"].isin(runs["run_dir"])]
    evals = evals.drop_duplicates(["run_dir", "step"], keep="last").sort_values(["run_dir", "step"], kind="stable")
    clock = _train(steps, "time/elapsed").drop_duplicates(["run_dir", "step"], keep="last")
    clock = clock.set_index(["run_dir", "step"])["time/elapsed"]
    per_run = runs.set_index("run_dir")
    out = pd.DataFrame({"run_dir": evals["run_dir"], "label": evals["label"], "seed": evals["seed"],
                        "step": evals["step"].astype(int), "acc": evals[metric].astype(float)})
    out["time_s"] = clock.reindex(pd.MultiIndex.from_frame(out[["run_dir", "step"]])).to_numpy()
    out["final"] = ~out["run_dir"].duplicated(keep="last")
    out.loc[out["step"] == 0, "time_s"] = 0.0
    out["time_s"] = out["time_s"].fillna(out["run_dir"].map(per_run["time_elapsed"]).where(out["final"]))
    out["samples"] = out["step"] * out["run_dir"].map(per_run["prompts_per_step"] * per_run["group_size"])
    return out[columns].reset_index(drop=True)


def start_final(points: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per run_dir: the accuracy of its first and of its last evaluation."""
    acc = points.sort_values(["run_dir", "step"]).groupby("run_dir", sort=False)["acc"]
    return acc.first(), acc.last()


def gain_targets(points: pd.DataFrame, fraction: float) -> pd.Series:
    """Per run_dir: start + fraction x (final - start) of its own first and last evaluation; NaN where the
    final accuracy is not above the start (no gain to reach)."""
    start, final = start_final(points)
    return (start + fraction * (final - start)).where(final > start)


def default_targets(points: pd.DataFrame, fractions: tuple[float, ...] = (0.5, 1.0)) -> list[float]:
    """Absolute accuracies from the base (mean first evaluation over runs) to the lowest final mean of the labels
    that end above it, at `fractions` of the way, rounded down to whole points; none when no label ends above."""
    if points.empty:
        return []
    base = start_final(points)[0].mean()
    finals = points[points["final"]].groupby("label")["acc"].mean()
    if not (finals > base).any():
        return []
    lowest = finals[finals > base].min()
    targets = [math.floor(100 * (base + f * (lowest - base)) + 1e-9) / 100 for f in fractions]
    return sorted({t for t in targets if t > base})


def first_reach(points: pd.DataFrame, target: float | pd.Series) -> pd.DataFrame:
    """Per run: the first evaluation at or above `target` (one accuracy, or one per run_dir): run_dir, label,
    target, reached, step, time_s, samples (NaN where never reached)."""
    rows = []
    for run_dir, g in points.sort_values(["run_dir", "step"]).groupby("run_dir", sort=False):
        t = float(target.get(run_dir, math.nan)) if isinstance(target, pd.Series) else float(target)
        hit = g[g["acc"] >= t - 1e-9] if math.isfinite(t) else g.iloc[0:0]
        first = hit.iloc[0] if len(hit) else pd.Series({"step": math.nan, "time_s": math.nan, "samples": math.nan})
        rows.append({"run_dir": run_dir, "label": g["label"].iloc[0], "target": t, "reached": bool(len(hit)),
                     "step": first["step"], "time_s": first["time_s"], "samples": first["samples"]})
    return pd.DataFrame(rows, columns=["run_dir", "label", "target", "reached", "step", "time_s", "samples"])


def _eval_band(points: pd.DataFrame) -> pd.DataFrame:
    """Per (label, evaluation): mean ± std over runs of time and accuracy; the runs' last evaluations make one
    point even where runs stopped at different steps (time budget)."""
    key = points["step"].astype(float).where(~points["final"].astype(bool), math.inf)
    agg = points.assign(_key=key).groupby(["label", "_key"]).agg(
        step=("step", "mean"), time_s=("time_s", "mean"), time_std=("time_s", "std"), samples=("samples", "mean"),
        mean=("acc", "mean"), std=("acc", "std"), n=("acc", "count")).reset_index().drop(columns="_key")
    return agg.fillna({"time_std": 0.0, "std": 0.0})


def fig_time_to_accuracy(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path,
                         sweep: str | None = "algorithms") -> pd.DataFrame:
    """Finding 4 (beside Table 3): held-out greedy (and sampled) accuracy vs training wall-clock per method, one
    point per periodic evaluation: mean time and accuracy over seeds, error bars ± std of both; dotted lines at
    the absolute targets of the time-to-accuracy table."""
    runs, steps = _select(runs, steps, sweep, what="fig_time_to_accuracy")
    sets = list(dict.fromkeys(s for t in runs["eval_sets"] for s in t))
    panels = [(s, key, eval_points(runs, steps, s, key)) for s in sets for key in EVAL_KINDS]
    panels = [(s, key, points) for s, key, points in panels if not points.empty]
    if not panels:
        raise NoDataError("fig_time_to_accuracy: no held-out evaluations in the runs")
    data = pd.concat([_eval_band(points).assign(eval_set=s, kind=EVAL_KINDS[key]) for s, key, points in panels],
                     ignore_index=True)
    div, unit = time_unit(float(data["time_s"].max()))
    fig, axes = plt.subplots(1, len(panels), figsize=(0.6 + 4.8 * len(panels), 3.9), squeeze=False,
                             layout="constrained")
    drawn: list[float] = []
    for ax, (s, key, points) in zip(axes[0], panels, strict=True):
        d = data[(data["eval_set"] == s) & (data["kind"] == EVAL_KINDS[key])]
        for label in _order(d["label"], ["grpo", "no_gf", "dash", "ppo_multi", "ppo_mini"]):
            dl = d[d["label"] == label]
            ax.errorbar(dl["time_s"] / div, 100 * dl["mean"], xerr=dl["time_std"] / div, yerr=100 * dl["std"],
                        color=color(label), ls=LINESTYLES.get(str(label), "-"), marker="o", ms=4, capsize=2,
                        lw=1.6, label=display(label))
        for target in default_targets(points) if key == "accuracy" else []:
            ax.axhline(100 * target, color="black", ls=":", lw=0.8)
            drawn.append(target)
        ax.set_xlabel(f"training wall-clock ({unit}, evaluation excluded)")
        ax.set_ylabel(f"held-out {EVAL_KINDS[key]} accuracy on {s} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    dotted = "; dotted: the table's absolute targets" if drawn else ""
    fig.suptitle(f"Time to accuracy: held-out accuracy vs training time ({_setup(runs)}; mean ± std over "
                 f"{_seeds_note(runs)}{dotted})", fontsize=10)
    save(fig, out_dir, "fig_time_to_accuracy")
    return data


# ------------------------------------------------------------------------------------------------------------ Fig 4
def _runtime_band(steps: pd.DataFrame, metric: str, window: int | None, points: int = 60) -> pd.DataFrame:
    """Per label: runs interpolated onto one time grid (from the latest first step to the earliest last step),
    then mean ± std over runs."""
    rows = _train(steps, metric).sort_values(["run_dir", "step"])
    out = []
    for label, g in rows.groupby("label"):
        curves = []
        for _, r in g.groupby("run_dir"):
            w = window or auto_window(len(r))
            curves.append((r["time/elapsed"].to_numpy(float), r[metric].rolling(w, min_periods=1).mean().to_numpy()))
        lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
        grid = np.linspace(lo, hi, points) if hi > lo else np.array([hi])
        ys = np.array([np.interp(grid, t, y) for t, y in curves])
        out.append(pd.DataFrame({"label": label, "time_s": grid, "mean": ys.mean(0),
                                 "std": ys.std(0, ddof=1) if len(ys) > 1 else 0.0, "n": len(ys)}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def fig4(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "pg_vs_ppo",
         window: int | None = None) -> pd.DataFrame:
    """Fig 4: training reward vs training wall-clock, DASH vs PPO Multi vs PPO Mini (same time budget);
    each run interpolated onto a common time grid, mean ± std over seeds."""
    runs, steps = _select(runs, steps, sweep, ["dash", "ppo_multi", "ppo_mini"], "fig4")
    data = _runtime_band(steps, "reward/mean", window)
    if data.empty:
        raise NoDataError("fig4: no training steps")
    div, unit = time_unit(float(data["time_s"].max()))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label in _order(data["label"], ["dash", "ppo_multi", "ppo_mini"]):
        d = data[data["label"] == label].assign(t=lambda f: f["time_s"] / div)
        _plot_band(ax, d, "t", label, color(label), display(label))
    budget = runs["time_budget_s"].dropna() if "time_budget_s" in runs else pd.Series(dtype=float)
    if len(budget) and budget.max() / div <= data["time_s"].max() / div * 1.05:
        ax.axvline(budget.max() / div, color="black", ls=":", lw=1, label="time budget")
    ax.set_xlabel(f"training wall-clock ({unit}, evaluation excluded)")
    ax.set_ylabel("training reward (mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Fig 4: policy gradient vs PPO at equal runtime\n{_setup(runs)}, mean ± std over "
                 f"{_seeds_note(runs)}", fontsize=10)
    save(fig, out_dir, "fig4")
    return data


# ------------------------------------------------------------------------------------------------------------ Fig 5
def _kl_label(runs: pd.DataFrame, kl: str) -> str:
    beta = runs.loc[runs["kl"] == kl, "kl.beta"].dropna() if "kl.beta" in runs else pd.Series(dtype=float)
    return f"KL (β={beta.iloc[0]:g})" if kl == "on" and len(beta) else KL_DISPLAY.get(str(kl), str(kl))


def fig5(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "kl") -> pd.DataFrame:
    """Fig 5: pass@k vs k at the final evaluation, KL vs No-KL, mean ± std over seeds; one panel per set."""
    runs, _ = _select(runs, steps, sweep, what="fig5")
    rows = []
    for col in runs.columns:
        parts = col.split("/")
        if len(parts) == 4 and parts[0] == "final" and parts[3].startswith("pass@"):
            for kl, g in runs.groupby("kl"):
                vals = 100 * g[col].dropna()
                if len(vals):
                    rows.append({"eval_set": parts[2], "k": int(parts[3][5:]), "kl": kl, "mean": vals.mean(),
                                 "std": vals.std() if len(vals) > 1 else 0.0, "n": len(vals)})
    data = pd.DataFrame(rows)
    if data.empty:
        raise NoDataError("fig5: no final pass@k in the runs (eval_samples > 1 is needed)")
    data = data.sort_values(["eval_set", "kl", "k"]).reset_index(drop=True)
    sets = list(dict.fromkeys(data["eval_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 3.9), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], sets, strict=True):
        d = data[data["eval_set"] == s]
        for i, kl in enumerate(_order(d["kl"], ["on", "off"])):
            dk = d[d["kl"] == kl]
            ax.errorbar(dk["k"] * (1 + 0.03 * (2 * i - 1)), dk["mean"], yerr=dk["std"], marker="o", ms=4, capsize=3,
                        color=KL_COLORS.get(kl), ls=LINESTYLES.get(str(kl), "-"), label=_kl_label(runs, kl))
        ks = sorted(d["k"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel(f"pass@k on {s} (%)")
        ax.set_title(f"{s} (final evaluation)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig 5: pass@k with and without the KL penalty\n{_setup(runs)}, mean ± std over "
                 f"{_seeds_note(runs, 'kl')}", fontsize=10)
    save(fig, out_dir, "fig5")
    return data


# ------------------------------------------------------------------------------------------------------------ Fig 6
def fig6(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "kl",
         window: int | None = None) -> pd.DataFrame:
    """Fig 6: training reward and mean response length vs epoch, KL vs No-KL, mean ± std over seeds."""
    runs, steps = _select(runs, steps, sweep, what="fig6")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.7), layout="constrained")
    out, w = [], 1
    for ax, (metric, ylabel) in zip(axes, [("reward/mean", "training reward (mean)"),
                                           ("response/length_mean", "response length (tokens, mean)")],
                                    strict=True):
        band = _seed_band(steps, "kl", "epoch", metric, window)
        w = band.attrs.get("window", w)
        for kl in _order(band["kl"], ["off", "on"]):
            d = band[band["kl"] == kl]
            _plot_band(ax, d, "epoch", kl, KL_COLORS.get(kl, "#333333"), _kl_label(runs, kl))
            out.append(d.assign(metric=metric))
        ax.set_xlabel("epoch (passes over the training prompts)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not out:
        plt.close(fig)
        raise NoDataError("fig6: no training steps")
    smooth = f", rolling mean over {w} steps" if w > 1 else ""
    fig.suptitle(f"Fig 6: KL penalty vs none ({_setup(runs)}; mean ± std over {_seeds_note(runs, 'kl')}{smooth})",
                 fontsize=10)
    save(fig, out_dir, "fig6")
    return pd.concat(out, ignore_index=True)


# ------------------------------------------------------------------------------------------------- batch sizes
def batch_size_medians(runs: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Per run: medians over training steps, the first step excluded (warm-up), of generation tokens/s,
    backprop tokens/s and peak memory."""
    rows = []
    train = steps[steps["is_train"]].sort_values(["run_dir", "step"])
    for _, run in runs.iterrows():
        g = train[train["run_dir"] == run["run_dir"]]
        g = g.iloc[1:] if len(g) > 1 else g
        row = {"run_dir": run["run_dir"], "inference_batch": run["inference_batch"],
               "train_microbatch": run["train_microbatch"], "steps": len(g)}
        for key, name in (("throughput/gen_tokens_per_s", "gen_tokens_per_s"),
                          ("throughput/train_tokens_per_s", "train_tokens_per_s"), ("mem/peak_mb", "peak_mb")):
            row[name] = g[key].median() if key in g else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def fig_batch_sizes(runs: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, sweep: str | None = "batch_sizes"
                    ) -> pd.DataFrame:
    """The bottleneck: generation tokens/s vs inference batch; backprop tokens/s and peak memory vs train
    micro-batch. Each point: median over a run's steps (first excluded); line: median over runs sharing the
    x value (the other batch size varies), bars: their min-max."""
    runs, steps = _select(runs, steps, sweep, what="fig_batch_sizes")
    per_run = batch_size_medians(runs, steps)
    panels = [("inference_batch", "gen_tokens_per_s", "inference batch (samples per sampler call)",
               "generation throughput (tokens/s)", "#1f77b4"),
              ("train_microbatch", "train_tokens_per_s", "train micro-batch (sequences per backprop)",
               "backprop throughput (tokens/s)", "#d62728"),
              ("train_microbatch", "peak_mb", "train micro-batch (sequences per backprop)",
               "peak memory (MiB, RSS during the run)", "#2ca02c")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    out = []
    for ax, (x, y, xlabel, ylabel, col) in zip(axes, panels, strict=True):
        d = per_run.dropna(subset=[x, y])
        if d.empty:
            ax.set_axis_off()
            continue
        agg = d.groupby(x)[y].agg(["median", "min", "max", "count"]).reset_index().sort_values(x)
        ax.scatter(d[x], d[y], color=col, alpha=0.35, s=14, label="one run")
        ax.errorbar(agg[x], agg["median"], yerr=[agg["median"] - agg["min"], agg["max"] - agg["median"]],
                    color=col, marker="o", capsize=3, label="median over runs")
        ax.set_xscale("log", base=2)
        xs = sorted(d[x].unique())
        ax.set_xticks(xs, [str(int(v)) for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append(agg.rename(columns={x: "x", "median": "median"}).assign(x_name=x, metric=y))
    if not out:
        plt.close(fig)
        raise NoDataError("fig_batch_sizes: no throughput metrics")
    fig.suptitle(f"Batch sizes: generation keeps scaling, backprop saturates ({_setup(runs)}; medians over "
                 "steps, first step excluded)", fontsize=10)
    save(fig, out_dir, "fig_batch_sizes")
    return pd.concat(out, ignore_index=True)


# ---------------------------------------------------------------------------------------------------- verdicts
VERDICT_COLORS = {"yes": "#2ca02c", "no": "#d62728", "inconclusive": "#7f7f7f"}


def fig_verdicts(intervals: pd.DataFrame, out_dir: str | Path, name: str = "fig_verdicts") -> pd.DataFrame:
    """Every verdict's difference with the 95% confidence interval it was decided on (rows of
    `findings.interval_frame`), one row each on its own scale (units differ), the threshold as a dashed line: a part
    is yes / no only where its interval clears the line."""
    rows = intervals.dropna(subset=["diff"]).reset_index(drop=True) if len(intervals) else intervals
    if rows.empty:
        raise NoDataError(f"{name}: no comparison to plot")
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.6 + 0.75 * len(rows)), layout="constrained", squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], rows.iterrows(), strict=True):
        has_ci = math.isfinite(r["low"])
        err = [[r["diff"] - r["low"]], [r["high"] - r["diff"]]] if has_ci else None
        ax.errorbar(r["diff"], 0, xerr=err, fmt="o", capsize=4, color=VERDICT_COLORS.get(r["verdict"], "#333333"))
        ax.axvline(r["threshold"], color="#333333", lw=0.8, ls="--")
        lo, hi = (min(r["low"], r["threshold"]), max(r["high"], r["threshold"])) if has_ci else (r["diff"], r["diff"])
        pad = max(0.15 * (hi - lo), 0.5)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_yticks([0], [f"F{r['finding']} {r['part']}: {r['verdict']}"], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(r["unit"], fontsize=7, labelpad=0)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Verdicts: each difference (first − second method) and the 95% bootstrap CI over seeds it was "
                 "decided on; dashed: threshold", fontsize=9)
    save(fig, out_dir, name)
    return rows


FIGURE_FUNCS = {"fig_sft_vs_rl": fig_sft_vs_rl, "fig1_right": fig1_right, "fig3": fig3,
                "fig_time_to_accuracy": fig_time_to_accuracy, "fig4": fig4, "fig5": fig5, "fig6": fig6,
                "fig_batch_sizes": fig_batch_sizes}
