"""Held-out evaluation: unbiased pass@k against brute force, the `python -m dash_exp.evaluate` CLI on MATH-500 and
GSM8K with the real tiny model, and evaluating a trained checkpoint (same numbers as the run's final evaluation)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES

from dash_exp.checkpoint import latest_checkpoint, load_policy_weights
from dash_exp.evaluate import main as evaluate_main
from dash_exp.evaluation import pass_at_k
from dash_exp.run import train

FRACTIONS = ("accuracy", "sampled_accuracy", "truncated_frac", "sampled_truncated_frac", "unparsed_frac",
             "sampled_unparsed_frac")
# the test sizes of conftest, without the run dir (evaluate puts its own next to `out`)
SMALL = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]


# ------------------------------------------------------------------ pass@k
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.unit
def test_pass_at_k_equals_brute_force_on_every_small_case():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


@pytest.mark.unit
def test_pass_at_k_random_cases_and_properties():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        c, k = rng.randint(0, n), rng.randint(1, n)
        value = pass_at_k(n, c, k)
        assert value == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
        assert 0.0 <= value <= 1.0
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the plain accuracy
        if k < n:
            assert pass_at_k(n, c, k) <= pass_at_k(n, c, k + 1)  # more tries never hurt


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2, 5, 10, 64])
def test_pass_at_k_edge_cases(n):
    for k in range(1, n + 1):
        assert pass_at_k(n, 0, k) == 0.0
        assert pass_at_k(n, n, k) == 1.0
    assert pass_at_k(n, 1, n) == 1.0  # all samples drawn: the correct one is among them
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    assert math.isclose(pass_at_k(n, n - 1, 1), (n - 1) / n)


# ------------------------------------------------------------------ the CLI on MATH-500 and GSM8K
def check_metrics(metrics: dict[str, float], name: str, n: int, max_new_tokens: int) -> None:
    ks = [2**i for i in range(int(math.log2(n)) + 1)]
    for key in (*FRACTIONS, *(f"pass@{k}" for k in ks)):
        assert 0.0 <= metrics[f"eval/{name}/{key}"] <= 1.0, (name, key, metrics[f"eval/{name}/{key}"])
    for key in ("length_mean", "sampled_length_mean"):
        assert 0.0 <= metrics[f"eval/{name}/{key}"] <= max_new_tokens
    assert metrics[f"eval/{name}/timeouts"] == metrics[f"eval/{name}/sampled_timeouts"] == 0
    passes = [metrics[f"eval/{name}/pass@{k}"] for k in ks]
    assert passes == sorted(passes), passes
    assert metrics[f"eval/{name}/pass@1"] == pytest.approx(metrics[f"eval/{name}/sampled_accuracy"])
    assert not any(key.startswith(f"eval/{name}/pass@{2 * n}") for key in metrics)


@pytest.mark.integration
def test_evaluate_cli_on_math500_and_gsm8k(tmp_path, cli_env):
    out = tmp_path / "eval.json"
    args = ["task=math", "task.eval_size=20", "n=4", f"out={out}", "logger=none", "threads=1", "max_new_tokens=32"]
    proc = subprocess.run([sys.executable, "-m", "dash_exp.evaluate", *args], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    result = json.loads(out.read_text())
    assert {k: result[k] for k in ("checkpoint", "step", "task", "n", "eval_size", "model")} == {
        "checkpoint": None, "step": 0, "task": "math", "n": 4, "eval_size": 20, "model": "tiny"}
    metrics = result["metrics"]
    assert {key.split("/")[1] for key in metrics} == {"math500", "gsm8k"}
    for name in ("math500", "gsm8k"):
        expected = {f"eval/{name}/{key}" for key in (
            "accuracy", "sampled_accuracy", "pass@1", "pass@2", "pass@4", "length_mean", "truncated_frac",
            "unparsed_frac", "timeouts", "sampled_length_mean", "sampled_truncated_frac", "sampled_unparsed_frac",
            "sampled_timeouts", "problems")}
        assert expected == {key for key in metrics if key.startswith(f"eval/{name}/")}
        assert metrics[f"eval/{name}/problems"] == 20  # what each accuracy's standard error is computed from
        check_metrics(metrics, name, n=4, max_new_tokens=32)
        # fractions of 20 problems (greedy) and 80 samples: exact multiples
        assert metrics[f"eval/{name}/accuracy"] * 20 == pytest.approx(round(metrics[f"eval/{name}/accuracy"] * 20))
        assert metrics[f"eval/{name}/sampled_unparsed_frac"] * 80 == pytest.approx(
            round(metrics[f"eval/{name}/sampled_unparsed_frac"] * 80))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # logger=none: nothing else


# ------------------------------------------------------------------ evaluating a checkpoint
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step run of the test sizes (arith, tiny model): its dir and summary."""
    from dash_exp.config import compose_config

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    summary = train(compose_config([*TEST_OVERRIDES, f"run_dir={run_dir}", "steps=2"]))
    return run_dir, summary


GREEDY = ("accuracy", "length_mean", "truncated_frac", "unparsed_frac", "timeouts")


@pytest.mark.integration
def test_evaluating_a_checkpoint_reproduces_the_runs_final_evaluation(trained_run, tmp_path):
    run_dir, summary = trained_run
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["steps"] == 2
    result = evaluate_main([f"checkpoint={run_dir}", "n=2", f"out={tmp_path}/e.json", *SMALL])
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert result["step"] == 2 and result["checkpoint"] == str(run_dir) and result["n"] == 2
    metrics = result["metrics"]
    print(f"checkpoint eval: accuracy {metrics['eval/arith/accuracy']}, pass@1 {metrics['eval/arith/pass@1']}, "
          f"pass@2 {metrics['eval/arith/pass@2']}; run's final accuracy {written['final']['eval/arith/accuracy']}")
    assert metrics["eval/arith/accuracy"] == written["final"]["eval/arith/accuracy"]
    for key in GREEDY:  # same weights, same code: every greedy number is identical
        assert metrics[f"eval/arith/{key}"] == written["final"][f"eval/arith/{key}"], key
    check_metrics(metrics, "arith", n=2, max_new_tokens=40)

    # a checkpoint dir (step_*/ with state.pt) works as well as the run dir
    ckpt = latest_checkpoint(run_dir)
    again = evaluate_main([f"checkpoint={ckpt}", "n=2", f"out={tmp_path}/e2.json", *SMALL])
    assert again["step"] == 2 and again["metrics"] == metrics


@pytest.mark.integration
def test_evaluating_without_a_checkpoint_reproduces_the_runs_initial_evaluation(trained_run, tmp_path):
    _, summary = trained_run
    result = evaluate_main(["n=1", f"out={tmp_path}/base.json", *SMALL])
    assert result["step"] == 0 and result["checkpoint"] is None
    initial = {k: v for k, v in summary["initial"].items() if k != "time/eval"}
    assert result["metrics"] == initial  # n=1 = the run's eval_samples: sampled numbers match too


@pytest.mark.integration
def test_a_checkpoint_of_another_architecture_does_not_fit(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = latest_checkpoint(run_dir)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    name = next(k for k, v in state["policy"].items() if v.dim() == 2)
    state["policy"][name] = torch.zeros(state["policy"][name].shape[0], 64)  # as if hidden_size were 64
    bad = tmp_path / "other_run" / "checkpoints" / ckpt.name
    bad.mkdir(parents=True)
    torch.save(state, bad / "state.pt")
    (bad / "meta.json").write_text((ckpt / "meta.json").read_text())
    for path in (tmp_path / "other_run", bad):  # as a run dir and as a checkpoint dir
        with pytest.raises(ValueError, match="does not fit") as info:
            evaluate_main([f"checkpoint={path}", "n=1", f"out={tmp_path}/bad.json", *SMALL])
        assert str(bad) in str(info.value)
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.unit
def test_load_policy_weights_errors(tmp_path):
    from dash_exp.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run", 3, {"policy": torch.nn.Linear(2, 4).state_dict()}, {})
    policy = torch.nn.Linear(2, 4)
    assert load_policy_weights(policy, tmp_path / "run") == 3
    with pytest.raises(ValueError, match="does not fit the configured model") as info:
        load_policy_weights(torch.nn.Linear(2, 3), tmp_path / "run")
    assert str(tmp_path / "run" / "checkpoints" / "step_00000003") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        load_policy_weights(policy, tmp_path / "empty")
    Path(tmp_path / "run" / "checkpoints").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'run'}: no checkpoint here")):
        load_policy_weights(policy, tmp_path / "run")


@pytest.mark.unit
def test_pass_at_k_rejects_k_outside_1_to_n():
    for n, k in ((2, 4), (3, 0)):
        with pytest.raises(ValueError, match="1 <= k <= n"):
            pass_at_k(n, 0, k)
