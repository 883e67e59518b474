"""A run killed at any moment (SIGKILL) resumes from its last checkpoint and ends exactly where an
uninterrupted run ends: same weights (bit-exact on CPU with fixed threads), same metrics but timings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TEST_OVERRIDES, final_weights, untimed_rows

from dash_exp.checkpoint import latest_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ARGS = ["algorithm=dash", "steps=6", "save_every=3", *[o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]]
def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dash_exp.run", *ARGS, f"hydra.run.dir={run_dir}"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, cli_env):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), cwd=REPO, env=cli_env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(command(killed), cwd=REPO, env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_00000003" / "meta.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()

    resumed = subprocess.run(command(killed), cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((killed / "summary.json").read_text())["resumed"] is True
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed_rows(killed) == untimed_rows(straight)


def test_a_write_killed_midway_leaves_the_previous_checkpoint_in_use(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    first = subprocess.run([*command(run_dir)[:-1], "steps=3", f"hydra.run.dir={run_dir}"], cwd=REPO, env=cli_env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    # what a SIGKILL during the next save leaves behind: a temp dir with a truncated state file
    partial = run_dir / "checkpoints" / ".tmp_killed"
    partial.mkdir()
    good = (run_dir / "checkpoints" / "step_00000003" / "state.pt").read_bytes()
    (partial / "state.pt").write_bytes(good[: len(good) // 2])
    assert latest_checkpoint(run_dir).name == "step_00000003"
    resumed = subprocess.run(command(run_dir), cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == 6
    assert not partial.exists(), "the partial write was not cleaned up"
