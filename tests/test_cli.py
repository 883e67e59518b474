"""The one entrypoint as a user runs it: Hydra multirun, run dirs, offline W&B; the traces CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES

from dash_exp.tasks.traces import load_traces

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SMALL = [o for o in TEST_OVERRIDES if not o.startswith(("logger=", "run_dir="))]


def run_cli(args, cli_env, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=cli_env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_multirun_makes_one_complete_run_dir_per_job_with_offline_wandb(tmp_path, cli_env):
    sweep = tmp_path / "sweep"
    run_cli(["dash_exp.run", "-m", "algorithm=grpo,dash", "kl=on,off", "steps=2", *SMALL, "logger=wandb",
             f"hydra.sweep.dir={sweep}"], cli_env)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "config.yaml").exists())
    assert [p.name.split("_", 1)[1] for p in jobs] == [
        "grpo_kl-on_tiny", "grpo_kl-off_tiny", "dash_kl-on_tiny", "dash_kl-off_tiny"]
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 2
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert {r["step"] for r in rows} == {0, 1, 2}
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and list(offline[0].glob("*.wandb")), f"no offline W&B run in {job}"


def test_traces_cli_writes_correct_traces_that_sft_can_train_on(tmp_path, cli_env):
    out = tmp_path / "traces.jsonl"
    proc = run_cli(["dash_exp.traces", "--out", str(out), "--samples", "4", "--max-prompts", "16", *SMALL,
                    f"run_dir={tmp_path}/unused"], cli_env)
    assert "wrote" in proc.stdout
    traces = load_traces(out)
    assert traces and all(t.solution.endswith("\\boxed{" + t.answer + "}") for t in traces)
    run_cli(["dash_exp.run", "algorithm=sft", "algorithm.sft_source=traces", f"algorithm.traces_path={out}",
             "steps=2", *SMALL, "logger=none", f"hydra.run.dir={tmp_path}/sft"], cli_env)
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["steps"] == 2
