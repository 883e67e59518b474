"""Runs -> pandas: local run directories (`load_runs`) or a W&B project (`load_wandb`), same two frames.

`runs`: one row per completed run. Columns: every config key flattened with dots (`algorithm.label`,
`kl.name`, ...), short aliases for grouping (`sweep`, `label`, `algorithm`, `kl`, `seed`, `model`, `task`,
`inference_batch` resolved from null to the whole step batch, `train_microbatch`, `eval_samples`), the
summary (`final/<metric>`, `initial/<metric>` for every evaluation metric, `time_elapsed` in seconds of
training, `steps_done`), `eval_sets` (tuple of the evaluation sets, e.g. ('arith',)), `sweep_dir` (the
directory of the Hydra multirun the run belongs to) and `run_dir`.

`steps`: one row per metrics.jsonl row (training rows, evaluation rows, both merged), with `run_dir`, the
grouping aliases and every metric as a column; `is_train` is True on rows with `time/step` (training steps).

Runs without summary.json are skipped: failed (error.txt) or not finished yet. The reasons are kept in
`runs.attrs["skipped"]` as (run_dir, reason) pairs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dash_exp.mappings import flatten

# short alias -> flattened config key
ALIASES = {
    "sweep": "sweep_name",
    "label": "algorithm.label",
    "algorithm": "algorithm.name",
    "kl": "kl.name",
    "seed": "seed",
    "model": "model.name",
    "task": "task.name",
    "prompts_per_step": "prompts_per_step",
    "group_size": "group_size",
    "inference_batch": "inference_batch",
    "train_microbatch": "train_microbatch",
    "eval_samples": "eval_samples",
}
# columns copied into every row of `steps`
GROUP_COLUMNS = ["run_dir", "sweep", "label", "kl", "seed", "model", "task", "inference_batch", "train_microbatch"]


def _aliases(flat: dict[str, Any]) -> dict[str, Any]:
    out = {alias: flat.get(key) for alias, key in ALIASES.items()}
    if out["label"] is None:
        out["label"] = out["algorithm"]
    if out["inference_batch"] is None and out["prompts_per_step"] and out["group_size"]:
        out["inference_batch"] = int(out["prompts_per_step"]) * int(out["group_size"])
    return out


def _eval_sets(metrics: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") >= 2))


def _run_record(config: dict[str, Any], summary: dict[str, Any], run_dir: str, sweep_dir: str,
                finished_at: float = math.nan) -> dict[str, Any]:
    flat = flatten(config)
    row: dict[str, Any] = {**flat, **_aliases(flat)}
    for part in ("initial", "final"):
        for key, value in (summary.get(part) or {}).items():
            row[f"{part}/{key}"] = value
    row["time_elapsed"] = summary.get("time/elapsed")
    row["steps_done"] = summary.get("steps")
    row["resumed"] = summary.get("resumed")
    # the model's directory name (the tiny base's cache key, e.g. tiny-96de5a5d1541)
    row["model_dir"] = summary.get("model_dir")
    row["eval_sets"] = _eval_sets(summary.get("final") or {})
    row["sweep_dir"] = sweep_dir
    row["finished_at"] = finished_at
    row["run_dir"] = run_dir
    return row


def _frames(records: list[tuple[dict, list[dict]]], skipped: list[tuple[str, str]]) -> tuple[pd.DataFrame,
                                                                                            pd.DataFrame]:
    """[(run record, metric rows)] -> (runs, steps)."""
    runs = pd.DataFrame([rec for rec, _ in records])
    step_frames = []
    for rec, rows in records:
        frame = pd.DataFrame(rows)
        if frame.empty:
            continue
        for col in GROUP_COLUMNS:
            frame[col] = rec.get(col)
        step_frames.append(frame)
    steps = pd.concat(step_frames, ignore_index=True) if step_frames else pd.DataFrame(columns=[*GROUP_COLUMNS,
                                                                                                "step"])
    steps["is_train"] = steps["time/step"].notna() if "time/step" in steps else False
    # rows stay in file order within a run: initial eval, training steps (periodic evals merged), final eval
    if not runs.empty:
        runs = runs.sort_values(["sweep", "label", "kl", "seed", "run_dir"], key=_sort_key, kind="stable")
        runs = runs.reset_index(drop=True)
    runs.attrs["skipped"] = skipped
    steps.attrs["skipped"] = skipped
    return runs, steps


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(lambda v: (0, v) if isinstance(v, int | float) and not isinstance(v, bool) else (1, str(v)))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; an unreadable line (a run killed mid-write) is skipped."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory below root (root included) with a config.yaml, or with an error.txt (a sweep job that
    failed before writing its config), skipping checkpoints and W&B dirs."""
    root = Path(root)
    found = [] if not root.is_dir() else sorted({p.parent for name in ("config.yaml", "error.txt")
                                                 for p in root.rglob(name)})
    return [d for d in found if not ({"checkpoints", "wandb", ".hydra", "previous"} & set(d.relative_to(root).parts))]


def load_runs(root: str | Path, verbose: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, steps) from every run dir found recursively under root; see the module docstring."""
    import yaml

    records, skipped = [], []
    for run_dir in find_run_dirs(Path(root)):
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            if (run_dir / "error.txt").exists():
                lines = (run_dir / "error.txt").read_text().strip().splitlines()
                reason = f"failed: {lines[-1] if lines else 'error.txt'}"
            else:
                reason = "not finished (no summary.json yet)"
            skipped.append((str(run_dir), reason))
            continue
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            skipped.append((str(run_dir), f"unreadable config.yaml/summary.json ({type(exc).__name__})"))
            continue
        rec = _run_record(config, summary, str(run_dir), str(run_dir.parent), finished_at(summary, summary_path))
        records.append((rec, read_metrics(run_dir / "metrics.jsonl")))
    if verbose:
        for run_dir, reason in skipped:
            print(f"skipped {run_dir}: {reason}")
    return _frames(records, skipped)


def finished_at(summary: dict[str, Any], path: Path) -> float:
    """When a run finished (Unix seconds): its summary's `finished_at`, else (a run made before the trainer wrote
    it) the summary file's modification time, which a copy or a git checkout does not keep."""
    return float(summary.get("finished_at", path.stat().st_mtime))


def load_wandb(project: str, api: Any = None, filters: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, steps) from a W&B project ("entity/project"): config, full history and summary of each finished
    run. `api` defaults to `wandb.Api()`; raises RuntimeError with the reason when the API is unreachable."""
    if api is None:
        try:
            import wandb

            api = wandb.Api(timeout=30)
        except Exception as exc:
            raise RuntimeError(f"W&B API unreachable for project {project!r} ({type(exc).__name__}: {exc}); "
                               "set WANDB_API_KEY (and network access) or use local run dirs (--runs)") from exc
    try:
        wandb_runs = list(api.runs(project, filters=filters or {}))
    except Exception as exc:
        raise RuntimeError(f"W&B API: cannot list runs of {project!r} ({type(exc).__name__}: {exc})") from exc
    records, skipped = [], []
    for run in wandb_runs:
        name = f"wandb:{'/'.join(getattr(run, 'path', [project, run.id]))}"
        if getattr(run, "state", "finished") != "finished":
            skipped.append((name, f"state {run.state}"))
            continue
        if "superseded" in (getattr(run, "tags", None) or []):  # a killed attempt: its resumed run has it all
            skipped.append((name, "superseded by its resumed run"))
            continue
        rows = [{k: (math.nan if v is None else v) for k, v in row.items() if not k.startswith("_") or k == "_step"}
                for row in run.scan_history()]
        for row in rows:
            row["step"] = int(row.pop("_step", row.get("step", 0)))
        evals = [r for r in rows if not _is_num(r.get("time/step"))]
        initial = {k: v for r in evals if r["step"] == 0 for k, v in r.items() if k.startswith("eval/")}
        run_summary = dict(getattr(run.summary, "_json_dict", run.summary) or {})
        final = {k: v for k, v in run_summary.items() if k.startswith("eval/")}
        elapsed = [r["time/elapsed"] for r in rows if _is_num(r.get("time/elapsed"))]
        summary = {"initial": initial, "final": final, "time/elapsed": max(elapsed, default=0.0),
                   "steps": max((r["step"] for r in rows), default=0)}
        config = dict(run.config)
        run_dir = str(config.get("run_dir") or name)
        records.append((_run_record(config, summary, run_dir, f"wandb:{project}"), rows))
    if not records:
        warnings.warn(f"W&B project {project!r}: no finished runs", stacklevel=2)
    return _frames(records, skipped)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def latest_sweeps(runs: pd.DataFrame, steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, per sweep name, only the runs of its newest multirun directory (the one whose last run finished
    last)."""
    if runs.empty:
        return runs, steps
    last = runs.fillna({"finished_at": -math.inf}).groupby(["sweep", "sweep_dir"], dropna=False)["finished_at"]
    last = last.max().reset_index()
    newest = last.loc[last.groupby("sweep", dropna=False)["finished_at"].idxmax(), ["sweep", "sweep_dir"]]
    sel = runs.merge(newest, on=["sweep", "sweep_dir"])
    out_runs = sel.reset_index(drop=True)
    out_steps = steps[steps["run_dir"].isin(sel["run_dir"])].reset_index(drop=True)
    out_runs.attrs, out_steps.attrs = dict(runs.attrs), dict(steps.attrs)
    return out_runs, out_steps


def sweep_frames(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs and steps of one sweep."""
    if runs.empty:
        return runs, steps
    sel = runs[runs["sweep"] == sweep].reset_index(drop=True)
    return sel, steps[steps["run_dir"].isin(sel["run_dir"])].reset_index(drop=True)


# the four findings' sweeps as views of ONE sweep that runs all their arms in one directory (an arm two findings
# share, DASH of one seed, runs once: sweeps/smollm2_findings.yaml): {finding's sweep: (labels, kl values)}
FINDING_VIEWS = {
    "sft_vs_rl": (("base", "teacher", "sft_h", "sft_m", "dash"), ("off",)),
    "algorithms": (("grpo", "no_gf", "dash"), ("off",)),
    "pg_vs_ppo": (("dash", "ppo_multi", "ppo_mini"), ("off",)),
    "kl": (("dash",), ("on", "off")),
}


def as_finding_sweeps(runs: pd.DataFrame, steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs of one all-findings sweep as the four findings' sweeps (FINDING_VIEWS): each run appears once in every
    view its label and kl belong to, its `sweep` set to the view's name (`source_sweep` keeps the original), so
    that every finding, table and figure reads them as it reads the tiny model's four sweeps. Steps are
    unchanged (they are matched to runs by run_dir). A ValueError when the runs already hold one of those sweeps
    (two models' results would mix)."""
    if runs.empty:
        return runs, steps
    mixed = sorted(set(runs["sweep"]) & set(FINDING_VIEWS))
    if mixed:
        raise ValueError(f"the runs already hold the findings' own sweeps {mixed}: views of an all-findings sweep "
                         "would mix with them (read the two from separate directories)")
    views = []
    for name, (labels, kls) in FINDING_VIEWS.items():
        view = runs[runs["label"].isin(labels) & runs["kl"].isin(kls)].assign(source_sweep=runs["sweep"], sweep=name)
        views.append(view)
    out = pd.concat(views, ignore_index=True)
    out.attrs = dict(runs.attrs)
    return out, steps

