"""The component factory: every entrypoint (run, evaluate, traces, bench) builds what it trains or evaluates with
here, and none of them imports another.

`build` turns a validated config into a `Components` bundle (task, tokenizer, policy, reference, sampler, SFT
items); `seed_everything` seeds and sets the thread count; `drop_long_prompts` applies max_prompt_tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dash_exp.config import ConfigError, trains_on_targets
from dash_exp.distributed import SINGLE, World

if TYPE_CHECKING:
    from dash_exp.batching import TokenCache


@dataclass
class Components:
    """Everything a run trains with; `ref` is None unless the KL penalty is on."""

    task: Any
    tokenizer: Any
    policy: Any
    ref: Any
    sampler: Any
    sft_items: list | None
    # training prompts dropped as longer than max_prompt_tokens
    dropped_prompts: int = 0
    # the directory (or hub id) the policy was loaded from: for the tiny model, its cache key
    model_path: str = ""

    def close(self) -> None:
        """Stop the grader's workers and shut the sampler's engine down (a sweep runs its jobs in one process:
        the next job must find the memory free)."""
        self.task.close()
        self.sampler.close()


def seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Any, need_train: bool = True, world: World = SINGLE, device: Any = None,
          role: str | None = None) -> Components:
    """Task, tokenizer, policy, reference (only when kl.beta > 0) and sampler for a validated config; in a
    data-parallel `world`, the policy sharded with FSDP2 over the ranks.

    `role` in a launch split for overlapped rollout: "trainer" builds the HF sampler whatever rollout.name says
    (the trainers' sampler only evaluates: no second engine on their devices); "generator" builds no reference,
    its policy is the copy its sampler generates from, and a vLLM engine gets a worker process of its own (its
    torch.distributed world is not the launch's)."""
    from dash_exp.batching import TokenCache
    from dash_exp.models import build_reference, load_policy, load_tokenizer, resolve_model_path
    from dash_exp.rollout.registry import build_sampler
    from dash_exp.tasks.registry import build_task

    sft_items = None
    if trains_on_targets(cfg) and cfg.algorithm.sft_source == "traces":
        from dash_exp.tasks.traces import load_traces

        sft_items = load_traces(Path(cfg.algorithm.traces_path))
    # the data first, so that a missing dataset fails before any model is built or loaded; only chat prompts
    # need the tokenizer to format them
    task = None if cfg.task.prompt_format == "chat" else build_task(cfg.task, None, need_train)
    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    if task is None:
        task = build_task(cfg.task, tokenizer, need_train)
    tokens = TokenCache(tokenizer)  # each training prompt is tokenized once here (dropping, vLLM's KV sizing)
    dropped = 0
    if need_train and cfg.max_prompt_tokens is not None:
        total = len(task.train)
        task.train = drop_long_prompts(task.train, tokens, cfg.max_prompt_tokens)
        dropped = total - len(task.train)
        if world.main:
            print(f"max_prompt_tokens={cfg.max_prompt_tokens}: dropped {dropped} of {total} training prompts "
                  f"({len(task.train)} kept)", flush=True)
    policy = load_policy(path, device, gradient_checkpointing=cfg.model.gradient_checkpointing)
    if world.parallel:
        from dash_exp.batching import COMPUTE_DTYPES
        from dash_exp.distributed import shard

        shard(policy, COMPUTE_DTYPES[cfg.model.dtype], device, world)
    ref = build_reference(path, cfg.model.dtype, device) if cfg.kl.beta > 0 and role != "generator" else None
    sampler = build_sampler(cfg, policy, tokens, path, [p.prompt for p in task.train], world.parallel,
                            backend="hf" if role == "trainer" else None, own_worker=role == "generator")
    return Components(task, tokenizer, policy, ref, sampler, sft_items, dropped, path)


def drop_long_prompts(problems: list[Any], tokens: TokenCache, max_tokens: int) -> list[Any]:
    """The problems whose prompt, tokenized as the sampler sees it, has at most `max_tokens` tokens (a truncated
    problem is another problem, so longer ones are dropped, not cut); ConfigError when none is left."""
    kept = [p for p in problems if len(tokens(p.prompt)) <= max_tokens]
    if problems and not kept:
        shortest = min(len(tokens(p.prompt)) for p in problems)
        raise ConfigError(f"max_prompt_tokens={max_tokens}: every one of the {len(problems)} training prompts is "
                          f"longer (the shortest has {shortest} tokens)")
    return kept
