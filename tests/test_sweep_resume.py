"""A sweep rerun into its own directory goes on where it stopped: a job that finished with the same config is
skipped (its summary stands), one that did not resumes from its last checkpoint, and a directory holding another
config's run is an error before anything is built."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TEST_OVERRIDES, final_weights, untimed, untimed_rows
from omegaconf import OmegaConf

from dash_exp.checkpoint import latest_checkpoint
from dash_exp.config import ConfigError
from dash_exp.run import ERROR_FILE, config_changes, finished_run, prepare_run_dir

REPO = Path(__file__).resolve().parent.parent
def finish(cfg, summary: dict) -> Path:
    """What a finished run leaves: its config and summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.unit
def test_config_changes_name_what_changes_the_run_and_nothing_else(make_cfg):
    stored = yaml.safe_load(OmegaConf.to_yaml(make_cfg("steps=4", "kl=on"), resolve=True))
    same = make_cfg("steps=4", "kl=on", "logger.project=other", "resume=never", "save_every=2", "keep_checkpoints=5")
    assert config_changes(stored, same) == []
    changes = config_changes(stored, make_cfg("steps=5", "kl=off"))
    assert [c.split(":")[0] for c in changes] == ["kl.beta", "kl.name", "steps"]
    assert changes[1:] == ["kl.name: 'on' -> 'off'", "steps: 4 -> 5"]
    # a knob the schema gained after the run was made: its default is no change (the run ran the old behaviour),
    # another value is
    del stored["model"]["share_prompt"], stored["filter_kl"]
    assert config_changes(stored, make_cfg("steps=4", "kl=on")) == []
    assert config_changes(stored, make_cfg("steps=4", "kl=on", "filter_kl=keep")) == ["filter_kl: None -> 'keep'"]
    # what tune=auto measured and wrote into config.yaml is not a change of the command
    tuned = dict(stored, train_microbatch=2, tune="auto")
    assert config_changes(tuned, make_cfg("steps=4", "kl=on", "tune=auto")) == []
    assert config_changes(dict(stored, train_microbatch=2), make_cfg("steps=4", "kl=on")) == [
        "train_microbatch: 2 -> 4"]


@pytest.mark.unit
def test_a_finished_run_with_the_same_config_is_skipped(make_cfg):
    cfg = make_cfg("steps=4")
    finish(cfg, {"steps": 4, "final": {"x": 1.0}})
    assert finished_run(Path(cfg.run_dir), make_cfg("steps=4", "logger.project=p")) == {"steps": 4,
                                                                                          "final": {"x": 1.0}}
    # resume=never runs it again
    assert finished_run(Path(cfg.run_dir), make_cfg("steps=4", "resume=never")) is None


@pytest.mark.unit
def test_a_dir_holding_another_configs_finished_run_is_an_error_naming_the_key(make_cfg, capsys):
    cfg = make_cfg("steps=4", "lr=0.001")
    run_dir = finish(cfg, {"steps": 4})
    with pytest.raises(ConfigError, match=r"holds a finished run with another config \(lr: 0.001 -> 0.002\).*"
                                          "resume=never"):
        finished_run(run_dir, make_cfg("steps=4", "lr=0.002"))
    # an unfinished run with a checkpoint resumes under whatever changed (a layout of ranks, a dead generator),
    # saying what did
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "meta.json").write_text(json.dumps({"step": 2}))
    assert latest_checkpoint(run_dir) is not None
    assert finished_run(run_dir, make_cfg("steps=4", "lr=0.002")) is None
    assert "resuming step_00000002 under a changed config: lr: 0.001 -> 0.002" in capsys.readouterr().out
    assert finished_run(run_dir, make_cfg("steps=4", "lr=0.001")) is None
    assert capsys.readouterr().out == ""


@pytest.mark.unit
def test_a_finished_run_is_continued_under_more_steps_from_its_final_checkpoint(make_cfg):
    cfg = make_cfg("steps=4")
    run_dir = finish(cfg, {"steps": 4})
    # its final checkpoint gone: nothing to continue from
    with pytest.raises(ConfigError, match=r"no checkpoint to continue from \(steps: 4 -> 8\)"):
        finished_run(run_dir, make_cfg("steps=8"))
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "meta.json").write_text(json.dumps({"step": 4}))
    assert finished_run(run_dir, make_cfg("steps=8")) is None  # not skipped: it goes on from step 4
    assert finished_run(run_dir, make_cfg("steps=4")) == {"steps": 4}
    with pytest.raises(ConfigError, match="lr: "):
        finished_run(run_dir, make_cfg("steps=8", "lr=0.5"))


@pytest.mark.unit
def test_an_earlier_attempts_error_and_a_restarted_runs_summary_move_to_previous(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ERROR_FILE).write_text("Traceback ...\nRuntimeError: boom")
    assert prepare_run_dir(run_dir, "auto") is None
    assert not (run_dir / ERROR_FILE).exists()
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    prepare_run_dir(run_dir, "never")
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()
    kept = sorted(p.name for p in (run_dir / "previous").rglob("*") if p.is_file())
    assert kept == [ERROR_FILE, "metrics.jsonl", "summary.json"]


# the killed sweep: two jobs (seeds 0 and 1) of 6 DASH steps, a checkpoint every 3
SWEEP = ["-m", "seed=0,1", "algorithm=dash", "steps=6", "save_every=3",
         *[o for o in TEST_OVERRIDES if not o.startswith("run_dir=")], "hydra.sweep.subdir=job${hydra.job.num}"]


def sweep(sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dash_exp.run", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]


def files(run_dir: Path) -> dict[str, int]:
    """Each file of a run and when it was last written, leaving out Hydra's own .hydra/ (rewritten per launch)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.relative_to(run_dir).parts}


@pytest.mark.integration
def test_a_sweep_killed_in_its_second_job_reruns_only_what_was_left(tmp_path, cli_env):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(sweep(straight), cwd=REPO, env=cli_env, check=True, capture_output=True, timeout=900)

    proc = subprocess.Popen(sweep(killed), cwd=REPO, env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "job1" / "checkpoints" / "step_00000003" / "meta.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before job 1's checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "job0" / "summary.json").exists() and not (killed / "job1" / "summary.json").exists()
    first = files(killed / "job0")

    rerun = subprocess.run(sweep(killed), cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{killed / 'job0'}: finished before with this config: skipped" in rerun.stdout
    assert files(killed / "job0") == first, "job 0 ran again"
    # job 1 resumed from its step-3 checkpoint
    assert json.loads((killed / "job1" / "summary.json").read_text())["resumed"] is True
    for job in ("job0", "job1"):
        a, b = final_weights(straight / job), final_weights(killed / job)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job
        assert untimed_rows(killed / job) == untimed_rows(straight / job), job
        ours = json.loads((killed / job / "summary.json").read_text())
        theirs = json.loads((straight / job / "summary.json").read_text())
        assert untimed(ours["final"]) == untimed(theirs["final"]) and ours["steps"] == theirs["steps"] == 6
