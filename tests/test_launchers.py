"""Sweeps through Hydra's launchers, for real: submitit's local executor (SLURM's code path), joblib in parallel,
and the SLURM preset as composed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_OVERRIDES

from analysis.make_figures import main as make_figures
from analysis.runs import load_runs

pytestmark = pytest.mark.integration

SMALL = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]


def sweep(sweep_dir: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dash_exp.run", "-m", "steps=2", *SMALL, *overrides,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def step_rewards(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["reward/mean"] for r in rows if "time/step" in r]


def test_submitit_local_records_a_failed_job_and_completes_the_other(tmp_path, cli_env):
    sweep_dir = tmp_path / "sweep"
    # job 1 asks for more held-out problems than there are: it raises inside the job
    proc = sweep(sweep_dir, cli_env, "hydra/launcher=submitit_local", "task.eval_size=8,500", "sweep_name=kl")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the end-of-sweep report fails the sweep
    assert "1 job(s) of the sweep failed" in proc.stderr
    done, failed = jobs(sweep_dir)
    assert (done / "summary.json").exists() and (done / "metrics.jsonl").exists()
    assert not (failed / "summary.json").exists()
    assert "task.eval_size=500: expected <= task.n_test=16" in (failed / "error.txt").read_text()
    # make figures reads the sweep: the finished run, the failed one named
    runs, _ = load_runs(sweep_dir)
    assert list(runs["run_dir"]) == [str(done)]
    assert make_figures(["--runs", str(sweep_dir), "--out", str(tmp_path / "figures")]) == 0
    assert "task.eval_size=500" in (tmp_path / "figures" / "README.md").read_text()


@pytest.mark.dist
def test_a_submitit_job_of_two_tasks_is_one_data_parallel_run(tmp_path, cli_env):
    # what hydra/launcher=slurm with tasks_per_node=8 does on a GPU node: each task a rank
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, cli_env, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "seed=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = jobs(sweep_dir)
    assert json.loads((job / "summary.json").read_text())["world_size"] == 2
    assert len(step_rewards(job)) == 2  # rank 0 alone logged


def test_joblib_runs_jobs_concurrently_with_the_basic_launchers_results(tmp_path, cli_env):
    basic, parallel = tmp_path / "basic", tmp_path / "parallel"
    assert sweep(basic, cli_env, "seed=0,1").returncode == 0
    proc = sweep(parallel, cli_env, "seed=0,1", "hydra/launcher=local_parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each job writes config.yaml when it starts and summary.json when it ends: the two jobs overlap
    spans = [((job / "config.yaml").stat().st_mtime, (job / "summary.json").stat().st_mtime)
             for job in jobs(parallel)]
    print(f"joblib jobs (start, end): {spans}")
    assert len(spans) == 2 and max(start for start, _ in spans) < min(end for _, end in spans)
    for a, b in zip(jobs(basic), jobs(parallel), strict=True):
        assert step_rewards(a) == step_rewards(b)
        final = [{k: v for k, v in json.loads((d / "summary.json").read_text())["final"].items()
                  if not k.startswith("time/")} for d in (a, b)]
        assert final[0] == final[1]


def test_the_slurm_preset_composes_with_submitit_settings(cli_env):
    proc = subprocess.run([sys.executable, "-m", "dash_exp.run", "hydra/launcher=slurm",
                           "hydra.launcher.partition=gpu", "hydra.launcher.tasks_per_node=8", "--cfg", "hydra"],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = proc.stdout.split("launcher:")[1].split("sweeper:")[0]
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "partition: gpu", "tasks_per_node: 8", "max_num_timeout: 3", "timeout_min: 1440"):
        assert line in launcher, line
