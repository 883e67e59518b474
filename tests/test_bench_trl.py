"""TRL GRPOTrainer benchmark: one small step in the separate .venv-trl environment (skipped where it is absent)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO

from dash_exp.bench.__main__ import TRL_PYTHON

pytestmark = [pytest.mark.integration, pytest.mark.bench]


def test_trl_grpo_bench_one_step(tmp_path, cli_env):
    if not TRL_PYTHON.exists():
        pytest.skip(f"{TRL_PYTHON.relative_to(REPO)} not found: create the TRL environment first (see "
                    "dash_exp/bench/trl_grpo.py)")
    prompts, group = 2, 4
    out = tmp_path / "trl.json"
    cmd = [str(TRL_PYTHON), "-m", "dash_exp.bench.trl_grpo", "--steps", "1", "--warmup", "0", "--out", str(out),
           f"prompts_per_step={prompts}", f"group_size={group}", "train_microbatch=4", "max_new_tokens=40",
           "task.n_train=64", "task.n_test=16", "task.eval_size=8", "threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples_per_step"] == prompts * group
    assert result["microbatch"] == 4 and result["max_new_tokens"] == 40 and result["threads"] == 1
    assert len(result["step_times"]) == 1 and all(t > 0 for t in result["step_times"])
    assert result["s_per_step_median"] > 0 and result["s_per_step_mean"] > 0
    assert len(result["reward_mean"]) == 1 and all(0.0 <= r <= 1.0 for r in result["reward_mean"])
    assert result["settings"]["loss_type"] == "dapo" and result["settings"]["beta"] == 0.0
    assert result["settings"]["gradient_accumulation_steps"] == prompts * group // 4
