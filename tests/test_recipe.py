"""The authors' released recipe in the Qwen presets (Dr.GRPO, KL on, prompts <= 256 tokens dropped, sampled evaluation
at 0.7 / 0.95), the tiny default untouched, and the knobs behind it on the real tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_OVERRIDES

from dash_exp.batching import TokenCache
from dash_exp.char_tokenizer import build_char_tokenizer
from dash_exp.config import ConfigError, compose_config
from dash_exp.factory import build, drop_long_prompts
from dash_exp.rollout.base import SamplingParams
from dash_exp.run import train
from dash_exp.tasks.registry import build_task
from dash_exp.tracking import MetricSink
from dash_exp.trainer import Trainer

QWEN = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")


@pytest.mark.unit
@pytest.mark.parametrize("model", QWEN)
@pytest.mark.parametrize("algorithm", ["dash", "grpo", "dash_nogf", "ppo", "ppo_mini", "base"])
def test_qwen_presets_carry_the_authors_recipe(model, algorithm):
    cfg = compose_config([f"model={model}", f"algorithm={algorithm}", "run_dir=x"])
    assert cfg.algorithm.aggregation == "seq_mean_token_sum_norm"
    assert (cfg.kl.name, cfg.kl.beta, cfg.kl.estimator) == ("on", 0.04, "k3")
    assert cfg.max_prompt_tokens == 256 and cfg.model.gradient_checkpointing
    assert (cfg.eval_temperature, cfg.eval_top_p) == (0.7, 0.95)
    assert (cfg.temperature, cfg.top_p) == (0.9, 1.0)  # training sampling is untouched
    evaluation = SamplingParams.from_config(cfg, 1, evaluation=True)
    assert (evaluation.temperature, evaluation.top_p) == (0.7, 0.95)


@pytest.mark.unit
def test_sft_keeps_a_token_mean_under_the_qwen_presets():
    for algorithm in ("sft", "sft_m"):
        assert compose_config(["model=qwen2.5-0.5b", f"algorithm={algorithm}", "run_dir=x"]).algorithm.aggregation \
            == "token_mean"


@pytest.mark.unit
def test_kl_on_the_command_line_wins_over_the_preset_and_sweeps_give_both():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    off = compose_config(["model=qwen2.5-0.5b", "kl=off", "run_dir=x"])
    assert (off.kl.name, off.kl.beta) == ("off", 0.0)
    assert off.algorithm.aggregation == "seq_mean_token_sum_norm"  # the rest of the recipe stays
    # -m kl=on,off: the jobs Hydra's basic sweeper makes, each composed as the job is
    parsed = OverridesParser.create().parse_overrides(["model=qwen2.5-0.5b", "kl=on,off"])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert [(c.kl.name, c.kl.beta) for c in (compose_config([*job, "run_dir=x"]) for job in jobs)] == [
        ("on", 0.04), ("off", 0.0)]


@pytest.mark.unit
def test_the_tiny_default_is_unchanged():
    cfg = compose_config(["run_dir=x"])
    assert (cfg.model.name, cfg.kl.name, cfg.kl.beta) == ("tiny", "off", 0.0)
    assert cfg.algorithm.aggregation == "token_mean" and not cfg.model.gradient_checkpointing
    assert cfg.max_prompt_tokens is None and cfg.eval_temperature is None and cfg.eval_top_p is None
    evaluation = SamplingParams.from_config(cfg, 2, evaluation=True)
    assert evaluation == SamplingParams.from_config(cfg, 2)  # null eval knobs: the training temperature / top_p


def prompt_tokens(problems: list) -> list[int]:
    """Prompt lengths in tokens of the tiny model's character tokenizer, as the sampler encodes them."""
    tokenizer = build_char_tokenizer()
    return [len(tokenizer.encode(p.prompt, add_special_tokens=False)) for p in problems]


@pytest.mark.unit
def test_drop_long_prompts_drops_exactly_the_longer_ones():
    task = build_task(compose_config([*TEST_OVERRIDES, "run_dir=x"]).task)
    lengths = prompt_tokens(task.train)
    limit = sorted(lengths)[len(lengths) // 2]
    kept = drop_long_prompts(task.train, TokenCache(build_char_tokenizer()), limit)
    assert kept == [p for p, n in zip(task.train, lengths, strict=True) if n <= limit]
    assert 0 < len(kept) < len(task.train)
    assert drop_long_prompts(task.train, TokenCache(build_char_tokenizer()), max(lengths)) == task.train
    with pytest.raises(ConfigError) as info:
        drop_long_prompts(task.train, TokenCache(build_char_tokenizer()), min(lengths) - 1)
    assert str(info.value) == (f"max_prompt_tokens={min(lengths) - 1}: every one of the {len(task.train)} training "
                               f"prompts is longer (the shortest has {min(lengths)} tokens)")


@pytest.mark.integration
def test_a_run_drops_long_training_prompts_counts_them_and_never_filters_evaluation(make_cfg, tmp_path, capsys):
    reference = build_task(make_cfg().task)
    limit = 11
    parts = build(make_cfg(f"max_prompt_tokens={limit}"))
    parts.close()
    lengths = prompt_tokens(reference.train)
    assert parts.task.train == [p for p, n in zip(reference.train, lengths, strict=True) if n <= limit]
    dropped = len(reference.train) - len(parts.task.train)
    assert parts.dropped_prompts == dropped > 0 and parts.task.train
    assert parts.task.evals == reference.evals and max(prompt_tokens(reference.evals["arith"])) > limit

    summary = train(make_cfg(f"max_prompt_tokens={limit}", "steps=0"))
    assert (f"max_prompt_tokens={limit}: dropped {dropped} of {len(reference.train)} training prompts "
            f"({len(reference.train) - dropped} kept)") in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "data/dropped_prompts" in r)
    assert (logged["step"], logged["data/dropped_prompts"], logged["data/train_prompts"]) == (
        0, dropped, len(reference.train) - dropped)
    assert "eval/arith/accuracy" in summary["final"]


@pytest.mark.integration
def test_every_prompt_dropped_is_a_one_line_config_error_and_evaluation_drops_nothing(make_cfg):
    with pytest.raises(ConfigError, match=r"^max_prompt_tokens=1: every one of the 64 training prompts is longer"):
        build(make_cfg("max_prompt_tokens=1"))
    # evaluation only (python -m dash_exp.evaluate) drops nothing
    parts = build(make_cfg("max_prompt_tokens=1"), need_train=False)
    parts.close()
    assert parts.dropped_prompts == 0 and len(parts.task.train) == 64


@pytest.mark.integration
def test_eval_temperature_reaches_the_sampler_for_the_sampled_evaluation(make_cfg, tmp_path):
    cfg = make_cfg("temperature=0.9", "eval_temperature=0.7", "eval_top_p=0.95", "eval_samples=2")
    parts = build(cfg)
    calls = []
    generate = parts.sampler.generate
    parts.sampler.generate = lambda prompts, params, seeds: calls.append(params) or generate(prompts, params, seeds)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    sink = MetricSink(run_dir, cfg.logger, "t", "t", {})
    try:
        trainer = Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir)
        metrics = trainer.evaluate()
        assert {p for p in calls if p.greedy} == {SamplingParams(n=1, greedy=True, max_new_tokens=40)}
        assert {p for p in calls if not p.greedy} == {SamplingParams(n=2, temperature=0.7, top_p=0.95,
                                                                      max_new_tokens=40)}
        assert "eval/arith/accuracy" in metrics and "eval/arith/sampled_accuracy" in metrics
        calls.clear()
        trainer.rl_step(1)  # training still samples at the training temperature
        assert {(p.n, p.temperature, p.top_p) for p in calls} == {(cfg.group_size, 0.9, 1.0)}
    finally:
        sink.close()
        parts.close()


@pytest.mark.integration
def test_the_evaluate_cli_samples_at_eval_temperature(tmp_path):
    from dash_exp.evaluate import main as evaluate_main

    small = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]
    by_eval_knobs = evaluate_main(["n=2", f"out={tmp_path}/a.json", "eval_temperature=0.5", "eval_top_p=0.9", *small])
    by_training_knobs = evaluate_main(["n=2", f"out={tmp_path}/b.json", "temperature=0.5", "top_p=0.9", *small])
    # the same sampling parameters and noise: the same samples, so every metric (greedy and sampled) is equal
    assert by_eval_knobs["metrics"] == by_training_knobs["metrics"]
