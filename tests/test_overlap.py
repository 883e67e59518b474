"""Overlapped rollout on CPU: real torchrun (gloo), a generator process and trainer processes, the real tiny model.

- the loss of samples from older weights: ratio against the sampler's behaviour log-probs, exactly 1 on-policy;
- rollout.generator_ranks=1 with overlap 0 (the generator waits for every version) is the synchronous run, metric for
  metric; with overlap 1 every sample is from the current or the previous version, as logged;
- FSDP2 over the trainer ranks only (2 trainers + 1 generator);
- no hang: a step that keeps nothing, a generator killed mid-run (the run stops naming it, then resumes), a whole
  run killed with SIGKILL and resumed (no step duplicated or dropped, and with overlap 0 the very same run).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES, kill_tree

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample, response_logprobs
from dash_exp.bench.overlap import summarize_run
from dash_exp.factory import build

SMALL = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]


def torchrun(n: int) -> list[str]:
    # --standalone: a free port of its own (two launches on one machine never meet at torchrun's default 29500)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
            "dash_exp.run"]


def run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r]


def untimed(row: dict) -> dict:
    """A metrics row without what timing decides (times, rates, memory, the overlap's own bookkeeping)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "mem/", "async/"))}


def final(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary["final"].items() if not k.startswith("time/")}


# ------------------------------------------------------------------ the off-policy correction in the update
@pytest.mark.integration
def test_behaviour_logprobs_set_the_ratio_and_fresh_samples_keep_ratio_one(make_cfg):
    parts = build(make_cfg())
    parts.task.close()
    policy, pad = parts.policy.double(), parts.tokenizer.pad_token_id
    rng = random.Random(0)
    vocab = len(parts.tokenizer)
    samples = [TrainSample([rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))],
                           [rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))], advantage=a)
               for a in (1.0, 0.5, -0.7, 1.5)]
    spec = LossSpec()

    def grads(batch):
        policy.zero_grad(set_to_none=True)
        stats = accumulate_gradients(policy, batch, spec, norm=10.0, microbatch=4, pad_id=pad)
        return torch.cat([p.grad.flatten() for p in policy.parameters()]), stats

    on_policy, _ = grads(samples)
    with torch.no_grad():
        current = [row[: len(s.response_ids)] for s, row in
                   zip(samples, response_logprobs(policy, samples, pad)[0], strict=True)]
    # behaviour log-probs equal to the current ones (and a cap): the same gradient as on-policy
    same = [TrainSample(s.prompt_ids, s.response_ids, s.advantage, old_logprobs=lp.clone(), ratio_cap=3.0)
            for s, lp in zip(samples, current, strict=True)]
    assert torch.allclose(grads(same)[0], on_policy, rtol=1e-9, atol=1e-12)
    # the first sample came from a policy that gave each of its tokens 1/1.1 of the current probability: ratio 1.1
    # (inside the clip, A > 0) scales its gradient by 1.1; the others are fresh (ratio exactly 1)
    stale = [TrainSample(s.prompt_ids, s.response_ids, s.advantage) for s in samples]
    stale[0].old_logprobs, stale[0].ratio_cap = current[0] - torch.log(torch.tensor(1.1, dtype=torch.float64)), 3.0
    first_alone, _ = grads(samples[:1])
    mixed, stats = grads(stale)
    expected = on_policy + 0.1 * first_alone
    # (log-probs are taken in float32: the ratio is 1.1 up to its rounding)
    assert float((mixed - expected).norm() / expected.norm()) < 1e-5
    assert float((on_policy - expected).norm() / expected.norm()) > 1e-2  # the 1.1 is seen
    assert stats.clipped == 0 and stats.capped == 0


# ------------------------------------------------------------------ the whole loop, several processes
@pytest.mark.integration
@pytest.mark.dist
def test_generator_waiting_for_every_version_is_the_synchronous_run(tmp_path, cli_env):
    sync, split = tmp_path / "sync", tmp_path / "split"
    args = ["steps=4", "algorithm=ppo", *SMALL]  # PPO Multi: the recomputed old log-probs path too
    one = run([sys.executable, "-m", "dash_exp.run", *args, f"hydra.run.dir={sync}"], cli_env)
    two = run([*torchrun(2), *args, "rollout.generator_ranks=1", "rollout.overlap=0", f"hydra.run.dir={split}"],
              cli_env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    rows_sync, rows_split = step_rows(sync), step_rows(split)
    assert [untimed(r) for r in rows_split] == [untimed(r) for r in rows_sync]  # every metric, exactly
    assert final(split) == final(sync)
    assert all(r["async/staleness_max"] == 0 and r["async/capped_frac"] == 0 for r in rows_split)
    assert all(r["time/generator_idle"] >= 0 and r["time/trainer_idle"] >= 0 for r in rows_split)


@pytest.mark.integration
@pytest.mark.dist
def test_overlap_one_samples_from_the_current_or_the_previous_version(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    proc = run([*torchrun(2), "steps=6", *SMALL, "rollout.generator_ranks=1", "rollout.overlap=1",
                f"hydra.run.dir={run_dir}"], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["async/staleness_max"] == 0  # step 1: the weights the run starts from
    assert all(0 <= r["async/staleness_mean"] <= r["async/staleness_max"] <= 1 for r in rows)
    # the generator runs ahead: it samples step t + 1 while the trainer updates step t
    assert any(r["async/staleness_max"] == 1 for r in rows)
    stale = [r for r in rows if r["async/staleness_max"] == 1]
    assert any(r["ppo/approx_kl"] > 0 for r in stale)  # their ratio is against the behaviour log-probs, not 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    # what `python -m dash_exp.bench overlap` reads off such a run
    numbers = summarize_run(run_dir)
    assert 0 < numbers["trainer_idle_share"] < 1 and 0 <= numbers["generator_idle_share"] < 1
    assert numbers["bound"] >= max(numbers["generation"], numbers["update"]) * 0.5 and numbers["s_per_step"] > 0
    assert 0 <= numbers["accuracy"] <= 1 and 0 < numbers["staleness_mean"] <= 1


@pytest.mark.integration
@pytest.mark.dist
@pytest.mark.vllm
def test_a_vllm_generator_runs_its_engine_beside_the_launch(tmp_path, cli_env):
    """rollout=vllm on the generator: the engine's model in a worker process of its own (its torch.distributed
    world is not the launch's), weights reloaded from what the trainer sends."""
    run_dir = tmp_path / "run"
    proc = run([*torchrun(2), "steps=4", *SMALL, "rollout=vllm", "rollout.generator_ranks=1", "rollout.overlap=1",
                f"hydra.run.dir={run_dir}"], cli_env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["async/staleness_max"] <= 1 for r in rows)
    # stale samples' ratios are against vLLM's log-probs of the weights the trainer sent: close to the policy's
    assert all(abs(r["ppo/approx_kl"]) < 0.05 for r in rows)


@pytest.mark.integration
@pytest.mark.dist
def test_fsdp_over_two_trainer_ranks_beside_one_generator(tmp_path, cli_env):
    sync, split = tmp_path / "sync", tmp_path / "split"
    args = ["steps=3", *SMALL]
    one = run([sys.executable, "-m", "dash_exp.run", *args, f"hydra.run.dir={sync}"], cli_env)
    three = run([*torchrun(3), *args, "rollout.generator_ranks=1", f"hydra.run.dir={split}"], cli_env, timeout=400)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    rows_sync, rows_split = step_rows(sync), step_rows(split)
    for a, b in zip(rows_sync, rows_split, strict=True):
        assert (a["reward/mean"], a["response/length_mean"]) == (b["reward/mean"], b["response/length_mean"])
        assert b["loss/total"] == pytest.approx(a["loss/total"], abs=1e-6)
        assert b["dist/kept_per_rank_max"] >= 1  # the kept samples were dealt out to the two trainers
    assert json.loads((split / "summary.json").read_text())["world_size"] == 2  # the trainers' world


@pytest.mark.integration
@pytest.mark.dist
def test_a_step_that_keeps_nothing_does_not_hang(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    proc = run([*torchrun(2), "steps=3", *SMALL, "filter_threshold=100", "rollout.generator_ranks=1",
                "rollout.overlap=1", f"hydra.run.dir={run_dir}"], cli_env, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["filter/kept_frac"] for r in step_rows(run_dir)] == [0.0, 0.0, 0.0]


def _children_by_rank(pid: int) -> dict[int, int]:
    """The torchrun agent's worker processes, by RANK."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(child)
    return out


def _start_and_wait_for_checkpoint(cmd: list[str], run_dir: Path, env: dict, step: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.05)
    return proc


@pytest.mark.integration
@pytest.mark.dist
def test_a_killed_generator_stops_the_run_naming_it_and_the_run_resumes(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    cmd = [*torchrun(2), "steps=40", "save_every=2", *SMALL, "rollout.generator_ranks=1", "rollout.overlap=1",
           f"hydra.run.dir={run_dir}"]
    proc = _start_and_wait_for_checkpoint(cmd, run_dir, cli_env, 2)
    os.kill(_children_by_rank(proc.pid)[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # no hang: the trainer does not wait forever
    assert proc.returncode != 0
    # one line names it (torchrun's own report follows): "error: generator rank 1 (pid N) died; ..."
    assert any(line.startswith("error: generator rank 1 ") for line in stderr.splitlines()), stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    resumed = run([*cmd[:-2], "steps=6", *cmd[-1:]], cli_env)  # a shorter run, resumed from its checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is True
    assert [r["step"] for r in step_rows(run_dir)] == [1, 2, 3, 4, 5, 6]  # none duplicated, none dropped


@pytest.mark.integration
@pytest.mark.dist
def test_sigkill_then_resume_with_overlap_zero_is_the_uninterrupted_run(tmp_path, cli_env):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*torchrun(2), "steps=6", "save_every=3", *SMALL, "rollout.generator_ranks=1", "rollout.overlap=0"]
    first = run([*args, f"hydra.run.dir={straight}"], cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _start_and_wait_for_checkpoint([*args, f"hydra.run.dir={killed}"], killed, cli_env, 3)
    kill_tree(proc.pid)  # torchrun, the trainer and the generator
    proc.communicate()
    resumed = run([*args, f"hydra.run.dir={killed}"], cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in step_rows(killed)] == [1, 2, 3, 4, 5, 6]
    assert [untimed(r) for r in step_rows(killed)] == [untimed(r) for r in step_rows(straight)]
    assert final(killed) == final(straight)


@pytest.mark.integration
def test_overlap_without_generator_ranks_is_a_one_line_config_error(tmp_path, cli_env):
    proc = run([sys.executable, "-m", "dash_exp.run", *SMALL, "rollout.overlap=1", f"hydra.run.dir={tmp_path}"],
               cli_env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: rollout.overlap=1: needs rollout.generator_ranks >= 1 (generation "
                                   "overlaps training only on ranks of its own)")
    alone = run([sys.executable, "-m", "dash_exp.run", *SMALL, "rollout.generator_ranks=1",
                 f"hydra.run.dir={tmp_path}"], cli_env, timeout=60)
    assert alone.returncode == 2 and "rollout.generator_ranks=1: expected fewer than the launch's 1" in alone.stderr
