"""tune=auto: the knee rule, the memory budget on the real model, and the choice applied, logged and reused."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TEST_OVERRIDES

from dash_exp.batching import TrainSample
from dash_exp.run import build
from dash_exp.trainer import loss_spec
from dash_exp.tune import BACKWARD_FACTOR, knee, largest_microbatch


def test_knee_is_where_doubling_stops_paying():
    assert knee({8: 100.0, 16: 190.0, 32: 200.0, 64: 400.0}) == 16  # +5% from 16 to 32: stop at 16
    assert knee({8: 100.0, 16: 150.0, 32: 200.0}) == 32  # still rising at the cap
    assert knee({8: 100.0, 16: 105.0}) == 8
    assert knee({128: 7.0}) == 128


def test_microbatch_follows_the_memory_budget_on_the_real_model(make_cfg):
    cfg = make_cfg()
    parts = build(cfg)
    parts.task.close()
    prompt = parts.tokenizer.encode(parts.task.train[0].prompt, add_special_tokens=False)
    args = (parts.policy, TrainSample(prompt, [prompt[-1]] * 64, advantage=1.0), 64, loss_spec(cfg),
            parts.tokenizer.pad_token_id, None)
    roomy, memory, method = largest_microbatch(*args, budget_mb=10_000.0)
    assert roomy == 64 and sorted(memory) == [1, 2, 4] and "predicted" in method
    # saved activations are linear in the micro-batch: fit on 1 and 4, predict 2
    per_sample = (memory[4] - memory[1]) / 3
    assert per_sample > 0 and memory[2] == pytest.approx(memory[1] + per_sample, rel=0.05)
    # a budget that holds BACKWARD_FACTOR x the activations of 5 sequences (and not 6) gives 5
    fixed = memory[1] - per_sample
    budget = BACKWARD_FACTOR * (fixed + 5.5 * per_sample)
    assert largest_microbatch(*args, budget_mb=budget)[0] == 5
    assert largest_microbatch(*args, budget_mb=0.0)[0] == 1
    # longer sequences save more per sequence
    longer = (parts.policy, TrainSample(prompt, [prompt[-1]] * 128, advantage=1.0), *args[2:])
    assert largest_microbatch(*longer, budget_mb=10_000.0)[1][1] > 1.5 * memory[1]
    assert all(p.grad is None for p in parts.policy.parameters())  # the probe leaves no gradient behind


def run_cli(args, env):
    proc = subprocess.run([sys.executable, "-m", "dash_exp.run", *TEST_OVERRIDES, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dash", "grpo"])
def test_tune_auto_applies_logs_saves_and_reuses_its_choice(algorithm, tmp_path, cli_env):
    run_dir = tmp_path / "run"
    common = [f"algorithm={algorithm}", "tune=auto", f"hydra.run.dir={run_dir}", "save_every=1"]
    out = run_cli([*common, "steps=1"], cli_env)
    tuned = json.loads((run_dir / "tune.json").read_text())
    line = next(x for x in out.splitlines() if x.startswith("tune=auto:"))
    assert f"train_microbatch={tuned['train_microbatch']}" in line
    step_batch, group = 16, 4  # prompts_per_step=4, group_size=4 in the test overrides
    assert 1 <= tuned["train_microbatch"] <= step_batch
    assert tuned["inference_batch"] % group == 0 and tuned["inference_batch"] <= step_batch
    probed = sorted(int(b) for b in tuned["throughput"])
    assert probed == [4, 8, 16][: len(probed)]  # whole groups, doubling, up to the step batch
    assert tuned["inference_batch"] == knee({int(b): v for b, v in tuned["throughput"].items()})
    # the micro-batch: where backprop throughput stops rising, never above the largest that fits
    trained = {int(b): v for b, v in tuned["train_throughput"].items()}
    assert sorted(trained) == [1, 2, 4, 8, 16][: len(trained)] and max(trained) <= tuned["largest_fit"]
    assert tuned["train_microbatch"] == knee(trained)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train_microbatch"] == tuned["train_microbatch"]
    # GRPO's inference batch is its micro-batch by definition, so it follows; DASH takes the measured knee
    expected = tuned["train_microbatch"] if algorithm == "grpo" else tuned["inference_batch"]
    assert cfg["inference_batch"] == expected
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "tune/train_microbatch": tuned["train_microbatch"],
            "tune/inference_batch": tuned["inference_batch"], "tune/seconds": tuned["seconds"]} in rows
    assert tuned["seconds"] > 0
    # a resumed run keeps the choice it started with (no new probe)
    tuned["train_microbatch"] = 3
    (run_dir / "tune.json").write_text(json.dumps(tuned))
    out = run_cli([*common, "steps=2"], cli_env)
    assert "train_microbatch=3 " in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_microbatch"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is True
