"""analysis/: the loaders, every figure and table, the make_figures CLI and every notebook executed headless, on
real (tiny, few-step) runs of every sweep made with the real CLI and committed in tests/data/analysis_runs
(config.yaml, summary.json, metrics.jsonl of each run; remade by scripts/make_analysis_fixture.py), and on
hand-built runs with known answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))  # analysis/ is not an installed package: import it from the checkout

from analysis import figures as F  # noqa: E402
from analysis import findings as FD  # noqa: E402
from analysis import tables as T  # noqa: E402
from analysis.make_figures import FINDINGS, main, make_finding  # noqa: E402
from analysis.runs import find_run_dirs, latest_sweeps, load_runs, load_wandb, sweep_frames  # noqa: E402

NOTEBOOKS = REPO / "analysis" / "notebooks"
# real outputs of every sweep at the test sizes, 2 seeds (scripts/make_analysis_fixture.py says when to remake them)
COMMITTED_RUNS = REPO / "tests" / "data" / "analysis_runs"
REMAKE = "remake it: python scripts/make_analysis_fixture.py"


def cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> Path:
    """A copy of the committed runs (one directory per sweep, as a multirun lays them out): nothing trains."""
    root = tmp_path_factory.mktemp("analysis") / "multirun"
    shutil.copytree(COMMITTED_RUNS, root, ignore=shutil.ignore_patterns("README.md"))
    return root


@pytest.mark.unit
def test_committed_runs_still_fit_todays_config():
    """The committed runs are not stale: every sweep analysis/ reads has them, and each run's config.yaml still
    loads into today's schema (a renamed, removed or retyped key fails here) and passes its validation."""
    from omegaconf import OmegaConf

    from dash_exp.config import Config, validate

    assert sorted(p.name for p in COMMITTED_RUNS.iterdir() if p.is_dir()) == sorted(f.sweep for f in FINDINGS), REMAKE
    run_dirs = find_run_dirs(COMMITTED_RUNS)
    assert len(run_dirs) == 38
    for run_dir in run_dirs:
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
        assert (REPO / "sweeps" / f"{run_dir.parent.name}.yaml").is_file(), f"{run_dir}: its sweep is gone; {REMAKE}"
        try:
            validate(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml")))
        except Exception as exc:
            raise AssertionError(f"{run_dir / 'config.yaml'} no longer fits dash_exp.config ({exc}); {REMAKE}") from exc


@pytest.fixture(scope="module")
def frames(sweeps):
    return load_runs(sweeps)


# ------------------------------------------------------------------------------------------------------ loaders
@pytest.mark.unit
def test_load_runs_one_row_per_run_with_config_and_summary(sweeps, frames):
    runs, steps = frames
    assert runs.attrs["skipped"] == []
    assert runs.groupby("sweep").size().to_dict() == {"sft_vs_rl": 8, "algorithms": 6, "kl": 4, "pg_vs_ppo": 6,
                                                      "batch_sizes": 4, "code": 10}
    algos = sweep_frames(runs, steps, "algorithms")[0]
    assert set(algos["label"]) == {"grpo", "no_gf", "dash"} and set(algos["seed"]) == {0, 1}
    # inference_batch: null resolves to the whole step batch (4 prompts x 4 samples); GRPO samples per micro-batch
    assert set(algos.loc[algos["label"] == "dash", "inference_batch"]) == {16}
    assert set(algos.loc[algos["label"] == "grpo", "inference_batch"]) == {4}
    assert set(runs.loc[runs["sweep"] == "kl", "kl"]) == {"on", "off"}
    arith = runs[runs["sweep"] != "code"]
    for col in ("final/eval/arith/accuracy", "initial/eval/arith/sampled_accuracy", "time_elapsed", "run_dir",
                "algorithm.label", "kl.beta", "task.name"):
        assert arith[col].notna().all(), col
    assert (runs["eval_sets"] == runs["sweep"].map(lambda s: ("pycode",) if s == "code" else ("arith",))).all()
    code = runs[runs["sweep"] == "code"]
    assert code["final/eval/pycode/pass@8"].notna().all() and (code["task.name"] == "pycode").all()
    # the traces file reached SFT-M
    sft_m = runs[runs["label"] == "sft_m"]
    assert len(sft_m) == 2 and (sft_m["algorithm.sft_source"] == "traces").all()
    assert (sft_m["algorithm.traces_path"] == "traces.jsonl").all()  # made relative by the fixture script
    # steps: every metrics.jsonl row, training rows marked; the grouping columns are on every row
    n_rows = sum(len((Path(d) / "metrics.jsonl").read_text().splitlines()) for d in runs["run_dir"])
    assert len(steps) == n_rows
    train = steps[steps["is_train"]]
    assert train["reward/mean"].notna().any() and train["time/step"].notna().all()
    assert steps[["sweep", "label", "kl", "seed"]].notna().all().all()
    first = steps.groupby("run_dir").head(1)
    assert (first["step"] == 0).all() and not first["is_train"].any()  # the initial evaluation row


def _copy_run(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    return dst


@pytest.mark.unit
def test_load_runs_skips_failed_and_unfinished_runs_with_a_note(frames, tmp_path):
    runs, _ = frames
    ok = _copy_run(runs["run_dir"].iloc[0], tmp_path / "ok")
    failed = _copy_run(runs["run_dir"].iloc[1], tmp_path / "sweep" / "failed")
    (failed / "summary.json").unlink()
    (failed / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    unfinished = _copy_run(runs["run_dir"].iloc[2], tmp_path / "sweep" / "unfinished")
    (unfinished / "summary.json").unlink()
    with (unfinished / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "reward/me')  # killed mid-write
    (tmp_path / "not_a_run").mkdir()
    got, steps = load_runs(tmp_path)
    assert list(got["run_dir"]) == [str(ok)]
    assert set(steps["run_dir"]) == {str(ok)}
    reasons = dict(got.attrs["skipped"])
    assert reasons[str(failed)] == "failed: RuntimeError: boom"
    assert reasons[str(unfinished)].startswith("not finished")
    # make_figures still works and names the skipped runs
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "figures")]) == 0
    assert "failed: RuntimeError: boom" in (tmp_path / "figures" / "README.md").read_text()


@pytest.mark.unit
def test_no_runs_prints_the_sweeps_to_run_and_exits_1(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "figures")]) == 1
    out = capsys.readouterr().out
    assert "no completed runs" in out and "make reproduce" in out
    for finding in FINDINGS:
        assert f"make sweep SWEEP={finding.sweep}" in out
    assert not (tmp_path / "figures").exists()


@pytest.mark.unit
def test_latest_sweeps_keeps_the_newest_multirun_of_each_sweep(frames):
    runs, steps = frames
    old = runs[runs["sweep"] == "kl"].assign(sweep_dir="/x/kl/2099-01-01_00-00-00", finished_at=1.0,
                                             run_dir=lambda f: f["run_dir"] + "_old")
    both = pd.concat([runs, old], ignore_index=True)
    kept, kept_steps = latest_sweeps(both, steps)
    assert len(kept) == len(runs) and not kept["run_dir"].str.endswith("_old").any()
    assert len(kept_steps) == len(steps)


class _FakeSummary:
    def __init__(self, d):
        self._json_dict = d


class _FakeRun:
    """What load_wandb reads of a wandb.apis.public.Run, built from a local run as the W&B sink logged it."""

    def __init__(self, run_dir: Path):
        import yaml

        self.id = run_dir.name
        self.path = ["ent", "proj", self.id]
        self.state = "finished"
        self.config = yaml.safe_load((run_dir / "config.yaml").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        self.summary = _FakeSummary({**summary["last_step"], **summary["final"]})
        merged: dict[int, dict] = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            merged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
        self._history = [{"_step": s, "_runtime": 1.0, **r} for s, r in sorted(merged.items())]

    def scan_history(self):
        return iter(self._history)


class _FakeApi:
    def __init__(self, runs):
        self._runs = runs

    def runs(self, project, filters=None):
        assert project == "ent/proj"
        return self._runs


@pytest.mark.unit
def test_load_wandb_gives_the_same_frames_as_local_runs(frames, tmp_path):
    runs, _ = frames
    kl, _ = sweep_frames(*frames, "kl")
    w_runs, w_steps = load_wandb("ent/proj", api=_FakeApi([_FakeRun(Path(d)) for d in kl["run_dir"]]))
    cols = ["sweep", "label", "kl", "seed", "final/eval/arith/accuracy", "final/eval/arith/pass@16",
            "initial/eval/arith/accuracy", "steps_done"]
    pd.testing.assert_frame_equal(w_runs[cols], kl[cols], check_dtype=False)
    assert w_runs["time_elapsed"].tolist() == pytest.approx(kl["time_elapsed"].tolist())
    assert w_steps["is_train"].any() and w_steps["reward/mean"].notna().any()
    data = F.fig5(w_runs, w_steps, tmp_path)
    assert set(data["kl"]) == {"on", "off"}


@pytest.mark.unit
def test_load_wandb_without_credentials_raises_a_clear_error(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", "/nonexistent-wandb-config")
    with pytest.raises(RuntimeError, match="W&B API unreachable for project 'ent/proj'"):
        load_wandb("ent/proj")

    class Broken:
        def runs(self, *a, **k):
            raise ConnectionError("no route to host")

    with pytest.raises(RuntimeError, match="cannot list runs.*no route to host"):
        load_wandb("ent/proj", api=Broken())


# ---------------------------------------------------------------------------------------- figures and tables
@pytest.mark.unit
def test_every_figure_plots_non_empty_series(frames, tmp_path):
    runs, steps = frames
    datas = {}
    for name, func in F.FIGURE_FUNCS.items():
        data = func(runs, steps, tmp_path)
        assert isinstance(data, pd.DataFrame) and not data.empty, name
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.pdf").stat().st_size
        datas[name] = data
    assert set(datas["fig_sft_vs_rl"]["label"]) == {"base", "sft_h", "sft_m", "dash"}
    fig1 = datas["fig1_right"].set_index("label")
    assert list(fig1.index) == ["grpo", "no_gf", "dash"] and (fig1[["inference_s", "update_s"]] > 0).all().all()
    fig3 = datas["fig3"]
    for metric in ("adv/abs_mean", "time/update", "reward/mean"):
        d = fig3[fig3["metric"] == metric]
        assert set(d["label"]) == {"no_gf", "dash"} and d["mean"].notna().all() and (d["n"] == 2).all(), metric
    tta = datas["fig_time_to_accuracy"]
    assert set(tta["label"]) == {"grpo", "no_gf", "dash"} and set(tta["kind"]) == {"greedy", "sampled"}
    assert sorted(set(tta["step"])) == [0, 1, 2] and (tta["n"] == 2).all()  # eval_every=1: 0, 1 and the final 2
    assert (tta.loc[tta["step"] == 0, "time_s"] == 0).all() and (tta.loc[tta["step"] > 0, "time_s"] > 0).all()
    fig4 = datas["fig4"]
    assert set(fig4["label"]) == {"dash", "ppo_multi", "ppo_mini"} and fig4["mean"].notna().all()
    fig5 = datas["fig5"]
    assert set(fig5["kl"]) == {"on", "off"} and sorted(set(fig5["k"])) == [1, 2, 4, 8, 16]
    assert fig5["mean"].between(0, 100).all()
    fig6 = datas["fig6"]
    assert {(m, k) for m, k in zip(fig6["metric"], fig6["kl"], strict=True)} == {
        (m, k) for m in ("reward/mean", "response/length_mean") for k in ("on", "off")}
    bs = datas["fig_batch_sizes"]
    assert set(bs["metric"]) == {"gen_tokens_per_s", "train_tokens_per_s", "peak_mb"}
    assert set(bs.loc[bs["metric"] == "gen_tokens_per_s", "x"]) == {8, 16}
    assert set(bs.loc[bs["metric"] == "train_tokens_per_s", "x"]) == {1, 4} and (bs["median"] > 0).all()


@pytest.mark.unit
def test_tables_put_the_papers_numbers_beside_ours(frames):
    runs, steps = frames
    t1 = T.table1(runs, steps)
    assert "| Base | 22.6 | 30.3 | 48.0 |" in t1 and "| SFT-H | 8.0 |" in t1 and "ours arith greedy" in t1
    assert "model `tiny`, task `arith`" in t1 and "directions" in t1
    t3 = T.table3(runs, steps)
    assert "| GRPO | 38.9 | 27.6 | 32.8 |" in t3 and "ours speed-up vs GRPO" in t3
    t5 = T.table5(runs, steps)
    assert "| PPO Mini | 29.8 | 31.6 | 36.0 | 8.1 |" in t5 and "time budget of 60 s" in t5
    t6 = T.table6(runs, steps)
    assert "| No-KL | 5.7 | 31.4 | 34.0 |" in t6 and "pass@16" in t6
    t2, t4 = T.table2(runs, steps), T.table4(runs, steps)
    assert "| Base | 2.6 | 22.8 | 7.1 | 60.5 |" in t2 and "| DASH | 11.4 | 40.4 | 23.7 | 63.2 |" in t2
    assert "| No-GF | 16.3 | 10.5 | 43.9 |" in t4 and "task `pycode`" in t4
    for table in (t1, t2, t3, t4, t5, t6):
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
        header, body = rows[0], rows[2:]
        ours = [i for i, c in enumerate(header) if c.startswith("ours")]
        assert ours and body and all(r[i] not in ("–", "") for r in body for i in ours), table
    tta = T.table3_time_to_accuracy(runs, steps)
    assert "| target | method | reached | time (s) | training samples | step |" in tta
    assert "| arith 50% of gain | GRPO |" in tta and "evaluations at steps 0, 1 and at each run's last step (2)" in tta
    with pytest.raises(F.NoDataError):
        T.table1(runs[runs["sweep"] == "kl"], steps)


@pytest.mark.integration
def test_make_figures_cli_writes_every_figure_table_and_the_index(sweeps, tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = cli(["analysis.make_figures", "--runs", str(sweeps), "--out", str(out)], env)
    for finding in FINDINGS:
        for name in finding.figures:
            assert (out / f"{name}.png").stat().st_size > 10_000, name
            assert (out / f"{name}.pdf").stat().st_size > 1_000, name
            assert f"{name}.png" in proc.stdout
        for name in finding.tables:
            assert (out / f"{name}.md").read_text().startswith("## "), name
    index = (out / "README.md").read_text()
    assert all(f"![{n}]({n}.png)" in index for f in FINDINGS for n in f.figures)
    assert "Sweeps without runs" not in index and "not made" not in index
    # the Findings section comes first and has a verdict for every finding (all sweeps ran)
    assert index.index("## Findings") < index.index("## Finding 1:")
    # the four findings, then the code rows of findings 1 and 4
    assert index.count("Reproduced: **") == 6 and "not run" not in index


@pytest.mark.unit
def test_make_finding_reports_what_a_partial_sweep_cannot_make(frames, tmp_path):
    runs, steps = frames
    only_grpo = runs[(runs["sweep"] != "algorithms") | (runs["label"] == "grpo")]
    result = make_finding(only_grpo, steps, "algorithms", tmp_path)
    assert "fig1_right" in result.figures and "table3" in result.tables
    assert any("fig3" in n for n in result.notes) and "fig3" not in result.figures


# ------------------------------------------------------------------------ hand-built runs: known crossings, verdicts
def write_run(root: Path, sweep: str, label: str, seed: int, evals: dict[int, float], step_s: float = 1.0,
              kl: str = "off", lengths: tuple[float, float] = (30.0, 30.0), task: str = "arith") -> Path:
    """A run dir as the trainer writes it (4 prompts x 2 samples per step): training rows at steps 1..last key of
    `evals` taking `step_s` seconds each, response length going linearly from lengths[0] to lengths[1]; held-out
    greedy accuracy `evals[step]` (step 0: the initial row, the last: the final row, others merged into the
    training row, as eval_every does)."""
    import yaml

    last = max(evals)
    run = root / sweep / f"{label}_kl-{kl}_seed{seed}"
    run.mkdir(parents=True)

    def ev(step: int) -> dict:
        out = {f"eval/{task}/accuracy": evals[step], f"eval/{task}/sampled_accuracy": evals[step] / 2,
               f"eval/{task}/length_mean": lengths[step > 0]}
        if task != "arith":  # a code task: pass@1 below the greedy pass rate, pass@8 above it
            out |= {f"eval/{task}/pass@1": 0.8 * evals[step], f"eval/{task}/pass@8": min(1.0, 1.5 * evals[step])}
        return out

    rows = [{"step": 0, **ev(0)}]
    for s in range(1, last + 1):
        length = lengths[0] + (lengths[1] - lengths[0]) * (s - 1) / max(last - 1, 1)
        rows.append({"step": s, "reward/mean": 0.5, "response/length_mean": length, "kl/mean": 0.01,
                     "time/step": step_s, "time/elapsed": s * step_s, "epoch": s / 10,
                     **(ev(s) if s in evals and s < last else {})})
    rows.append({"step": last, **ev(last)})
    config = {"sweep_name": sweep, "algorithm": {"name": label, "label": label}, "kl": {"name": kl}, "seed": seed,
              "model": {"name": "tiny"}, "task": {"name": task, "eval_size": 100}, "prompts_per_step": 4,
              "group_size": 2}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"steps": last, "time/elapsed": last * step_s, "initial": ev(0),
                                                  "final": ev(last)}))
    return run


# algorithms: DASH gains in both runs; GRPO seed 0 never gains, seed 1 gains 6 points; 3 s per GRPO step
CROSSINGS = [("dash", 0, {0: 0.40, 10: 0.50, 20: 0.60, 30: 0.60}, 1.0),
             ("dash", 1, {0: 0.40, 10: 0.45, 20: 0.70, 30: 0.60}, 2.0),
             ("grpo", 0, {0: 0.40, 10: 0.38, 20: 0.39, 30: 0.40}, 3.0),
             ("grpo", 1, {0: 0.40, 10: 0.42, 20: 0.44, 30: 0.46}, 3.0)]


@pytest.mark.unit
def test_time_to_accuracy_finds_the_first_crossing_and_counts_runs_that_never_get_there(tmp_path):
    for label, seed, evals, step_s in CROSSINGS:
        write_run(tmp_path, "algorithms", label, seed, evals, step_s)
    runs, steps = load_runs(tmp_path)
    points = F.eval_points(runs, steps, "arith")
    assert list(points.loc[points["label"] == "dash", "step"]) == [0, 10, 20, 30] * 2
    # the final evaluation (its own row) gets the clock of its step's training row; step 0 is 0 s
    d1 = points[(points["label"] == "dash") & (points["seed"] == 1)]
    assert list(d1["time_s"]) == [0, 20, 40, 60] and list(d1["samples"]) == [0, 80, 160, 240]
    assert list(d1["final"]) == [False, False, False, True]
    # the base is 40%, the lowest final mean 43% (GRPO): targets halfway (41.5 -> 41) and all the way
    assert F.default_targets(points) == [0.41, 0.43]

    reach = T.time_to_accuracy(points).set_index(["target_name", "label", "run_dir"]).sort_index()

    def per_run(name: str, label: str) -> list:
        return [None if pd.isna(t) else t for t in reach.loc[(name, label), "time_s"]]

    # 50% of the gain: DASH 0.50 at step 10 (10 s) and step 20 (0.70; 40 s); GRPO seed 1: 0.43 at step 20 (60 s)
    assert per_run("50% of gain", "dash") == [10, 40] and per_run("50% of gain", "grpo") == [None, 60]
    # 90%: 0.58 at step 20 for both DASH runs; GRPO seed 1: 0.454 only at the final evaluation (step 30, 90 s)
    assert per_run("90% of gain", "dash") == [20, 40] and per_run("90% of gain", "grpo") == [None, 90]
    assert per_run("≥ 41%", "dash") == [10, 20] and per_run("≥ 41%", "grpo") == [None, 30]
    assert not reach.loc[("50% of gain", "grpo"), "reached"].iloc[0]  # no gain: never reaches a fraction of it

    table = T.table3_time_to_accuracy(runs, steps)
    assert "| arith 50% of gain | GRPO | 1/2 | 60.0 | 160 | 20 |" in table
    assert "| arith 50% of gain | DASH | 2/2 | 25.0 ± 21.2 | 120 ± 57 | 15 ± 7 |" in table
    assert "| arith 90% of gain | GRPO | 1/2 | 90.0 | 240 | 30 |" in table
    assert "| arith ≥ 41% | DASH | 2/2 | 15.0 ± 7.1 | 80 ± 0 | 10 ± 0 |" in table  # both at step 10
    assert "| arith ≥ 43% | GRPO | 1/2 | 60.0 | 160 | 20 |" in table
    assert "start at 67-87% of their own final accuracy" in table  # why fractions of the final are degenerate
    never = T.table3_time_to_accuracy(runs, steps, targets=[0.9])
    assert "| arith ≥ 90% | DASH | 0/2 | – | – | – |" in never and "90% (given)" in never


def _load(root: Path, sweep: str, specs: list[tuple], seeds: tuple[int, ...] = (0, 1), **kw
          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`seeds` per (label, start, final, extra kwargs of write_run) spec, 10 steps; seed k ends k points higher (so
    every paired difference is the same and the interval is that point)."""
    for label, start, final, extra in specs:
        for seed in seeds:
            write_run(root, sweep, label, seed, {0: start, 5: (start + final) / 2, 10: final + seed / 100},
                      **{**kw, **extra})
    return load_runs(root)


@pytest.mark.unit
def test_finding1_verdict_follows_dash_vs_sft(tmp_path):
    def verdict(sft_m: float, sft_h: float, name: str) -> FD.Verdict:
        specs = [("dash", 0.4, 0.6, {}), ("sft_m", 0.4, sft_m, {}), ("sft_h", 0.4, sft_h, {}), ("base", 0.4, 0.4, {})]
        return FD.finding1(*_load(tmp_path / name, "sft_vs_rl", specs))

    assert verdict(0.5, 0.1, "a").verdict == "yes"
    flipped = verdict(0.7, 0.1, "b")
    assert flipped.verdict == "partly" and "SFT-M 70.5 ± 0.7 (n=2, SE 4.6)" in flipped.evidence
    assert flipped.parts == {"DASH > SFT-M": "no", "DASH > SFT-H": "yes"}
    assert "DASH − SFT-M: -10.0 [-10.0, -10.0] points (95% CI, paired by seed, n=2; P(improve) 0.00)" \
        in flipped.evidence
    assert "Why not: SFT-M gains +30.5 points over the base in 10 steps" in flipped.evidence
    assert verdict(0.7, 0.7, "c").verdict == "no"


@pytest.mark.unit
def test_finding2_verdict_follows_ppo_accuracy_and_collapse(tmp_path):
    def verdict(multi: float, mini: float, name: str) -> FD.Verdict:
        specs = [("dash", 0.4, 0.55, {}), ("ppo_multi", 0.4, multi, {}), ("ppo_mini", 0.4, mini, {})]
        return FD.finding2(*_load(tmp_path / name, "pg_vs_ppo", specs, seeds=(0, 1, 2, 3)))

    yes = verdict(0.60, 0.05, "a")  # Multi above DASH, Mini collapses in 4 of 4 runs (Fisher p = 1/70)
    assert yes.verdict == "yes" and "PPO Mini 4/4" in yes.evidence and "DASH 0/4" in yes.evidence
    assert "PPO Mini 0.01" in yes.evidence
    assert verdict(0.45, 0.05, "b").verdict == "partly"
    # Mini ends 2.5 points below its start on average: within the collapse margin; nothing collapses, so whether PPO
    # is less stable cannot be told
    no = verdict(0.45, 0.37, "c")
    assert no.parts == {"accuracy": "no", "stability": "inconclusive"} and no.verdict == "partly"
    assert "Why not (accuracy)" in no.evidence and "No PPO variant collapsed" in no.evidence
    assert "Inconclusive (stability)" in no.evidence and "SEEDS=5" in no.evidence


@pytest.mark.unit
def test_finding3_verdict_follows_length_and_accuracy_without_kl(tmp_path):
    def verdict(off_final: float, off_lengths: tuple, name: str) -> FD.Verdict:
        specs = [("dash", 0.4, 0.5, {"kl": "on", "lengths": (30.0, 40.0)}),
                 ("dash", 0.4, off_final, {"kl": "off", "lengths": off_lengths})]
        return FD.finding3(*_load(tmp_path / name, "kl", specs))

    yes = verdict(0.6, (30.0, 32.0), "a")
    assert yes.verdict == "yes" and "Why not" not in yes.evidence
    assert "(mean of the last step) 40.0 ± 0.0 (n=2) -> 32.0 ± 0.0 (n=2) tokens" in yes.evidence
    assert "-> 60.5 ± 0.7 (n=2, SE 4.9)" in yes.evidence
    no = verdict(0.45, (30.0, 45.0), "b")
    assert no.verdict == "no" and "Why not (length)" in no.evidence and "Why not (accuracy)" in no.evidence


@pytest.mark.unit
def test_finding4_verdict_follows_time_and_accuracy(tmp_path):
    def verdict(dash_step_s: float, dash_final: float, name: str) -> FD.Verdict:
        specs = [("grpo", 0.4, 0.5, {"step_s": 3.0}), ("dash", 0.4, dash_final, {"step_s": dash_step_s})]
        return FD.finding4(*_load(tmp_path / name, "algorithms", specs))

    yes = verdict(1.0, 0.5, "a")
    assert yes.verdict == "yes" and "DASH 3.00x faster" in yes.evidence
    # time to GRPO's final mean (50.5%): both first reach it at the final evaluation (step 10)
    assert "DASH 10.0 s (reached 1/2)" in yes.evidence and "GRPO 30.0 s (reached 1/2)" in yes.evidence
    assert verdict(4.0, 0.5, "b").verdict == "partly"
    assert verdict(4.0, 0.3, "c").verdict == "no"


@pytest.mark.unit
def test_code_tables_and_findings_use_pass_at_k_beside_the_papers_numbers(tmp_path):
    finals = {"base": 0.2, "sft_h": 0.3, "grpo": 0.5, "no_gf": 0.5, "dash": 0.5}
    for label, final in finals.items():
        for seed in (0, 1):
            write_run(tmp_path, "code", label, seed, {0: 0.2, 10: final + seed / 100}, task="pycode",
                      step_s=3.0 if label == "grpo" else 1.0)
    runs, steps = load_runs(tmp_path)
    table2 = T.table2(runs, steps)
    # Base: the initial evaluation; pass@1 = 0.8 x 20%, pass@8 = 1.5 x 20%
    assert "| Base | 2.6 | 22.8 | 7.1 | 60.5 | 16.0 ± 0.0 | 30.0 ± 0.0 | 20.0 ± 0.0 |" in table2
    assert "| SFT-H | 8.77 | 29.0 | 19.3 | 42.1 | 24.4 ± 0.6 |" in table2 and "+16.0 [+16.0, +16.0]" in table2
    table4 = T.table4(runs, steps)
    assert "| GRPO | 35.3 | 11.4 | 49.1 |" in table4 and "| DASH | 16.5 | 11.4 | 40.4 |" in table4
    assert "3.00x" in table4
    code = {v.number: v for v in FD.verdicts(runs, steps)}
    assert code["1 (code)"].parts == {"DASH > SFT-H": "yes"} and "pass@1 (%" in code["1 (code)"].evidence
    assert code["4 (code)"].parts == {"faster": "yes", "equal accuracy": "yes"}
    assert code[1].verdict.startswith("not run")  # the math sweeps did not run


@pytest.mark.unit
def test_findings_section_says_which_sweeps_were_not_run(tmp_path):
    for label, seed, evals, step_s in CROSSINGS:
        write_run(tmp_path / "runs", "algorithms", label, seed, evals, step_s)
    runs, steps = load_runs(tmp_path / "runs")
    section = FD.findings_section(runs, steps)
    assert section.startswith("## Findings")
    for number, sweep in ((1, "sft_vs_rl"), (2, "pg_vs_ppo"), (3, "kl")):
        assert f"**Finding {number}.**" in section and f"not run (make sweep SWEEP={sweep})" in section
    assert "**Finding 4.**" in section and section.count("not run") == 3
    # make_figures writes it at the top of the index, with the time-to-accuracy table and figure of finding 4
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 0
    index = (tmp_path / "figures" / "README.md").read_text()
    assert index.index("## Findings") < index.index("## Finding 4:") < index.index("### Time to accuracy")
    assert (tmp_path / "figures" / "fig_time_to_accuracy.png").stat().st_size > 10_000
    # the intervals finding 4's verdict rests on, drawn and linked from the Findings section
    assert (tmp_path / "figures" / "fig_verdicts.png").stat().st_size > 10_000
    assert index.index("(fig_verdicts.png)") < index.index("## Finding 4:")
    # --readme writes what the runs found between the markers of a Markdown file, and nothing else
    readme = tmp_path / "README.md"
    readme.write_text("# top\n<!-- reproduce:begin -->\nstale\n<!-- reproduce:end -->\nbottom\n")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "figures"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# top\n<!-- reproduce:begin -->\nGenerated by") and text.endswith("end -->\nbottom\n")
    assert "stale" not in text and "from 4 runs finished" in text and "seeds 0, 1 per configuration" in text
    assert "| 4 | equal accuracy |" in text and "| 4 | faster |" in text and "**Finding 4.**" in text


# -------------------------------------------------------------------------------------------------- notebooks
@pytest.mark.unit
def test_notebooks_are_generated_and_have_no_outputs(tmp_path):
    import nbformat

    from analysis.write_notebooks import write_all

    for path in write_all(tmp_path):
        committed = NOTEBOOKS / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: python -m analysis.write_notebooks"
        nb = nbformat.read(committed, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(f.sweep for f in FINDINGS)


@pytest.mark.integration
@pytest.mark.parametrize("sweep", [f.sweep for f in FINDINGS])
def test_notebook_executes_headless_and_shows_figures_and_tables(sweep, sweeps, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DASH_EXP_RUNS", str(sweeps))
    monkeypatch.setenv("DASH_EXP_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{sweep}.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/markdown" in o.get("data", {}) and "| method |" in o["data"]["text/markdown"]
              or "| inference_batch |" in o.get("data", {}).get("text/markdown", "")]
    finding = next(f for f in FINDINGS if f.sweep == sweep)
    assert len(images) == len(finding.figures) and len(tables) == len(finding.tables)


@pytest.mark.unit
def test_table_learning_shows_each_seeds_before_and_after_and_the_cli_prints_it(frames, sweeps, capsys):
    runs, steps = frames
    off = runs[(runs["sweep"] == "kl") & (runs["kl"] == "off")]
    md = T.table_learning(off, steps, "kl")
    for _, run in off.iterrows():
        before, after = (100 * run[f"{part}/eval/arith/accuracy"] for part in ("initial", "final"))
        assert f"| greedy | {run['seed']} | {before:.1f} | {after:.1f} | {after - before:+.1f} |" in md
    assert "| greedy | mean ± std |" in md and "| sampled | mean ± std |" in md and "(95% CI)" in md
    # python -m analysis.tables: the table of a sweep's runs; a sweep without runs exits 1
    assert T.main(["table_learning", "--runs", str(sweeps / "kl"), "--sweep", "kl"]) == 0
    assert "## Held-out accuracy before and after training: sweep kl" in capsys.readouterr().out
    assert T.main(["table_learning", "--runs", str(sweeps / "kl")]) == 1


@pytest.mark.unit
def test_the_ablation_report_runs_on_the_papers_sweep_and_gives_the_findings_numbers(sweeps, frames):
    """analysis.ablate on a real sweep of the paper (algorithms): it finds the three arms itself, and its DASH − GRPO
    contrast is the one Finding 4 reports (the Findings read their values through the same engine)."""
    from analysis.ablate import Metric, ablation, arm_keys

    runs, steps = sweep_frames(*frames, "algorithms")
    assert arm_keys(runs) == ["algorithm.label"]
    acc = Metric.parse(f"final/eval/{T.eval_sets(runs)[0]}/accuracy")
    table = ablation(runs, steps, [acc], baseline="grpo").set_index("arm")
    assert set(table.index) == {"grpo", "no_gf", "dash"} and table.loc["grpo", "verdict"] == "baseline"
    finding = FD.finding4(runs, steps)
    c = finding.comparisons["equal accuracy"]
    assert (table.loc["dash", "diff"], table.loc["dash", "low"], table.loc["dash", "high"]) == (c.diff, c.low, c.high)


@pytest.mark.unit
def test_budget_is_the_median_training_time_of_one_arm(sweeps, capsys):
    import json
    import math

    from analysis.budget import main as budget_main

    times = sorted(json.loads((d / "summary.json").read_text())["time/elapsed"]
                   for d in (sweeps / "pg_vs_ppo").iterdir() if d.name.split("_", 1)[1].startswith("dash_"))
    assert len(times) == 2
    assert budget_main(["--runs", str(sweeps / "pg_vs_ppo"), "--label", "dash", "--kl", "off"]) == 0
    assert capsys.readouterr().out.strip() == str(math.ceil((times[0] + times[1]) / 2))
    assert budget_main(["--runs", str(sweeps / "pg_vs_ppo"), "--label", "dash", "--kl", "on"]) == 1
    assert "no finished run of label=dash kl=on" in capsys.readouterr().err
    seed1 = json.loads((sweeps / "pg_vs_ppo" / "1_dash_kl-off_seed1" / "summary.json").read_text())["time/elapsed"]
    assert budget_main(["--runs", str(sweeps / "pg_vs_ppo"), "--label", "dash", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(math.ceil(seed1))
    assert budget_main(["--runs", str(sweeps / "pg_vs_ppo"), "--label", "dash", "--seed", "7"]) == 1
    assert "label=dash seed=7" in capsys.readouterr().err


# the arms of each finding in ONE sweep directory, each shared arm once (sweeps/smollm2_findings.yaml's layout):
# every run of sft_vs_rl (DASH without KL among them), then the other findings' own arms
ALL_FINDINGS = {"sft_vs_rl": "", "algorithms": ("grpo_", "no_gf_"), "pg_vs_ppo": ("ppo_",), "kl": ("dash_kl-on",)}


def all_findings_sweep(sweeps: Path, root: Path) -> Path:
    import yaml

    for sweep, prefixes in ALL_FINDINGS.items():
        for run in (sweeps / sweep).iterdir():
            if run.is_dir() and run.name.split("_", 1)[1].startswith(prefixes):
                dst = root / "smollm2_findings" / run.name.split("_", 1)[1]
                shutil.copytree(run, dst)
                config = yaml.safe_load((dst / "config.yaml").read_text())
                config["sweep_name"] = "smollm2_findings"
                (dst / "config.yaml").write_text(yaml.safe_dump(config))
                if config["algorithm"]["label"] == "base":  # the SFT-M teacher's own evaluation, as a base run
                    teacher = dst.parent / dst.name.replace("base_", "teacher_")
                    shutil.copytree(dst, teacher)
                    config["algorithm"]["label"] = "teacher"
                    (teacher / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.mark.unit
def test_an_all_findings_sweep_reads_as_the_four_findings_sweeps(sweeps, frames, tmp_path):
    from analysis.runs import as_finding_sweeps

    runs, steps = as_finding_sweeps(*load_runs(all_findings_sweep(sweeps, tmp_path / "all")))
    arms = {view: sorted(zip(g["label"], g["kl"], g["seed"], strict=True)) for view, g in runs.groupby("sweep")}
    dash = [("dash", "off", 0), ("dash", "off", 1)]
    assert arms == {
        "sft_vs_rl": sorted([(lb, "off", s) for lb in ("base", "teacher", "sft_h", "sft_m", "dash") for s in (0, 1)]),
        "algorithms": sorted([(lb, "off", s) for lb in ("grpo", "no_gf") for s in (0, 1)] + dash),
        "pg_vs_ppo": sorted([(lb, "off", s) for lb in ("ppo_multi", "ppo_mini") for s in (0, 1)] + dash),
        "kl": sorted([("dash", "on", 0), ("dash", "on", 1)] + dash)}
    # one DASH run per seed, in every view: the same run dir
    assert runs[runs["label"] == "dash"].groupby("seed")["run_dir"].nunique().tolist() == [2, 2]  # kl on and off
    assert set(runs["source_sweep"]) == {"smollm2_findings"}
    # finding 1 reads the same runs as the sft_vs_rl sweep: the same verdict, the same numbers, and the teacher's
    found, tiny = FD.finding1(runs, steps), FD.finding1(*frames)
    assert found.parts == tiny.parts and found.comparisons == tiny.comparisons
    base = FD._acc_stat(runs[runs["sweep"] == "sft_vs_rl"], "base", "arith")
    assert f"; the SFT-M teacher itself {base}. " in found.evidence and "teacher" not in tiny.evidence
    assert found.evidence.replace(f"; the SFT-M teacher itself {base}", "") == tiny.evidence
    # the findings' own sweeps beside it would mix two experiments
    with pytest.raises(ValueError, match="would mix"):
        as_finding_sweeps(*frames)


@pytest.mark.unit
def test_make_figures_views_write_the_real_models_block(sweeps, tmp_path):
    root = all_findings_sweep(sweeps, tmp_path / "all")
    readme = tmp_path / "README.md"
    readme.write_text("# top\n<!-- reproduce-table:begin -->\ntiny\n<!-- reproduce-table:end -->\n"
                      "<!-- reproduce-smollm2-table:begin -->\nstale\n<!-- reproduce-smollm2-table:end -->\n")
    assert main(["--runs", str(root), "--views", "--out", str(tmp_path / "figures"), "--readme", str(readme),
                 "--block", "reproduce-smollm2"]) == 0
    text = readme.read_text()
    assert "\ntiny\n" in text and "stale" not in text  # only its own block
    block = text.split("<!-- reproduce-smollm2-table:begin -->")[1]
    assert "from 20 runs finished" in block and "--views" in block
    assert "Runs per arm: " in block and "DASH 2, DASH with KL 2" in block and "compute time of all runs" in block
    for row in ("| 1 | DASH > SFT-M |", "| 2 | PPO Multi > DASH |", "| 3 | shorter |", "| 4 | faster |"):
        assert row in block
    index = (tmp_path / "figures" / "README.md").read_text()
    assert "Finding 3" in index and (tmp_path / "figures" / "fig5.png").stat().st_size > 10_000
    # the findings' own sweeps beside it: a one-line error
    assert main(["--runs", str(sweeps), "--views", "--out", str(tmp_path / "f2")]) == 1


@pytest.mark.unit
def test_the_blocks_compute_time_counts_each_runs_evaluations_once(sweeps, tmp_path):
    """The block's compute time adds the runs' held-out evaluations (`time/eval` rows: start, periodic, end) to
    their training time; a run that several findings' views hold (DASH) counts once."""
    from analysis.runs import as_finding_sweeps

    root = all_findings_sweep(sweeps, tmp_path / "all")
    runs, steps = as_finding_sweeps(*load_runs(root))
    assert runs["run_dir"].nunique() < len(runs)  # the views repeat the shared runs
    rows = [json.loads(line) for f in root.rglob("metrics.jsonl") for line in f.read_text().splitlines() if line]
    expected = sum(r["time/eval"] for r in rows if "time/eval" in r)
    assert expected > 0
    assert FD._eval_seconds(runs, steps) == pytest.approx(expected, rel=1e-12)
    training = sum(json.loads((d / "summary.json").read_text())["time/elapsed"] for d in root.glob("*/*/"))
    block = FD.results_section(runs, steps, paragraphs=False)
    assert (f"compute time of all runs together {(training + expected) / 3600:.2f} h: training "
            f"{training / 3600:.2f} h, held-out evaluations {expected / 3600:.2f} h") in block


@pytest.mark.unit
def test_collect_keeps_each_finished_runs_compact_outputs_and_nothing_else(sweeps, tmp_path, capsys):
    from analysis.collect import main as collect_main

    sweep = tmp_path / "multirun" / "kl"
    shutil.copytree(sweeps / "kl", sweep)
    done = sweep / "0_dash_kl-on_seed0"
    (done / "checkpoints" / "step_2").mkdir(parents=True)
    (done / "checkpoints" / "step_2" / "state.pt").write_bytes(b"weights")
    (done / "run.log").write_text("log")
    (sweep / "1_dash_kl-on_seed1" / "summary.json").unlink()  # killed before it finished
    out = tmp_path / "results" / "kl"
    (out / "stale_run").mkdir(parents=True)
    assert collect_main(["--runs", str(sweep), "--out", str(out)]) == 0
    assert "3 finished runs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["0_dash_kl-on_seed0", "2_dash_kl-off_seed0", "3_dash_kl-off_seed1"]
    assert sorted(p.name for p in (out / "0_dash_kl-on_seed0").iterdir()) == ["config.yaml", "metrics.jsonl",
                                                                               "summary.json"]
    # the analysis reads the collected runs as it reads the sweep's, and when each finished survives a copy that
    # keeps no file times (git): the copy's summary records it
    runs, _ = load_runs(out)
    assert len(runs) == 3 and set(runs["sweep"]) == {"kl"}
    source = (done / "summary.json").stat().st_mtime
    assert json.loads((out / done.name / "summary.json").read_text())["finished_at"] == source
    cloned = tmp_path / "clone"
    shutil.copytree(out, cloned, copy_function=shutil.copy)  # new file times
    again, _ = load_runs(cloned)
    assert sorted(again["finished_at"]) == sorted(runs["finished_at"]) and source in set(again["finished_at"])


@pytest.mark.unit
def test_agreement_puts_two_models_verdicts_side_by_side_and_names_where_they_differ(sweeps, tmp_path, capsys):
    from analysis.agreement import BEGIN, END, agreement, findings_frame
    from analysis.agreement import main as agreement_main

    # two "models": the same runs as one all-findings sweep twice, the second with SFT-M's final accuracy set to 1
    same, flipped = all_findings_sweep(sweeps, tmp_path / "same"), all_findings_sweep(sweeps, tmp_path / "flipped")
    for run in flipped.rglob("sft_m_kl-off_seed*"):
        summary = json.loads((run / "summary.json").read_text())
        summary["final"] = {k: (1.0 if k.endswith("accuracy") else v) for k, v in summary["final"].items()}
        (run / "summary.json").write_text(json.dumps(summary))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[-1] = {k: (1.0 if k.startswith("eval/") and k.endswith("accuracy") else v) for k, v in rows[-1].items()}
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def verdict(frame):
        return frame[(frame["finding"].astype(str) == "1") & (frame["part"] == "DASH > SFT-M")]["verdict"].item()

    base = findings_frame(same)
    assert verdict(base) == "yes" and verdict(findings_frame(flipped)) == "no"
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n{BEGIN}\nstale\n{END}\nafter\n")
    assert agreement_main(["--runs", f"real={same}", "--runs", f"other={flipped}", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.endswith(f"{END}\nafter\n")
    table = text.split(BEGIN)[1]
    assert "| finding | compared | real | other | verdicts |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(base) and all(row.endswith(("| same |", "| opposite |")) for row in rows)
    row = next(line for line in rows if line.startswith("| 1 | DASH > SFT-M |"))
    assert row.endswith("| opposite |") and row.count(": **yes** |") == 1 and row.count(": **no** |") == 1
    assert [line for line in rows if not line.endswith("| same |")] == [row]
    assert f"Of the {len(rows)} pairs that every model ran: the same verdict on {len(rows) - 1}; opposite on 1 " \
           "(1 DASH > SFT-M)." in table
    # a verdict decided on one model and inconclusive on the other is not a disagreement
    assert agreement(["yes", "inconclusive"]) == agreement(["inconclusive", "no"]) == "undecided on one"
    assert agreement(["no", "no", "no"]) == "same" and agreement(["yes", "inconclusive", "no"]) == "opposite"
    # pairs only one model ran (the tiny model's code task) are shown, not compared
    assert agreement_main(["--runs", f"tiny={sweeps}", "--runs", f"real={same}"]) == 0
    code = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 (code)", "| 4 (code)"))]
    assert len(code) == 3 and all("| not run | – |" in line for line in code)
    # bad input: one line naming it
    assert agreement_main(["--runs", f"tiny={sweeps}", "--runs", "real"]) == 1
    assert "--runs 'real': expected NAME=DIR" in capsys.readouterr().err


# the Markdown files whose generated result blocks `make figures` rewrites from the committed results/
GENERATED = ("README.md", "docs/reproducing.md", "docs/real-model.md")


@pytest.mark.integration
def test_make_figures_alone_remakes_the_committed_result_blocks_from_the_committed_results(tmp_path, cli_env):
    # what a fresh clone does: `make figures` (no training, no multirun/) on the committed results/; every generated
    # block of the committed READMEs is what it writes (a stale one: run `make figures` and commit)
    for name in GENERATED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    if (REPO / "results").is_dir():
        (tmp_path / "results").symlink_to(REPO / "results")
    env = {**cli_env, "PYTHONPATH": str(REPO)}  # analysis/ is imported from the checkout, as make runs it there
    proc = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "figures", "STAMP=",
                           f"BIN={Path(sys.executable).parent}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{name}: a stale generated block"
    for results, figures in (("tiny", "figures"), ("smollm2_findings", "figures/smollm2")):
        assert (tmp_path / figures / "fig5.png").is_file() == (REPO / "results" / results).is_dir()
