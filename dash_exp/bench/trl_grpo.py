"""Seconds per optimizer step of TRL's GRPOTrainer on exactly the harness's run (model, task, grader, batch, recipe).

One optimizer step = prompts_per_step prompts x group_size completions, generated in `generate` calls of
inference_batch samples (the whole step batch for DASH, TRL's default; one micro-batch for GRPO), rewarded by
the harness's grader, backpropped in micro-batches of train_microbatch, one AdamW step. Build time and the first
`--warmup` steps are excluded; reported are the median and mean over `--steps` steps, the split (generate /
reward / rest = update), the reward mean of each step, the TRL settings and what could not be matched.
trl lives in its own environment so it never enters the main one:

    python3 -m venv .venv-trl
    .venv-trl/bin/python -m pip install -q torch==2.13.0
    .venv-trl/bin/python -m pip install -q -e . "trl==1.16.0" "transformers==5.19.0" torch==2.13.0
    .venv-trl/bin/python -m dash_exp.bench.trl_grpo --steps 5 --warmup 1 --out result.json [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# harness aggregation -> the TRL loss_type with the same normalizer
#   token_mean: sum of token losses / tokens of the whole step batch = TRL "dapo" (tokens of the generation batch)
#   seq_mean_token_mean: mean over sequences of per-sequence token means = TRL "grpo"
#   seq_mean_token_sum_norm: sum / (sequences * max_new_tokens) = TRL "dr_grpo"
LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}
# harness advantage -> TRL scale_rewards (both: (r - group mean) / (Bessel group std + 1e-4), or r - group mean)
SCALE_REWARDS = {"grpo": "group", "drgrpo": "none"}
# TRL's hard-coded epsilon in the advantage denominator
TRL_ADV_EPS = 1e-4
# reported GRPOConfig fields
SETTINGS = (
    "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
    "steps_per_generation", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "beta", "num_iterations", "epsilon", "epsilon_high", "loss_type",
    "scale_rewards",
    "mask_truncated_completions", "importance_sampling_level", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "use_cpu", "bf16", "fp16", "gradient_checkpointing", "use_vllm", "shuffle_dataset", "seed",
    "log_completions", "disable_dropout", "cast_lm_head_to_fp32", "torch_compile",
)


def grpo_settings(cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """GRPOConfig keyword arguments equal to the harness config, and notes on what they cannot match."""
    a = cfg.algorithm
    samples = cfg.prompts_per_step * cfg.group_size
    if samples % cfg.train_microbatch:
        raise ValueError(f"train_microbatch={cfg.train_microbatch}: TRL needs a divisor of the step batch "
                         f"prompts_per_step*group_size={samples}")
    if not (a.train and a.policy_loss == "ppo_clip" and a.advantage in SCALE_REWARDS and a.ppo_epochs == 1
            and a.ppo_minibatches == 1):
        raise ValueError(f"algorithm={a.name}: this benchmark compares the on-policy RL step (ppo_clip loss, advantage "
                         f"{' or '.join(SCALE_REWARDS)}, one optimizer step per batch: grpo or dash)")
    accumulation = samples // cfg.train_microbatch
    infer = cfg.inference_batch if cfg.inference_batch is not None else samples
    if infer % cfg.train_microbatch or samples % infer:
        raise ValueError(f"inference_batch={infer}: TRL generates steps_per_generation micro-batches at once, so it "
                         f"must be a multiple of train_microbatch={cfg.train_microbatch} dividing the step batch")
    kwargs: dict[str, Any] = dict(
        num_generations=cfg.group_size,
        per_device_train_batch_size=cfg.train_microbatch,
        gradient_accumulation_steps=accumulation,
        # generation_batch_size = the harness's inference batch: the whole step batch for DASH (TRL's default),
        # one micro-batch at a time for GRPO
        steps_per_generation=infer // cfg.train_microbatch,
        num_iterations=1,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        # the tiny model's saved generation_config says use_cache=false (it inherits the training config), so
        # generate would recompute the whole prefix at every token; the harness samples with a KV cache
        generation_kwargs={"use_cache": True},
        beta=cfg.kl.beta,
        epsilon=a.clip_low,
        epsilon_high=a.clip_high,
        loss_type=LOSS_TYPES[a.aggregation],
        scale_rewards=SCALE_REWARDS[a.advantage],
        mask_truncated_completions=False,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip if cfg.grad_clip is not None else 0.0,
        # torch.optim.AdamW with its defaults (betas 0.9/0.999, eps 1e-8), as the harness; not the fused variant
        optim="adamw_torch",
        use_cpu=True,
        # fp32 weights with bf16 autocast, as the harness's model.dtype=bfloat16
        bf16=cfg.model.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        use_vllm=False,
        seed=cfg.seed,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        shuffle_dataset=True,
    )
    unmatched = [
        "sampling: transformers generate (DynamicCache, multinomial sampling) instead of the harness's own KV-cache "
        "loop with counter-based inverse-CDF noise: same distribution, different random draws",
        "prompt order: TRL's RepeatSampler shuffles the training set with its own seed, not the harness's "
        "ProblemStream order (different prompts each step, same distribution)",
        "micro-batches: TRL shuffles the step batch and pads every micro-batch to the longest prompt and the longest "
        "completion of the whole step batch; the harness length-sorts and pads each micro-batch to its own longest",
        "TRL's training forward also computes per-token entropy (fused LM head, always on; a metric only)",
    ]
    if cfg.filter_threshold is not None:
        unmatched.append(f"gradient filtering (filter_threshold={cfg.filter_threshold}): TRL has none and backprops "
                         "all samples, zero-advantage ones included")
    if infer != samples:
        unmatched.append(f"inference_batch={infer}: TRL's dapo loss then divides by the tokens of each generation "
                         "batch, not of the step batch (the gradient's scale differs, not its cost)")
    if a.adv_eps != TRL_ADV_EPS:
        unmatched.append(f"algorithm.adv_eps={a.adv_eps}: TRL's advantage denominator uses std + {TRL_ADV_EPS}")
    if cfg.kl.beta > 0 and cfg.kl.estimator != "k3":
        unmatched.append(f"kl.estimator={cfg.kl.estimator}: TRL's KL penalty is the k3 estimator")
    return kwargs, unmatched


def _timed(fn: Callable[..., Any], sink: dict[str, float], key: str) -> Callable[..., Any]:
    """`fn` that adds its wall time to sink[key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[key] = sink.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def run(overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Train TRL's GRPOTrainer for warmup + steps optimizer steps on the harness setup; timings and settings."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from dash_exp.config import compose_config, resolved_threads
    from dash_exp.models import load_policy, load_tokenizer, resolve_model_path
    from dash_exp.tasks.registry import build_task

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: expected steps >= 1 and warmup >= 0")
    cfg = compose_config(["logger=none", "run_dir=bench", *overrides])
    threads = resolved_threads(cfg)
    torch.set_num_threads(threads)
    kwargs, unmatched = grpo_settings(cfg)

    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    policy = load_policy(path, torch.device("cpu"))
    task = build_task(cfg.task, tokenizer)
    # TRL tokenizes text prompts with tokenizer(text=...): check it gives the harness's ids (no BOS, no template)
    probe = [p.prompt for p in task.train[:8]]
    if tokenizer(text=probe)["input_ids"] != [tokenizer.encode(t, add_special_tokens=False) for t in probe]:
        unmatched.append("prompt tokens: tokenizer(text) differs from encode(add_special_tokens=False)")

    step_rewards: list[float] = []  # rewards of the current optimizer step (one or more generation batches)
    split: dict[str, float] = {}

    def harness_reward(prompts: list[str], completions: list[str], idx: list[int], **_: Any) -> list[float]:
        """The harness's grader on the completions of the problems task.train[idx]."""
        graded = task.score(completions, [task.train[i] for i in idx])
        step_rewards.extend(graded.rewards)
        return [float(r) for r in graded.rewards]

    class StepClock(TrainerCallback):
        """perf_counter at the begin and end of every optimizer step, and the split accumulated within it."""

        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.splits: list[dict[str, float]] = []
            self.rewards: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end.append(time.perf_counter())
            self.splits.append(dict(split))
            self.rewards.append(sum(step_rewards) / max(len(step_rewards), 1))
            split.clear()
            step_rewards.clear()

    dataset = datasets.Dataset.from_dict({"prompt": [p.prompt for p in task.train],
                                          "idx": list(range(len(task.train)))})
    clock = StepClock()
    try:
        with tempfile.TemporaryDirectory(prefix="trl_grpo_bench.") as out_dir:
            args = trl.GRPOConfig(output_dir=out_dir, max_steps=warmup + steps, **kwargs)
            trainer = trl.GRPOTrainer(model=policy, reward_funcs=harness_reward, args=args, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[clock])
            # disable_tqdm adds a callback that prints the end-of-training metrics: keep stdout to the JSON
            trainer.remove_callback(PrinterCallback)
            # the split: generation (transformers generate), reward (grader), rollout (both + tensor prep)
            trainer._generate_single_turn = _timed(trainer._generate_single_turn, split, "generate")
            trainer._calculate_rewards = _timed(trainer._calculate_rewards, split, "reward")
            trainer._generate_and_score_completions = _timed(trainer._generate_and_score_completions, split,
                                                             "rollout")
            torch.set_num_threads(threads)
            trainer.train()
    finally:
        task.close()

    n = len(clock.end)
    if n != warmup + steps:
        raise RuntimeError(f"TRL ran {n} optimizer steps, expected {warmup + steps}")
    # a step lasts from the end of the previous one (or its own begin, for the very first) to its end
    starts = [clock.begin[0], *clock.end[:-1]]
    step_times = [e - s for s, e in zip(starts, clock.end, strict=True)][warmup:]
    measured = clock.splits[warmup:]
    # per step: generate, reward, rest of the rollout (tensor prep, advantages), rest of the step (backprop, AdamW)
    step_splits = [
        {"generate": s.get("generate", 0.0), "reward": s.get("reward", 0.0),
         "rollout_other": s.get("rollout", 0.0) - s.get("generate", 0.0) - s.get("reward", 0.0),
         "update": t - s.get("rollout", 0.0)}
        for s, t in zip(measured, step_times, strict=True)
    ]
    split_mean = {k: statistics.fmean(s[k] for s in step_splits) for k in step_splits[0]}
    trl_args = trainer.args
    return {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "threads": threads,
        "torch_threads_after_train": torch.get_num_threads(),
        "samples_per_step": trl_args.generation_batch_size,
        "microbatch": trl_args.per_device_train_batch_size,
        "max_new_tokens": trl_args.max_completion_length,
        "steps": steps,
        "warmup": warmup,
        "s_per_step_median": statistics.median(step_times),
        "s_per_step_mean": statistics.fmean(step_times),
        "step_times": step_times,
        "split_mean_s": split_mean,
        "step_splits": step_splits,
        "reward_mean": clock.rewards[warmup:],
        "warmup_reward_mean": clock.rewards[:warmup],
        "settings": {k: getattr(trl_args, k) for k in SETTINGS},
        "overrides": list(overrides),
        "unmatched": unmatched,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not measured")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, e.g. threads=1")
    ns = parser.parse_args(argv)
    result = run(ns.overrides, ns.steps, ns.warmup)
    text = json.dumps(result, default=str)
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text + "\n")
    # one line, last on stdout
    print(text, flush=True)


if __name__ == "__main__":
    main()
