"""End-to-end training on the real tiny model: every algorithm x kl, GRPO vs DASH, no reference without KL."""

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

from dash_exp.factory import build
from dash_exp.run import train
from dash_exp.tracking import MetricSink
from dash_exp.trainer import Trainer

pytestmark = pytest.mark.integration

STEP_KEYS = {"reward/mean", "adv/abs_mean", "filter/kept_frac", "response/length_mean", "loss/total", "grad/norm",
             "time/inference", "time/update", "time/step", "time/elapsed", "throughput/gen_tokens_per_s",
             "throughput/train_tokens_per_s", "mem/peak_mb", "epoch"}


@pytest.mark.parametrize("kl", ["on", "off"])
@pytest.mark.parametrize("algorithm", ["sft", "grpo", "ppo", "dash"])
def test_every_algorithm_and_kl_runs_a_few_steps(make_cfg, algorithm, kl, tmp_path):
    cfg = make_cfg(f"algorithm={algorithm}", f"kl={kl}", "steps=2")
    summary = train(cfg)
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    expected = STEP_KEYS - ({"reward/mean", "adv/abs_mean", "filter/kept_frac", "response/length_mean",
                             "time/inference", "throughput/gen_tokens_per_s"} if algorithm == "sft" else set())
    assert expected <= set(steps[0]), expected - set(steps[0])
    if kl == "on":
        assert steps[1]["kl/mean"] > 0 and steps[1]["loss/kl"] > 0  # after an update the policy left the reference
        if algorithm != "ppo":
            assert steps[0]["kl/mean"] == 0  # first update: the policy is the reference
    else:
        assert steps[0]["kl/mean"] == steps[1]["kl/mean"] == 0
    assert "eval/arith/accuracy" in summary["final"] and "eval/arith/accuracy" in summary["initial"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "config.yaml").exists()


def first_step_gradients(cfg, ref_noise: float = 0.0):
    """Rollouts and the gradient of the first optimizer step of a real trainer (with kl on: its reference moved
    by `ref_noise` x N(0, 1) per weight, so that the KL term has a gradient at the first step)."""
    torch.manual_seed(cfg.seed)
    parts = build(cfg)
    if parts.ref is not None and ref_noise:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in parts.ref.parameters():
                p.add_(ref_noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    sink = MetricSink(run_dir, cfg.logger, "t", "t", {})
    trainer = Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir, ref=parts.ref)
    captured = []

    def capture(optimizer, args, kwargs):
        if not captured:
            captured.append([p.grad.clone() for p in parts.policy.parameters()])

    trainer.optimizer.register_step_pre_hook(capture)
    calls = []
    generate = parts.sampler.generate
    parts.sampler.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)
    metrics = trainer.rl_step(1)
    parts.close()  # the grader's workers and the sampler's engine (vLLM's frees its memory now)
    sink.close()
    return captured[0], metrics, calls


@pytest.mark.parametrize("filter_kl", ["keep", "drop"])
def test_with_kl_on_dash_keeps_the_unfiltered_gradient_only_with_filter_kl_keep(make_cfg, tmp_path, filter_kl):
    """kl=on, filter threshold 0 (only advantages of exactly 0 are filtered): DASH's first step equals No-GF's (no
    filtering) with filter_kl=keep, and differs by the filtered samples' KL pull with drop."""
    common = ["prompts_per_step=8", "group_size=4", "train_microbatch=4", "seed=3", "kl=on", "task.filter_threshold=0",
              f"filter_kl={filter_kl}"]
    full, full_metrics, _ = first_step_gradients(make_cfg("algorithm=dash_nogf", *common, f"run_dir={tmp_path}/n"),
                                                 ref_noise=0.02)
    dash, metrics, _ = first_step_gradients(make_cfg("algorithm=dash", *common, f"run_dir={tmp_path}/d"),
                                            ref_noise=0.02)
    assert full_metrics["filter/kept_frac"] == 1.0 and 0 < metrics["filter/kept_frac"] < 1.0
    assert metrics["kl/mean"] > 0
    gap = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(full, dash, strict=True))
    if filter_kl == "keep":
        assert metrics["filter/forward_samples"] == 32 and metrics["kl/beta_effective"] == pytest.approx(0.04)
        assert gap < 1e-4, gap
    else:
        assert metrics["filter/forward_samples"] < 32 and metrics["kl/beta_effective"] < 0.04
        assert gap > 1e-3, gap


def test_grpo_and_dash_differ_only_in_scheduling(make_cfg, tmp_path):
    common = ["prompts_per_step=8", "group_size=4", "train_microbatch=4", "seed=3"]
    grpo_grad, grpo, grpo_calls = first_step_gradients(make_cfg("algorithm=grpo", *common, f"run_dir={tmp_path}/g"))
    dash_grad, dash, dash_calls = first_step_gradients(make_cfg("algorithm=dash", *common, f"run_dir={tmp_path}/d"))
    assert grpo_calls == [1] * 8 and dash_calls == [8]  # 4 samples (1 prompt) per call vs all 32 at once
    assert grpo["reward/mean"] == dash["reward/mean"] and 0 < dash["reward/mean"] < 1
    assert grpo["filter/kept_frac"] == 1.0 and dash["filter/kept_frac"] < 1.0
    assert dash["filter/forward_samples"] < grpo["filter/forward_samples"] == 32
    for a, b in zip(grpo_grad, dash_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def live_models() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object trips deprecated-module warnings
        warnings.simplefilter("ignore")
        return sum(isinstance(o, GenerationMixin) for o in gc.get_objects())


@pytest.mark.parametrize(("kl", "models"), [("off", 1), ("on", 2)])
def test_reference_model_exists_only_with_kl(make_cfg, kl, models):
    before = live_models()
    parts = build(make_cfg(f"kl={kl}"))
    parts.task.close()
    assert live_models() - before == models
    assert (parts.ref is None) == (kl == "off")


def test_base_evaluates_without_training_whatever_steps_say(make_cfg, tmp_path):
    summary = train(make_cfg("algorithm=base", "steps=5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 0 and {r["step"] for r in rows} == {0}
    assert summary["final"]["eval/arith/accuracy"] == summary["initial"]["eval/arith/accuracy"]
