"""Failure handling: non-finite steps are skipped, counted, and stop the run with the last good weights."""

import json
import mmap

import pytest
import torch

from dash_exp.checkpoint import latest_checkpoint, read_meta
from dash_exp.run import train
from dash_exp.trainer import NonFiniteError


@pytest.mark.integration
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(make_cfg, tmp_path):
    # an absurd learning rate without clipping blows the weights up after the first step
    cfg = make_cfg("algorithm=grpo", "lr=1e6", "grad_clip=null", "steps=8", "max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row had a non-finite loss or gradient"):
        train(cfg)
    run_dir = tmp_path / "run"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counted = [r["loss/nonfinite_steps"] for r in rows if "loss/nonfinite_steps" in r]
    assert counted and counted[-1] >= 1
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["policy"].values()), "the saved weights are not the good ones"
    assert read_meta(ckpt)["nonfinite_total"] >= 2
    # the checkpoint is the end of the step it stopped in: labelled with it, its prompts consumed
    logged = [r["step"] for r in rows if "time/step" in r]
    assert read_meta(ckpt)["step"] == logged[-1]
    assert state["stream"]["consumed"] == logged[-1] * cfg.prompts_per_step


@pytest.mark.integration
def test_a_nonfinite_stop_inside_a_ppo_step_resumes_with_the_next_steps_prompts(make_cfg, tmp_path, monkeypatch):
    """PPO Mini, 4 mini-batch steps per step; from the 6th on, every loss is NaN: step 2's first mini-batch step
    applies, the next two are skipped, the run stops at step 2's end with a checkpoint of step 2 (its prompts
    consumed), and a resumed run goes on with step 3, not step 2 again."""
    import dash_exp.trainer as trainer_module

    real = trainer_module.accumulate_gradients
    calls = []

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 6:
            stats.sums[0] = float("nan")
        return stats

    cfg = make_cfg("algorithm=ppo_mini", "algorithm.ppo_minibatches=4", "filter_threshold=null", "steps=4",
                   "max_nonfinite_steps=2", "save_every=0")
    monkeypatch.setattr(trainer_module, "accumulate_gradients", poisoned)
    with pytest.raises(NonFiniteError, match="as step 2"):
        train(cfg)
    assert len(calls) == 7
    run_dir = tmp_path / "run"
    ckpt = latest_checkpoint(run_dir)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert read_meta(ckpt)["step"] == 2 and state["stream"]["consumed"] == 2 * cfg.prompts_per_step
    monkeypatch.setattr(trainer_module, "accumulate_gradients", real)
    summary = train(cfg)  # resumes from that checkpoint
    assert summary["resumed"] and summary["steps"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "time/step" in r] == [1, 2, 3, 4]


@pytest.mark.integration
def test_a_failing_multirun_job_does_not_stop_the_others(tmp_path, cli_env):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TEST_OVERRIDES

    sweep = tmp_path / "sweep"
    small = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]
    proc = subprocess.run(
        [sys.executable, "-m", "dash_exp.run", "-m", "lr=1e6,1e-4", "grad_clip=null", "max_nonfinite_steps=1",
         "algorithm=grpo", "steps=2", *small, f"hydra.sweep.dir={sweep}"],
        cwd=Path(__file__).resolve().parent.parent, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed, ok = sweep / "0_grpo_kl-off_tiny", sweep / "1_grpo_kl-off_tiny"
    assert "NonFiniteError" in (failed / "error.txt").read_text() and not (failed / "summary.json").exists()
    assert (ok / "summary.json").exists() and not (ok / "error.txt").exists()
    assert "1 job(s) of the sweep failed" in proc.stderr


@pytest.mark.integration
def test_unreachable_wandb_warns_once_and_the_run_completes(make_cfg, tmp_path, monkeypatch):
    # a key, a bad entity, and a server that refuses connections (loopback port 9)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    cfg = make_cfg("logger=wandb", "logger.mode=online", "logger.entity=no-such-entity", "logger.init_timeout=5",
                   "steps=2")
    with pytest.warns(UserWarning, match="W&B disabled for this run") as record:
        train(cfg)
    assert sum("W&B" in str(w.message) for w in record) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 1, 2}
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.integration
def test_online_without_a_key_falls_back_to_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg("logger=wandb", "logger.mode=online", "steps=1")
    with pytest.warns(UserWarning, match="WANDB_API_KEY is not set: logging to W&B offline"):
        train(cfg)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.integration
def test_resuming_a_checkpoint_of_another_model_fails_clearly(make_cfg, tmp_path):
    train(make_cfg("algorithm=grpo", "steps=1"))
    ckpt = latest_checkpoint(tmp_path / "run")
    state = torch.load(ckpt / "state.pt", weights_only=False)
    state["policy"]["model.embed_tokens.weight"] = torch.zeros(3, 3)  # another model's shape
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(ValueError, match=r"step_00000001: checkpoint does not fit the configured model"):
        train(make_cfg("algorithm=grpo", "steps=2"))


@pytest.mark.integration
def test_unreadable_checkpoint_names_the_file(make_cfg, tmp_path):
    train(make_cfg("algorithm=grpo", "steps=1"))
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"state.pt: cannot read checkpoint state"):
        train(make_cfg("algorithm=grpo", "steps=2"))


@pytest.mark.integration
def test_keep_checkpoints_keeps_the_newest(make_cfg, tmp_path):
    train(make_cfg("algorithm=grpo", "steps=4", "save_every=1", "keep_checkpoints=3"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003", "step_00000004"]


@pytest.mark.unit
@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "traces.jsonl:2: invalid JSON"),
    ('{"prompt": "a"}\n', "traces.jsonl:1: field 'response' must be a string (got missing)"),
    ('{"prompt": 3, "response": "b"}\n', "traces.jsonl:1: field 'prompt' must be a string (got int)"),
    ("", "traces.jsonl: no rows (empty file)"),
])
def test_bad_traces_file_names_file_line_and_expectation(tmp_path, content, message):
    from dash_exp.tasks.traces import load_traces

    path = tmp_path / "traces.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_traces(path)


@pytest.mark.unit
def test_missing_traces_file_is_named(tmp_path):
    from dash_exp.tasks.traces import load_traces

    with pytest.raises(FileNotFoundError, match="nope.jsonl: traces file not found"):
        load_traces(tmp_path / "nope.jsonl")


@pytest.mark.unit
def test_peak_memory_window_resets_between_runs():
    from dash_exp.tracking import peak_memory_mb, reset_peak_memory

    reset_peak_memory()
    base = peak_memory_mb()["mem/peak_mb"]
    # touch 300 MiB of fresh pages (an anonymous map: a heap allocation may reuse pages already resident)
    blob = mmap.mmap(-1, 300 * 2**20)
    blob[::4096] = b"x" * len(blob[::4096])
    high = peak_memory_mb()["mem/peak_mb"]
    blob.close()
    reset_peak_memory()
    assert high - base > 250
    assert peak_memory_mb()["mem/peak_mb"] < high - 250, "the peak did not reset: runs of a multirun would share it"
