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



def test_traces_for_a_student_carry_the_students_prompts(tmp_path, cli_env):
    # the CLI path: overrides before and after --student, each trace's prompt one of the student's training prompts
    # with that problem's answer (how the prompts differ is test_student_prompts_are_the_same_problems_asked_the_
    # students_way's)
    from dash_exp.config import compose_config
    from dash_exp.tasks.registry import build_task

    out = tmp_path / "traces.jsonl"
    proc = run_cli(["dash_exp.traces", "--out", str(out), "--samples", "4", "--max-prompts", "16", *SMALL,
                    "--student", "task.n_test=8", f"run_dir={tmp_path}/unused"], cli_env)
    assert "prompts solved" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    student = {p.prompt: p.answer for p in build_task(compose_config([*SMALL, "task.n_test=8"]).task).train}
    assert rows and all(student[row["prompt"]] == row["answer"] for row in rows)


def test_student_prompts_are_the_same_problems_asked_the_students_way():
    # GSM8K: the teacher sees the box-your-answer line (instruct), the student the bare problem (raw)
    from dash_exp.config import compose_config
    from dash_exp.tasks.registry import build_task
    from dash_exp.traces import student_prompts

    teacher = ["task=gsm8k", "task.prompt_format=instruct"]
    problems = build_task(compose_config(teacher).task).train[:12]
    student = compose_config([*teacher, "task.prompt_format=raw"])
    raw = build_task(student.task).train
    prompts = student_prompts(student, problems)
    assert len(prompts) == 12
    for problem, prompt in zip(problems, prompts, strict=True):
        asked = next(p for p in raw if p.prompt == prompt)
        assert (asked.answer, asked.solution) == (problem.answer, problem.solution)
        assert prompt != problem.prompt and prompt.strip() in problem.prompt
    # a student whose split holds other problems is an error, not traces of the wrong problems
    with pytest.raises(ValueError, match="not in the student's training split"):
        student_prompts(compose_config([*teacher, "task=arith"]), problems)
