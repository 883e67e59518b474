"""analysis.wandb_workspace: each sweep's W&B workspace, built offline (no account, no network).

The metrics a panel may plot are derived from the code that logs them, not from a hand-kept list: the literal metric
names and timer phases in dash_exp/trainer.py and dash_exp/tracking.py, the code grader's outcome counts
(reward/<outcome>), and the `eval/<set>/...` names the real `evaluate_set` returns for the sweep's held-out sets.
Which runs a workspace shows is checked on the filter it would upload (its saved spec), applied to the configs and
tags real sweep jobs get (each sweep's first job, composed by Hydra)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from analysis import wandb_workspace as W

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
SWEEPS = W.sweep_names()
PAPER_SWEEPS = {"sft_vs_rl", "algorithms", "kl", "pg_vs_ppo", "batch_sizes", "code"}
# the configurations each sweep compares (its sweeper's varied parameters; mismatch: its command-line arms)
GROUPBY = {
    "sft_vs_rl": ("algorithm.label",), "algorithms": ("algorithm.label",), "pg_vs_ppo": ("algorithm.label",),
    "kl": ("kl.name",), "code": ("algorithm.label",), "batch_sizes": ("inference_batch", "train_microbatch"),
    "zoo": ("algorithm.label",), "smollm2": ("algorithm.label",), "smollm2_findings": ("algorithm.label", "kl.name"),
    "filter_vs_dynamic": ("algorithm.label", "algorithm.dynamic_sampling_rounds", "time_budget_s"),
    "mismatch": ("rollout.dtype", "algorithm.rollout_correction"),
}
COMMON = ["reward and accuracy", "response length", "KL", "gradient filter", "phase times", "loss"]
METRIC = re.compile(r"[a-z_]+/[a-z_@0-9]+")


def test_every_sweep_file_is_a_sweep():
    files = {p.stem for p in (REPO / "sweeps").glob("*.yaml")} - {"common"}
    assert set(SWEEPS) == files
    assert set(SWEEPS) >= PAPER_SWEEPS
    assert set(GROUPBY) == set(SWEEPS), "a new sweep: add its configurations to GROUPBY"


@pytest.fixture(scope="module")
def trainer_metrics() -> set[str]:
    """Every metric name the trainer and the sink write literally, time/<phase> of each timed phase, and the code
    grader's outcome counts."""
    from dash_exp.tasks.code import OUTCOMES

    names = {f"reward/{o}" for o in OUTCOMES}  # the trainer's f"reward/{k}" of the grader's counts
    for path in (REPO / "dash_exp" / "trainer.py", REPO / "dash_exp" / "tracking.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC.fullmatch(node.value):
                names.add(node.value)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "timers"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(f"time/{node.args[0].value}")  # Timers.pop: time/<phase>
    return names


class _Tokens:
    """A TokenCache stand-in: every text is one token, every response decodes to "x"."""

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "x")

    def __call__(self, text: str) -> list[int]:
        return [1]


def eval_metrics(sets: tuple[str, ...], samples: int, code: bool) -> set[str]:
    """The keys the real held-out evaluation returns for these sets (a stub sampler, tokenizer and grader)."""
    from dash_exp.evaluation import evaluate_set
    from dash_exp.reward import GradeResult
    from dash_exp.rollout.base import Rollout, SamplingParams
    from dash_exp.tasks.code import OUTCOMES

    sampler = SimpleNamespace(generate=lambda prompts, params, seeds: [
        Rollout([1], [2], [0.0], False) for _ in prompts for _ in range(params.n)])
    tokens = _Tokens()
    task = SimpleNamespace(score=lambda texts, problems: GradeResult(
        [1.0] * len(texts), 0, 0, dict.fromkeys(OUTCOMES, 0) if code else {}))
    problems = [SimpleNamespace(prompt="p")] * 2
    out: set[str] = set()
    for name in sets:
        out |= set(evaluate_set(sampler, tokens, task, name, problems, SamplingParams(n=samples), 0, 64))
    return out


@pytest.fixture(scope="module")
def jobs() -> dict[str, object]:
    """Each sweep's first job as Hydra composes it: +sweep=<name> and the first value of each swept parameter."""
    from dash_exp.config import compose_config

    out = {}
    for name in SWEEPS:
        params = W._resolved(name).get("hydra", {}).get("sweeper", {}).get("params") or {}
        first = [f"{k}={W._values(v)[0]}" for k, v in params.items()]
        out[name] = compose_config([f"+sweep={name}", "run_dir=unused", *first])
    return out


def _flat(cfg) -> dict:
    from analysis.runs import flatten

    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _hit(op: str, value, have: list) -> bool:
    """One filter item on a run's values of its key (one config value, or the run's tags)."""
    if op == "=":
        return have == [value]
    if op == "!=":
        return have != [value]
    if op == "IN":
        return any(v in value for v in have)
    assert op == "NIN", op
    return not any(v in value for v in have)


def _selects(filters: dict, run: dict) -> bool:
    """W&B's runset filter (the v2 spec a save uploads) applied to a run {config: flat dict, tags: list}: items
    joined left to right by their connectors."""
    result = None
    for item in filters["filters"]:
        assert "filters" not in item, "nested filter groups are not expected"
        key = item["key"]
        if key["section"] == "config":
            have = [run["config"].get(key["name"])]
        else:
            assert (key["section"], key["name"]) == ("run", "tags")
            have = run["tags"]
        hit = _hit(item["op"], item["value"], have)
        and_ = item.get("connector", "AND") == "AND"
        result = hit if result is None else (result and hit) if and_ else (result or hit)
    return bool(result)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_workspace_of_each_sweep(sweep, trainer_metrics, jobs):
    spec = W.load_sweep(sweep)
    workspace = W.build_workspace(sweep, "ent", "proj")
    assert (workspace.name, workspace.entity, workspace.project) == (f"dash_exp sweep: {sweep}", "ent", "proj")

    # sections: the finding's own first (open) where the sweep has one, then the common ones
    names = [s.name for s in workspace.sections]
    assert names[-len(COMMON):] == COMMON
    assert len(names) == len(COMMON) + (sweep != "smollm2")
    assert workspace.sections[0].is_open

    # every panel plots metrics the trainer logs, against Step or the trainer's training clock
    job = jobs[sweep]
    assert spec.task == job.task.name and spec.eval_samples == job.eval_samples
    logged = trainer_metrics | eval_metrics(spec.eval_sets, spec.eval_samples, code=spec.task in ("pycode", "mbpp"))
    assert "time/elapsed" in trainer_metrics
    plotted = set()
    for section in workspace.sections:
        assert section.panels
        for panel in section.panels:
            metrics = W.panel_metrics(panel)
            assert metrics and panel.title
            assert set(metrics) <= logged, f"{section.name}/{panel.title}: {set(metrics) - logged} never logged"
            assert getattr(panel, "x", "Step") in ("Step", "time/elapsed")
            plotted |= set(metrics)
    for wanted in ("reward/mean", f"eval/{spec.eval_sets[0]}/accuracy", "response/length_mean", "kl/mean",
                   "filter/kept_frac", "time/inference", "time/update", "time/step"):
        assert wanted in plotted
    if sweep == "kl":
        assert {f"eval/arith/pass@{k}" for k in (1, 2, 4, 8, 16)} <= plotted
    if sweep == "code":
        assert {"eval/pycode/pass@1", "eval/pycode/pass@8"} <= plotted

    # grouped per configuration: the keys the sweep varies, present in its runs' config, as W&B stores nested config
    assert spec.groupby == GROUPBY[sweep]
    assert [g.name for g in workspace.runset_settings.groupby] == list(GROUPBY[sweep])
    flat = _flat(job)
    assert all(key in flat for key in GROUPBY[sweep])
    run_set = workspace._spec["spec"]["section"]["runSets"][0]
    assert run_set["grouping"] == [{"section": "config", "name": ".value.".join(k.split(".", 1)) if "." in k
                                    else f"{k}.value"} for k in GROUPBY[sweep]]

    # the runs: exactly this sweep's (any arm, any seed), never another sweep's, a standalone run or a set-aside attempt
    runs = {name: {"config": _flat(cfg), "tags": list(cfg.logger.tags)} for name, cfg in jobs.items()}
    assert runs[sweep]["tags"] == [sweep] and runs[sweep]["config"]["sweep_name"] == sweep
    runs["standalone"] = {"config": {**runs[sweep]["config"], "sweep_name": None}, "tags": []}
    runs["superseded"] = {"config": runs[sweep]["config"], "tags": [sweep, "resumed", "superseded"]}
    runs["resumed"] = {"config": runs[sweep]["config"], "tags": [sweep, "resumed"]}
    runs["other seed"] = {"config": {**runs[sweep]["config"], "seed": 7}, "tags": [sweep]}
    assert {n for n, run in runs.items() if _selects(run_set["filters"], run)} == {sweep, "resumed", "other seed"}


def test_eval_sets_are_the_tasks_own(jobs):
    """EVAL_SETS of the embedded tasks match the sets the task registry builds."""
    from dash_exp.tasks.registry import build_task

    for sweep in ("kl", "code"):  # arith, pycode
        task = jobs[sweep].task
        assert tuple(build_task(task, need_train=False).evals) == W.EVAL_SETS[task.name]


def test_constants_follow_the_code():
    from dash_exp.tasks.code import OUTCOMES

    assert W.CODE_OUTCOMES == OUTCOMES
    assert W.workspace_name("kl") == "dash_exp sweep: kl"


def test_task_override(trainer_metrics):
    """--task math: the panels follow the math task's held-out sets."""
    spec = W.load_sweep("kl", task="math")
    assert spec.eval_sets == ("math500", "gsm8k") and spec.pass_at == (1, 2, 4, 8, 16)
    workspace = W.build_workspace(spec, "e", "p")
    plotted = {m for s in workspace.sections for p in s.panels for m in W.panel_metrics(p)}
    assert {"eval/math500/accuracy", "eval/gsm8k/accuracy", "eval/gsm8k/pass@16"} <= plotted
    assert not any("arith" in m for m in plotted)
    assert plotted <= trainer_metrics | eval_metrics(spec.eval_sets, spec.eval_samples, code=False)


def test_unknown_sweep_is_one_line_naming_the_sweeps(capsys):
    with pytest.raises(W.UnknownSweep) as err:
        W.load_sweep("nope")
    message = str(err.value)
    assert "\n" not in message and "'nope'" in message and all(s in message for s in SWEEPS)
    assert W.main(["--sweep", "nope", "--dry-run"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: unknown sweep 'nope': expected one of algorithms")


def test_dry_run_prints_without_network(capsys, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda *a, **k: pytest.fail("--dry-run reached the W&B API"))
    assert W.main(["--project", "ent/proj", "--sweep", "kl", "--sweep", "batch_sizes", "--print"]) == 0
    out = capsys.readouterr().out
    assert "workspace 'dash_exp sweep: kl' in ent/proj" in out and "grouped by: config kl.name" in out
    assert "grouped by: config inference_batch, config train_microbatch" in out
    assert "line reward vs training time: reward/mean vs time/elapsed" in out
    assert "bar  final pass@k (arith): eval/arith/pass@1" in out
    assert W.main(["--sweep", "all", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("workspace 'dash_exp sweep: ") == len(SWEEPS)


def test_save_without_an_account_is_one_line(capsys, monkeypatch, tmp_path):
    """No W&B login: the library's save fails before any request; one line says how to log in."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert W.main(["--project", "ent/proj", "--sweep", "kl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not save to W&B" in err[0] and "wandb login" in err[0]


def test_save_calls_the_library(monkeypatch):
    """A new workspace goes through Workspace.save; --url loads the saved one and saves this one's content over it."""
    import wandb_workspaces.workspaces as ws

    workspace = W.build_workspace("kl", "ent", "proj")
    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or SimpleNamespace(url="https://new"))
    assert W.save(workspace) == "https://new" and saved == [workspace]

    old = W.build_workspace("zoo", "ent", "proj")
    monkeypatch.setattr(ws.Workspace, "from_url", classmethod(lambda cls, url: old))
    assert W.save(workspace, "https://wandb.ai/ent/proj?nw=abc") == "https://new"
    assert saved[-1] is old and old.name == "dash_exp sweep: kl"
    assert [s.name for s in old.sections] == [s.name for s in workspace.sections]
    assert old.runset_settings.filters == workspace.runset_settings.filters
