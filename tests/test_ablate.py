"""analysis.ablate on synthetic sweeps with known answers: a clear improvement, a clear regression, a tie."""

import json
import math

import pandas as pd
import pytest
import yaml

from analysis.ablate import Metric, ablation, arm_keys, arm_names, main, markdown
from analysis.runs import load_runs

SEEDS = (0, 1, 2, 3, 4)
# per-seed noise shared by every arm (seed effects: what pairing by seed removes)
NOISE = (0.03, -0.05, 0.00, 0.04, -0.02)


def write_run(run_dir, algorithm, seed, accuracy, elapsed, length, kl="off", extra=None):
    """A finished run as dash_exp.run writes it: config.yaml, summary.json, metrics.jsonl."""
    run_dir.mkdir(parents=True)
    config = {"algorithm": {"name": algorithm["name"], "label": algorithm["label"],
                            "advantage": algorithm.get("advantage", "grpo")},
              "kl": {"name": kl, "beta": 0.04 if kl == "on" else 0.0}, "model": {"name": "tiny"},
              "task": {"name": "arith", "eval_size": 200}, "seed": seed, "steps": 4, "sweep_name": "zoo",
              "filter_threshold": algorithm.get("filter_threshold"), "run_dir": str(run_dir),
              "prompts_per_step": 4, "group_size": 4, "inference_batch": None, "train_microbatch": 4, **(extra or {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    final = {"eval/arith/accuracy": accuracy, "eval/arith/sampled_accuracy": accuracy - 0.1}
    (run_dir / "summary.json").write_text(json.dumps({"initial": {"eval/arith/accuracy": 0.4}, "final": final,
                                                      "time/elapsed": elapsed, "steps": 4}))
    rows = [{"step": s, "time/step": elapsed / 4, "response/length_mean": length + s} for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


ARMS = {  # label -> (accuracy shift, time, length shift, per-seed wobble of the shift)
    "dash": (0.0, 100.0, 0.0, (0, 0, 0, 0, 0)),
    "rloo": (0.10, 100.0, 0.0, (0.01, -0.01, 0.0, 0.02, -0.02)),  # clearly better accuracy
    "gspo": (-0.10, 140.0, 5.0, (0.0, 0.01, -0.01, 0.0, 0.01)),  # clearly worse, slower, longer
    "drgrpo": (0.0, 100.0, 0.0, (0.02, -0.02, 0.01, -0.01, 0.0)),  # a tie
}


@pytest.fixture
def zoo(tmp_path):
    sweep = tmp_path / "multirun" / "zoo"
    job = 0
    for label, (shift, elapsed, length, wobble) in ARMS.items():
        for seed, noise, w in zip(SEEDS, NOISE, wobble, strict=True):
            algorithm = {"name": label, "label": label, "advantage": {"rloo": "rloo", "drgrpo": "drgrpo"}.get(label,
                                                                                                             "grpo")}
            write_run(sweep / f"{job}_{label}_seed{seed}", algorithm, seed, 0.5 + noise + shift + w,
                      elapsed + 3 * noise, 30 + length + 10 * noise)
            job += 1
    return sweep


@pytest.mark.unit
def test_improvement_regression_and_tie_get_their_verdicts(zoo):
    runs, steps = load_runs(zoo)
    table = ablation(runs, steps)
    assert table.attrs["baseline"] == "dash"  # the sweep's first arm (lowest job number)
    acc = table[table["metric"] == "final/eval/arith/accuracy"].set_index("arm")
    assert acc.loc["rloo", "verdict"] == "better" and acc.loc["gspo", "verdict"] == "worse"
    assert acc.loc["drgrpo", "verdict"] == "inconclusive" and acc.loc["dash", "verdict"] == "baseline"
    # points, paired by seed: the shared per-seed noise cancels, the difference is the mean shift
    assert acc.loc["rloo", "diff"] == pytest.approx(10.0) and acc.loc["rloo", "paired"]
    assert acc.loc["rloo", "low"] > 0 and acc.loc["gspo", "high"] < 0
    assert acc.loc["drgrpo", "low"] < 0 < acc.loc["drgrpo", "high"]
    assert acc.loc["rloo", "p_improve"] > 0.9 and acc.loc["gspo", "p_improve"] < 0.1
    time = table[table["metric"] == "time_elapsed"].set_index("arm")
    assert time.loc["gspo", "verdict"] == "worse" and time.loc["gspo", "diff"] == pytest.approx(40.0)
    assert time.loc["rloo", "verdict"] == "inconclusive"  # identical times: a zero-width interval at 0
    assert time.loc["gspo", "p_improve"] == 0.0  # lower is better: slower in every pair
    length = table[table["metric"] == "response/length_mean"].set_index("arm")
    assert length.loc["gspo", "verdict"] == "higher"  # no better direction for length
    # the mean over the last steps (window 1 of 4 steps: the last, step 4, not the mean of all four)
    assert length.loc["dash", "mean"] == pytest.approx(30 + 4 + 10 * sum(NOISE) / 5)


@pytest.mark.unit
def test_arms_are_the_varying_keys_not_implied_by_others(zoo, tmp_path):
    runs, _ = load_runs(zoo)
    # label implies algorithm.name and algorithm.advantage; the seed never makes an arm
    assert arm_keys(runs) == ["algorithm.label"]
    # a second swept key joins the name
    sweep = tmp_path / "kl_sweep"
    job = 0
    for label in ("grpo", "dash"):
        for kl in ("on", "off"):
            for seed in (0, 1):
                write_run(sweep / f"{job}_x", {"name": label, "label": label}, seed, 0.5, 10.0, 30.0, kl=kl)
                job += 1
    runs, steps = load_runs(sweep)
    assert arm_keys(runs) == ["algorithm.label", "kl.name"]
    # a key that is null in some runs (config.yaml null, NaN in the frame) tells arms apart too
    budget = tmp_path / "budget_sweep"
    for job, (budget_s, seed) in enumerate([(None, 0), (40.0, 0), (None, 1), (40.0, 1)]):
        write_run(budget / f"{job}_x", {"name": "dash", "label": "dash"}, seed, 0.5, 10.0, 30.0,
                  extra={"time_budget_s": budget_s})
    budget_runs, _ = load_runs(budget)
    assert arm_keys(budget_runs) == ["time_budget_s"]
    assert sorted(set(arm_names(budget_runs))) == ["time_budget_s=40.0", "time_budget_s=null"]
    assert sorted(set(arm_names(runs))) == ["dash, kl=off", "dash, kl=on", "grpo, kl=off", "grpo, kl=on"]
    table = ablation(runs, steps, [Metric.parse("final/eval/arith/accuracy")], baseline="dash, kl=off")
    assert set(table["verdict"]) == {"baseline", "inconclusive"}  # every arm the same: no difference anywhere


@pytest.mark.unit
def test_metrics_parse_their_direction_and_scale():
    assert Metric.parse("final/eval/arith/accuracy") == Metric("final/eval/arith/accuracy", "higher", 100.0, "points")
    assert Metric.parse("time_elapsed").better == "lower"
    assert Metric.parse("kl/mean").better == "" and Metric.parse("kl/mean:lower").better == "lower"
    with pytest.raises(ValueError, match="NAME:higher"):
        Metric.parse("kl/mean:smaller")


@pytest.mark.unit
def test_the_command_writes_table_csv_and_figure(zoo, capsys):
    assert main(["--runs", str(zoo), "--baseline", "rloo", "--metric", "final/eval/arith/sampled_accuracy",
                 "--metric", "kl/absent"]) == 0
    out = zoo / "ablation"
    text = (out / "ablation.md").read_text()
    assert "Baseline: **rloo**" in text and "| dash | 5 |" in text
    table = pd.read_csv(out / "ablation.csv")
    sampled = table[table["metric"] == "final/eval/arith/sampled_accuracy"].set_index("arm")
    assert sampled.loc["dash", "verdict"] == "worse" and sampled.loc["dash", "diff"] == pytest.approx(-10.0)
    absent = table[table["metric"] == "kl/absent"]
    assert (absent["n"] == 0).all() and set(absent["verdict"]) <= {"baseline", "inconclusive"}
    assert (out / "ablation.png").stat().st_size > 1000
    assert "written:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--runs", str(zoo), "--baseline", "ppo"])


@pytest.mark.unit
def test_markdown_lists_every_arm_per_metric(zoo):
    runs, steps = load_runs(zoo)
    text = markdown(ablation(runs, steps))
    assert text.count("| rloo |") == 3 and "better" in text and "worse" in text and "inconclusive" in text
    assert not math.isnan(ablation(runs, steps)["mean"].iloc[0])
