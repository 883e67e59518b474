"""Benchmarks: the bare-loop baseline computes our gradient, and `python -m dash_exp.bench` fills its table."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, TEST_OVERRIDES

from dash_exp.bench import backprop, generation, profile, shared_prompt, train
from dash_exp.bench.__main__ import TRL_PYTHON
from dash_exp.bench.table import real_model_rows

pytestmark = [pytest.mark.integration, pytest.mark.bench]

SMALL = [o for o in TEST_OVERRIDES if not o.startswith(("logger", "eval_every"))]


def test_bare_loop_baseline_computes_the_harness_gradient():
    result = backprop.run(SMALL, repeats=1)
    # same samples, same micro-batch, same gradient: the tokens/s ratio compares equal work
    assert result["max_grad_gap"] < 1e-5
    assert result["samples"] == 16 and result["microbatch"] == 4
    assert result["harness_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0


def test_shared_prompt_bench_times_one_real_step_batch_both_ways(tmp_path):
    result = shared_prompt.run([*SMALL, f"run_dir={tmp_path / 'run'}"], repeats=1)
    assert result["samples"] == 16 and result["microbatch"] == 4
    grpo, dash = result["grpo"], result["dash"]
    assert grpo["samples"] == 16 and grpo["groups"] == 4 and 0 < dash["samples"] <= 16
    for arm in (grpo, dash):  # the same gradient both ways, and the shared forward runs fewer tokens
        assert arm["max_grad_gap_rel"] < 1e-4
        assert arm["shared_forward_tokens"] < arm["separate_forward_tokens"]
        assert arm["separate_s"] > 0 and arm["shared_s"] > 0
    sft = result["sft"]  # 16 distinct problems: nothing shared on the tiny model's raw prompts but padding saved
    assert sft["samples"] == sft["groups"] == 16 and 0 < sft["max_grad_gap_rel"] < 1e-4
    assert sft["shared_forward_tokens"] <= sft["separate_forward_tokens"]
    assert "| grpo | 16 (4) |" in shared_prompt.table(result) and "| sft | 16 (16) |" in shared_prompt.table(result)


def test_profile_splits_steps_into_phases_and_ops(tmp_path):
    result = profile.run(SMALL, steps=2, out=tmp_path)
    wall, profiled = result["wall_s_per_step"], result["profiled_phase_s_per_step"]
    assert {"inference", "reward", "update", "sync"} <= set(wall) == set(profiled)
    for phase in ("inference", "update"):  # the profiler's ranges are the timers' phases
        assert profiled[phase] == pytest.approx(wall[phase], rel=0.5)
    assert 0 < result["op_s_per_step"] < sum(wall.values()) and 0 <= result["overhead_frac"] < 1
    ops = [op["op"] for op in result["top_ops"]]
    assert len(ops) == 12 and any(op in ops for op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"))


def test_real_model_rows_come_from_the_train_and_generation_benches(tmp_path):
    """The real_* rows' plumbing, run here on the embedded model (make bench runs it on SmolLM2-135M-Instruct): the
    train bench without its filter probe still times the weight sync; the generation bench rates against the floor."""
    t = train.run(SMALL, repeats=1, steps=2, out=tmp_path, filter_batches=0)
    assert "filter" not in t and not t["filter_batches"]
    assert all(0 <= t[a]["sync_s"] < t[a]["total_s"] for a in ("dash", "grpo"))
    g = generation.run(SMALL, repeats=1, batches=(4, 8), backends=("hf",))
    assert [(row["backend"], row["batch"]) for row in g["rows"]] == [("hf", 4), ("hf", 8)]
    assert all(row["harness_vs_floor"] == pytest.approx(row["harness_tokens_per_s"] / g["floor_tokens_per_s"])
               for row in g["rows"])
    rows = "\n".join(real_model_rows({"real_generation": g, "real_train": t}))
    for row in ("generation, hf sampler, batch 4", "generation, hf sampler, batch 8", "HF sampler: batch 8 vs batch 4",
                "DASH vs GRPO: seconds per optimizer step (median of 2 steps", "weight sync to vLLM per step"):
        assert row in rows, row
    assert "harness vs raw LLM.generate" not in rows  # no vLLM row without a vLLM measurement


def test_bench_all_writes_every_result_and_the_table(tmp_path, cli_env):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "dash_exp.bench", "--repeats", "1", "--steps", "2", "--trl-steps", "1",
         "--out", str(out), *SMALL],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((out / "train.json").read_text())
    for algorithm in ("grpo", "dash"):
        run = train[algorithm]
        assert run["total_s"] >= run["inference_s"] + run["update_s"] > 0
        assert 0 <= run["accuracy"] <= 1
    # the filter bench updates late batches (after the last training step) with and without gradient filtering
    f = train["filter"]
    assert f["batches"] == 4 and f["first_step"] == 3 and 0 < f["kept_frac"] <= 1
    assert f["ratio"] == pytest.approx(f["dash_update_s"] / f["no_gf_update_s"])
    # the same optimizer steps on both sides of the TRL comparison
    assert all(len(run["step_s"]) == 2 for runs in train["per_seed"].values() for run in runs)
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    for row in ("DASH vs GRPO: training time", "Gradient filtering alone", "Rollout hf", "Backprop"):
        assert row in table
    assert "Not measured" not in table
    if TRL_PYTHON.exists():
        assert "DASH vs TRL" in table and "GRPO vs TRL" in table


def test_gpu_check_cpu_flavour(tmp_path, cli_env):
    # the prepared GPU check's own code at test size (model=qwen2.5-test: Qwen2.5's vocab, tiny depth), so it never
    # rots between the days a GPU is lent
    proc = subprocess.run([sys.executable, "-m", "dash_exp.bench", "gpu", "--cpu", "--steps", "2", "--out",
                           str(tmp_path)], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {p.name for p in (tmp_path / "gpu").iterdir()} == {"grpo", "dash"}  # the trainers' run dirs, under --out
    assert (result["flavour"], result["model"], result["source"], result["dtype"]) == (
        "cpu", "qwen2.5-test", "random", "bfloat16")
    assert result["timed_steps"] == 1 and result["lr"] == 3e-6
    for algorithm in ("grpo", "dash"):
        row = result[algorithm]
        assert row["time/step"] >= row["time/inference"] + row["time/update"] > 0
        assert row["throughput/gen_tokens_per_s"] > 0 and row["mem/update_cuda_peak_mb"] is None
    # synthetic rewards: GRPO keeps everything, DASH's filter drops the uniform groups
    assert result["grpo"]["filter/kept_frac"] == 1 and result["dash"]["filter/kept_frac"] < 1
    assert result["ratio"]["time/step"] == pytest.approx(result["dash"]["time/step"] / result["grpo"]["time/step"])
    # fp32 masters: one step at lr 3e-6 moves (nearly) every weight
    assert result["weights_changed_by_one_step"] >= 0.99
    # 4 x 64 response tokens in chunks of 32: the [256, 151,936] logits never exist at once
    print(f"log-prob fwd+bwd peak: chunked {result['logprob_chunked_peak_mb']:.1f} MiB, unchunked "
          f"{result['logprob_unchunked_peak_mb']:.1f} MiB")
    assert result["logprob_chunked_over_unchunked"] < 0.35
    assert "| weights changed by one step at lr 3e-06 |" in proc.stdout and "GPU check (cpu" in proc.stdout
