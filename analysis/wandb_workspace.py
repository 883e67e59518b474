"""A saved W&B workspace per sweep, built with W&B's `wandb-workspaces` library: the sweep's runs only, grouped per
configuration (mean and standard error over seeds), with the panels of its finding first and then reward and accuracy,
response length, KL, the gradient filter, phase times and the loss, all under the names the trainer logs
(docs/metrics.md).

    python -m analysis.wandb_workspace --project ENTITY/PROJECT --sweep kl      # saves a new workspace (W&B login)
    python -m analysis.wandb_workspace --sweep kl --dry-run                     # prints it: no account, no network
    python -m analysis.wandb_workspace --project ENTITY/PROJECT --sweep all     # one workspace per sweep
    python -m analysis.wandb_workspace --project E/P --sweep kl --task math     # runs of task=math (math500, gsm8k)
    python -m analysis.wandb_workspace --project E/P --sweep kl --url URL       # replace that saved workspace

What is read from sweeps/<name>.yaml (and the sweep files and conf/config.yaml it builds on):
- the runs: a run's config carries `sweep_name` (its W&B tag too); attempts set aside on resume (tag `superseded`)
  are left out, as `analysis.runs.load_wandb` does;
- the grouping: the config keys the sweep varies (`hydra.sweeper.params` with several values, seeds pooled; a config
  group by its preset's name, `algorithm` by its label), or where it varies none there, the keys naming its jobs'
  directories (`hydra.sweep.subdir`: the mismatch sweep's arms are set on the command line);
- the held-out sets (`eval/<set>/...`) from the sweep's task, and pass@k from its `eval_samples`.
The x-axis of "vs training time" panels is `time/elapsed`: the trainer's seconds of training (what `time_budget_s`
counts; evaluation excluded).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SWEEPS_DIR = REPO / "sweeps"
CONFIG = REPO / "conf" / "config.yaml"
# the runs' W&B project (logger.project)
LOGGER = REPO / "conf" / "logger" / "wandb.yaml"

# a sweep parameter that picks a config group's preset -> the config key that names the preset in the run's config
PRESET_KEYS = {"algorithm": "algorithm.label", "kl": "kl.name", "task": "task.name", "model": "model.name",
               "rollout": "rollout.name"}
# task.name -> its held-out sets, as `eval/<set>/...` names them (dash_exp.tasks.registry; mbpp adds `humaneval`
# when task.humaneval is set)
EVAL_SETS = {"arith": ("arith",), "pycode": ("pycode",), "math": ("math500", "gsm8k"), "gsm8k": ("gsm8k", "math500"),
             "mbpp": ("mbpp",)}
# outcome counts of a code task's grader (dash_exp.tasks.code.OUTCOMES), logged as reward/<outcome>
CODE_OUTCOMES = ("no_code_block", "syntax_error", "timeout", "runtime_error", "wrong")
# the trainer's phases (its Timers): seconds of each per step, as time/<phase>
PHASES = ("inference", "reward", "update", "sync")
# the x-axis of "vs training time" panels
ELAPSED = "time/elapsed"
# runs set aside when a killed run resumed (dash_exp.tracking.MetricSink)
SUPERSEDED = "superseded"


class UnknownSweep(ValueError):
    """A sweep name with no sweeps/<name>.yaml."""


@dataclass(frozen=True)
class Sweep:
    """What a sweep's workspace needs from its config files."""

    # sweep_name: in every run's config and tags
    name: str
    # the config keys (dotted) that tell its configurations apart; empty: the W&B group the harness sets
    groupby: tuple[str, ...]
    # task.name of its runs
    task: str
    # samples per held-out problem: pass@1, pass@2, ... up to it
    eval_samples: int
    # jobs of one multirun (the product of its parameters' value counts)
    jobs: int

    @property
    def eval_sets(self) -> tuple[str, ...]:
        return EVAL_SETS.get(self.task, (self.task,))

    @property
    def pass_at(self) -> tuple[int, ...]:
        """The k of the pass@k the evaluation logs (dash_exp.evaluation: powers of two up to eval_samples)."""
        return tuple(2**i for i in range(int(math.log2(self.eval_samples)) + 1)) if self.eval_samples >= 1 else ()


def sweep_names() -> list[str]:
    """The sweeps: every sweeps/*.yaml that sets sweep_name (common.yaml is shared, not a sweep)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if "sweep_name" in _load(p))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolved(name: str) -> dict[str, Any]:
    """A sweep file merged over the sweep files its defaults list names (`- common`, `- smollm2`); config-group
    overrides (`- override /task: x`) come back as `{"task": {"name": x}}`."""
    raw = _load(SWEEPS_DIR / f"{name}.yaml")
    merged: dict[str, Any] = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            merged = _merge(merged, _resolved(entry))
        elif isinstance(entry, dict):
            for key, value in entry.items():
                group = key.removeprefix("override ").strip().lstrip("/")
                if group == "task":
                    merged = _merge(merged, {"task": {"name": value}})
    return _merge(merged, raw)


def _values(value: Any) -> list[str]:
    """A sweeper parameter's values (`a,b,c`; `range(0,3)` counted as several)."""
    text = str(value).strip()
    if text.startswith("range(") and text.endswith(")"):
        return [str(v) for v in range(*(int(a) for a in text[6:-1].split(",")))]
    return [v.strip() for v in text.split(",")]


def load_sweep(name: str, task: str | None = None) -> Sweep:
    """The sweep `name` (sweeps/<name>.yaml); `task` overrides the task its runs trained on (e.g. `math`, when the
    sweep ran with task=math on a GPU). An unknown name raises UnknownSweep naming the sweeps."""
    names = sweep_names()
    if name not in names:
        raise UnknownSweep(f"unknown sweep {name!r}: expected one of {', '.join(names)}")
    cfg, base = _resolved(name), _load(CONFIG)
    params = {k: _values(v) for k, v in (cfg.get("hydra", {}).get("sweeper", {}).get("params") or {}).items()}
    varied = [PRESET_KEYS.get(k, k) for k, v in params.items() if k != "seed" and len(set(v)) > 1]
    # arms that come from the command line name a job's directory: the keys of the sweep's own subdir (or, where no
    # parameter varies, of the one it inherits)
    own = _load(SWEEPS_DIR / f"{name}.yaml").get("hydra", {}).get("sweep", {}).get("subdir", "")
    subdir = own or ("" if varied else cfg.get("hydra", {}).get("sweep", {}).get("subdir", ""))
    varied += [k for k in re.findall(r"\$\{([^}]+)\}", subdir) if k not in ("hydra.job.num", "seed")]
    default_task = next(e["task"] for e in base["defaults"] if isinstance(e, dict) and "task" in e)
    swept_task = params.get("task", [])
    run_task = task or (swept_task[0] if len(swept_task) == 1 else cfg.get("task", {}).get("name", default_task))
    return Sweep(name=cfg["sweep_name"], groupby=tuple(dict.fromkeys(varied)), task=run_task,
                 eval_samples=int(cfg.get("eval_samples", base["eval_samples"])),
                 jobs=math.prod(len(v) for v in params.values()))


# ---------------------------------------------------------------- panels
def _line(title: str, *metrics: str, x: str = "Step") -> Any:
    """A line plot of metrics; runs of one group drawn as their mean with the standard error."""
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(title=title, x=x, y=list(metrics), groupby_aggfunc="mean", groupby_rangefunc="stderr")


def _bar(title: str, *metrics: str) -> Any:
    """A bar chart of each run's last logged value (its summary: for eval/*, the final evaluation)."""
    import wandb_workspaces.reports.v2 as wr

    return wr.BarPlot(title=title, metrics=list(metrics), groupby_aggfunc="mean", groupby_rangefunc="stderr")


def _section(name: str, panels: list[Any], is_open: bool = False) -> Any:
    import wandb_workspaces.workspaces as ws

    return ws.Section(name=name, panels=panels, is_open=is_open)


def _accuracy(s: str) -> tuple[str, str]:
    return f"eval/{s}/accuracy", f"eval/{s}/sampled_accuracy"


def _accuracy_vs_time(sweep: Sweep) -> list[Any]:
    return [_line(f"held-out accuracy ({s}) vs training time", *_accuracy(s), x=ELAPSED) for s in sweep.eval_sets]


def _pass_at_k(sweep: Sweep) -> list[Any]:
    return [_bar(f"final pass@k ({s})", *(f"eval/{s}/pass@{k}" for k in sweep.pass_at)) for s in sweep.eval_sets]


def finding_panels(sweep: Sweep) -> tuple[str, list[Any]] | None:
    """The sweep's own section (its finding's metrics), shown first and open; None where the common ones suffice."""
    sets = sweep.eval_sets
    if sweep.name == "sft_vs_rl":
        return "SFT vs RL (finding 1)", [*(_bar(f"final held-out accuracy ({s})", *_accuracy(s)) for s in sets),
                                         _line("SFT loss", "loss/sft"), _line("RL reward", "reward/mean")]
    if sweep.name == "algorithms":
        return "time to accuracy (finding 4)", [*_accuracy_vs_time(sweep),
                                                _line("kept fraction (gradient filter)", "filter/kept_frac"),
                                                _line("backprop seconds per step", "time/update"),
                                                _line("samples through a forward pass", "filter/forward_samples")]
    if sweep.name == "pg_vs_ppo":
        return "PG vs PPO at equal time (finding 2)", [*_accuracy_vs_time(sweep),
                                                       _line("reward vs training time", "reward/mean", x=ELAPSED),
                                                       _line("PPO clip fraction", "ppo/clip_frac"),
                                                       _line("approx. KL to the pre-update policy", "ppo/approx_kl"),
                                                       _line("optimizer steps per step", "ppo/optimizer_steps")]
    if sweep.name == "kl":
        return "KL penalty (finding 3)", [_line("KL to the reference", "kl/mean"),
                                          _line("response length (tokens)", "response/length_mean"),
                                          *(_line(f"held-out response length ({s})", f"eval/{s}/length_mean",
                                                  f"eval/{s}/sampled_length_mean") for s in sets),
                                          *_pass_at_k(sweep)]
    if sweep.name == "code":
        return "code (findings 1, 4)", [*_pass_at_k(sweep),
                                        _line("training outcomes (counts)", *(f"reward/{o}" for o in CODE_OUTCOMES)),
                                        _line("grader timeouts", "reward/timeouts")]
    if sweep.name == "batch_sizes":
        return "batch sizes: the bottleneck", [_bar("generation tokens/s", "throughput/gen_tokens_per_s"),
                                               _bar("backprop tokens/s", "throughput/train_tokens_per_s"),
                                               _bar("peak memory (MB)", "mem/peak_mb"),
                                               _line("generation seconds per step", "time/inference"),
                                               _line("backprop seconds per step", "time/update")]
    if sweep.name == "zoo":
        return "estimators and losses", [_line("reward std (within step)", "reward/std"),
                                         _line("policy entropy (dash_entropy)", "entropy/mean"),
                                         _line("clip fraction", "ppo/clip_frac"),
                                         _line("samples drawn (dapo: dynamic sampling)", "sampling/samples_drawn"),
                                         _line("overlong penalty (dapo)", "reward/overlong_penalty")]
    if sweep.name == "filter_vs_dynamic":
        return "gradient filter vs dynamic sampling", [*_accuracy_vs_time(sweep),
                                                       _line("kept fraction (gradient filter)", "filter/kept_frac"),
                                                       _line("sampler rounds per step", "sampling/rounds"),
                                                       _line("samples drawn per step", "sampling/samples_drawn"),
                                                       _line("informative groups trained on", "sampling/groups"),
                                                       _line("seconds per step, by phase",
                                                             *(f"time/{p}" for p in PHASES))]
    if sweep.name == "smollm2_findings":
        return "the four findings in one sweep (SmolLM2)", [
            *(_bar(f"final held-out accuracy ({s})", *_accuracy(s)) for s in sets), *_accuracy_vs_time(sweep),
            _line("SFT loss", "loss/sft"), _line("backprop seconds per step", "time/update"),
            _line("KL to the reference", "kl/mean"), _line("PPO clip fraction", "ppo/clip_frac")]
    if sweep.name == "mismatch":
        return "sampler vs trainer mismatch", [_line("pi_trainer / pi_sampler", "mismatch/ratio_mean"),
                                               _line("tokens with ratio outside [0.9, 1.1]", "mismatch/outside_frac"),
                                               _line("tokens corrected (TIS / MIS)", "mismatch/corrected_frac"),
                                               *(_bar(f"final held-out accuracy ({s})", *_accuracy(s)) for s in sets)]
    return None


def common_sections(sweep: Sweep) -> list[Any]:
    """The sections every sweep's workspace has."""
    sets = sweep.eval_sets
    return [
        _section("reward and accuracy", [
            _line("reward vs training time", "reward/mean", x=ELAPSED),
            _line("reward vs step", "reward/mean"),
            *(_line(f"held-out accuracy ({s})", *_accuracy(s)) for s in sets),
            *(_bar(f"final held-out accuracy ({s})", *_accuracy(s)) for s in sets),
        ], is_open=True),
        _section("response length", [
            _line("response length (tokens)", "response/length_mean"),
            _line("truncated responses", "response/truncated_frac"),
            *(_line(f"held-out response length ({s})", f"eval/{s}/length_mean", f"eval/{s}/sampled_length_mean")
              for s in sets),
        ], is_open=True),
        _section("KL", [_line("KL to the reference (per token)", "kl/mean"), _line("KL loss term", "loss/kl"),
                        _line("effective KL coefficient", "kl/beta_effective")]),
        _section("gradient filter", [_line("kept fraction", "filter/kept_frac"),
                                     _line("samples through a forward pass", "filter/forward_samples"),
                                     _line("mean |advantage|", "adv/abs_mean")]),
        _section("phase times", [_line("seconds per step, by phase", *(f"time/{p}" for p in PHASES)),
                                 _line("seconds per step", "time/step"), _line("evaluation seconds", "time/eval"),
                                 _line("generation tokens/s", "throughput/gen_tokens_per_s"),
                                 _line("backprop tokens/s", "throughput/train_tokens_per_s"),
                                 _line("peak memory (MB)", "mem/peak_mb")]),
        _section("loss", [_line("loss", "loss/total", "loss/pg"), _line("gradient norm", "grad/norm")]),
    ]


def workspace_name(sweep: str) -> str:
    return f"dash_exp sweep: {sweep}"


def build_workspace(sweep: str | Sweep, entity: str, project: str, task: str | None = None) -> Any:
    """The workspace of one sweep (not saved): its runs, grouped per configuration, with its panels."""
    import wandb_workspaces.workspaces as ws

    spec = sweep if isinstance(sweep, Sweep) else load_sweep(sweep, task)
    own = finding_panels(spec)
    sections = ([_section(own[0], own[1], is_open=True)] if own else []) + common_sections(spec)
    groupby = [ws.Config(k) for k in spec.groupby] or [ws.Metric("Group")]
    return ws.Workspace(
        entity=entity, project=project, name=workspace_name(spec.name), sections=sections,
        settings=ws.WorkspaceSettings(max_runs=max(10, spec.jobs)),
        runset_settings=ws.RunsetSettings(
            filters=ws.And(ws.Config("sweep_name") == spec.name, ws.Tags().notin([SUPERSEDED])), groupby=groupby))


# ---------------------------------------------------------------- printing, saving
def panel_metrics(panel: Any) -> list[str]:
    """The metrics a panel plots (line: y; bar: metrics)."""
    return [str(m) for m in (getattr(panel, "y", None) or getattr(panel, "metrics", None) or [])]


def describe(workspace: Any) -> str:
    """The workspace as text: name, runs, grouping, then each section's panels."""
    groups = ", ".join(f"{type(g).__name__.lower()} {g.name}" for g in workspace.runset_settings.groupby)
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}",
             f"  runs: {workspace.runset_settings.filters}", f"  grouped by: {groups}"]
    for section in workspace.sections:
        lines.append(f"  [{'open' if section.is_open else 'closed'}] {section.name}")
        for panel in section.panels:
            kind = "line" if type(panel).__name__ == "LinePlot" else "bar"
            x = f" vs {panel.x}" if kind == "line" else " (last value)"
            lines.append(f"    {kind:<4} {panel.title}: {', '.join(panel_metrics(panel))}{x}")
    return "\n".join(lines)


def save(workspace: Any, url: str | None = None) -> str:
    """Save to W&B (needs `wandb login` or WANDB_API_KEY): a new saved workspace, or, with `url`, over the saved
    workspace there. Returns its URL."""
    if url is None:
        return workspace.save().url
    import wandb_workspaces.workspaces as ws

    saved = ws.Workspace.from_url(url)
    saved.name, saved.sections = workspace.name, workspace.sections
    saved.settings, saved.runset_settings = workspace.settings, workspace.runset_settings
    return saved.save().url


def _entity_project(text: str, offline: bool) -> tuple[str, str]:
    if "/" in text:
        entity, project = text.split("/", 1)
        return entity, project
    if offline:
        return "<default entity>", text
    import wandb

    return wandb.Api().default_entity, text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.wandb_workspace", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_project = _load(LOGGER)["project"]
    parser.add_argument("--project", default=default_project,
                        help=f"ENTITY/PROJECT the runs logged to (PROJECT alone: your default entity; default "
                             f"{default_project}, logger.project)")
    parser.add_argument("--sweep", required=True, action="append",
                        help=f"a sweep ({', '.join(sweep_names())}) or all; repeat for several")
    parser.add_argument("--task", help="the task the runs trained on, where not the sweep's own (e.g. math: "
                                       "panels of eval/math500 and eval/gsm8k)")
    parser.add_argument("--dry-run", "--print", dest="dry_run", action="store_true",
                        help="build and print the workspace(s) only: no W&B account, no network")
    parser.add_argument("--url", help="replace the saved workspace at this URL instead of saving a new one")
    args = parser.parse_args(argv)
    names = sweep_names() if "all" in args.sweep else args.sweep
    if args.url and len(names) > 1:
        parser.error("--url replaces one workspace: give one --sweep")
    try:
        sweeps = [load_sweep(n, args.task) for n in names]
    except UnknownSweep as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        entity, project = _entity_project(args.project, offline=True)
        print("\n\n".join(describe(build_workspace(sweep, entity, project)) for sweep in sweeps))
        return 0
    try:
        entity, project = _entity_project(args.project, offline=False)
        for sweep in sweeps:
            print(f"{sweep.name}: {save(build_workspace(sweep, entity, project), args.url)}")
    except Exception as exc:  # W&B: no login, no network, no such project or view
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: could not save to W&B ({type(exc).__name__}: {reason}); log in with `wandb login` or set "
              "WANDB_API_KEY, or print the workspace offline with --dry-run", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
