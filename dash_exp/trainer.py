"""The training loop shared by GRPO, DASH, PPO and SFT. No backend or model specifics live here.

One RL step: prompts -> sampler calls of `inference_batch` samples -> rewards -> group advantages ->
gradient filtering -> ppo_epochs x ppo_minibatches optimizer steps, each micro-batched -> sampler sync.
GRPO and DASH differ only in config (sampler call size, filter threshold). With generator ranks
(dash_exp.overlap) the step's graded rollouts come from them instead, and the sync publishes the new weights.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dash_exp.algorithms.advantages import ADVANTAGES, backprop_set, gradient_filter, kl_beta_effective
from dash_exp.algorithms.losses import normalizer
from dash_exp.algorithms.selection import informative_groups, overlong_penalty
from dash_exp.algorithms.update import SUMS, LossSpec, UpdateStats, accumulate_gradients, old_logprobs
from dash_exp.batching import COMPUTE_DTYPES, TokenCache, TrainSample
from dash_exp.checkpoint import (
    apply_policy_state,
    fit_error,
    full_state,
    load_full_optimizer_state,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from dash_exp.config import resolved_inference_batch, step_batch, trains_on_targets
from dash_exp.distributed import SINGLE, World, all_gather, barrier, deal, deal_groups, full_tensor
from dash_exp.evaluation import evaluate, generate_in_chunks
from dash_exp.overlap import GeneratorLink
from dash_exp.reward import GradeResult, merge_graded
from dash_exp.rollout.base import Rollout, Sampler, SamplingParams, mix32
from dash_exp.tasks.base import Problem, ProblemStream
from dash_exp.tracking import MetricSink, Timers, peak_memory_mb, reset_peak_memory


@dataclass
class Draw:
    """One round of a step's graded rollouts from the rollout source."""

    rollouts: list[Rollout]
    graded: GradeResult
    # seconds of generation (the slowest rank's)
    gen_time: float
    # per rollout: optimizer steps between the weights that sampled it and the ones it updates (None: all 0)
    lags: list[int] | None = None
    # the source's own metrics (async/* of generator ranks)
    metrics: dict[str, float] = field(default_factory=dict)


def informative_count(draws: list[Draw], group_size: int) -> int:
    """Groups among the draws whose rewards are not all equal."""
    rewards = torch.tensor([x for d in draws for x in d.graded.rewards])
    return int(informative_groups(rewards, group_size).sum())


def total_steps(cfg: Any, n_items: int) -> int:
    """cfg.steps, or ceil(epochs * items / items per step) when cfg.epochs is set; 0 where algorithm.train is
    false (the starting model, evaluated only)."""
    if not cfg.algorithm.train:
        return 0
    if cfg.epochs is None:
        return int(cfg.steps)
    per_step = step_batch(cfg) if trains_on_targets(cfg) else cfg.prompts_per_step
    return math.ceil(cfg.epochs * n_items / per_step)


def loss_spec(cfg: Any) -> LossSpec:
    a = cfg.algorithm
    return LossSpec(
        policy_loss=a.policy_loss, aggregation=a.aggregation, temperature=cfg.temperature,
        clip_low=a.clip_low, clip_high=a.clip_high, beta=cfg.kl.beta, estimator=cfg.kl.estimator,
        entropy_coef=a.entropy_coef, rollout_correction=a.rollout_correction, correction_low=a.correction_low,
        correction_high=a.correction_high,
        compute_dtype=COMPUTE_DTYPES[cfg.model.dtype], logprob_chunk=cfg.model.logprob_chunk,
        share_prompt=cfg.model.share_prompt,
    )


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Trainer:
    """Owns the optimizer, the data stream and the loop; talks to the sampler only through its protocol."""

    def __init__(self, cfg: Any, policy: torch.nn.Module, tokenizer: Any, sampler: Sampler, task: Any,
                 sink: MetricSink, run_dir: Path, ref: torch.nn.Module | None = None,
                 sft_items: list[Problem] | None = None, world: World = SINGLE,
                 generators: GeneratorLink | None = None) -> None:
        self.cfg, self.policy, self.sampler, self.task, self.sink = cfg, policy, sampler, task, sink
        self.ref, self.run_dir, self.world = ref, run_dir, world
        # overlapped rollout: the generator ranks sample; the trainers' own sampler only evaluates
        self.generators = generators
        # the sampler's weights are older than the policy's: SFT steps never sample, so they leave its sync to the
        # next evaluation (a vLLM engine holds a copy of its own; the HF sampler shares the policy)
        self.sampler_stale = False
        self.tokens = TokenCache(tokenizer)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.is_sft = trains_on_targets(cfg)
        items = sft_items if sft_items is not None else task.train
        self.stream = ProblemStream(items, seed=cfg.seed)
        self.steps = total_steps(cfg, len(items))
        self.spec = loss_spec(cfg)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.timers = Timers()
        reset_peak_memory()
        # skipped optimizer steps: in a row (stops the run at max_nonfinite_steps) and in total
        self.nonfinite_run = 0
        self.nonfinite_total = 0
        self.step = 0
        self.elapsed = 0.0
        self.initial_eval: dict[str, float] = {}
        self.sampling = SamplingParams.from_config(cfg, cfg.group_size)
        # the rollout source: where a step's graded rollouts come from (every knob downstream, in `score`, is the same)
        self.draw = self.draw_local if generators is None else self.draw_generators

    # ---------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) policy and optimizer state on the CPU, whatever the world size, so a run resumes on
        any number of ranks (a collective under data parallelism: every rank calls it)."""
        policy, optimizer = full_state(self.policy, self.optimizer)
        state = {"policy": policy, "optimizer": optimizer, "stream": self.stream.state_dict()}
        meta = {"elapsed": self.elapsed, "initial_eval": self.initial_eval, "wandb_id": self.sink.wandb_id,
                "nonfinite_total": self.nonfinite_total}
        return state, meta

    def save(self) -> None:
        state, meta = self.state()
        if self.world.main:
            save_checkpoint(self.run_dir, self.step, state, meta, keep=self.cfg.keep_checkpoints)
        barrier(self.world)

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint; push the restored weights to the sampler. Under data parallelism (every rank
        of the launch a trainer) only rank 0 reads the file: the weights and optimizer state reach the others by
        broadcast, tensor by tensor, each keeping only its shards (8 ranks of Qwen2.5-3B would otherwise each hold
        the whole ~36 GB state in host memory at once)."""
        shared = self.world.parallel and torch.distributed.get_world_size() == self.world.size
        if shared:
            state, meta, error = {"policy": {}, "optimizer": {}}, {}, None
            if self.world.main:  # a file it cannot read, or one of another model: every rank stops, none hangs
                try:
                    state, meta = read_checkpoint(path)
                    error = fit_error(self.policy, state["policy"], self.optimizer, state["optimizer"])
                except (OSError, ValueError, KeyError) as exc:
                    error = str(exc)
            small = [(state.get("stream"), state.get("rng"), meta, error)]
            torch.distributed.broadcast_object_list(small, src=0)
            state["stream"], state["rng"], meta, error = small[0]
            if error:  # every rank stops here, before any collective that rank 0 would not join
                raise ValueError(f"{path}: checkpoint does not fit the configured model ({error})")
        else:
            state, meta = read_checkpoint(path)
        restore_rng(state["rng"])
        apply_policy_state(self.policy, state, path, broadcast=shared)
        load_full_optimizer_state(self.policy, self.optimizer, state["optimizer"], broadcast=shared)
        self.stream.load_state_dict(state["stream"])
        self.step, self.elapsed, self.initial_eval = meta["step"], meta["elapsed"], meta["initial_eval"]
        self.nonfinite_total = meta["nonfinite_total"]
        self.sampler.sync(self.policy)

    # ---------------------------------------------------------------- loop
    def fit(self, resume_from: Path | None = None) -> dict[str, Any]:
        """Train to the last step (from `resume_from` if given), evaluate, checkpoint; return the summary."""
        if resume_from is not None:
            self.resume(resume_from)
        if self.generators is not None:  # they sample step 1 while the trainers evaluate
            self.generators.start(self.step, self.steps, self.stream.state_dict(), self.policy)
        if not self.initial_eval:
            self.initial_eval = self.evaluate()
            self.sink.log(0, self.initial_eval)
        bar = tqdm(range(self.step + 1, self.steps + 1), initial=self.step, total=self.steps,
                   desc=f"{self.cfg.algorithm.name} kl={self.cfg.kl.name}", unit="step", dynamic_ncols=True,
                   disable=not self.world.main)
        last: dict[str, float] = {}
        for step in bar:
            metrics = self.timed_step(step)
            self.elapsed += metrics["time/step"]
            metrics["time/elapsed"] = self.elapsed
            metrics["epoch"] = self.stream.epoch
            metrics.update(peak_memory_mb())
            if step < self.steps and self.cfg.eval_every and step % self.cfg.eval_every == 0:
                metrics.update(self.evaluate())
            self.sink.log(step, metrics)
            last = metrics
            if self.nonfinite_run >= self.cfg.max_nonfinite_steps:
                self.stop_nonfinite()
            bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                            loss=f"{metrics.get('loss/total', float('nan')):.3f}")
            if step < self.steps and self.cfg.save_every and step % self.cfg.save_every == 0:
                self.save()
            if self.cfg.time_budget_s is not None and self.elapsed >= self.cfg.time_budget_s:
                break
        bar.close()
        self.stop_generators()
        final = self.evaluate()
        self.sink.log(self.step, final)
        self.save()
        return {"steps": self.step, "resumed": resume_from is not None, "time/elapsed": self.elapsed,
                "initial": self.initial_eval, "final": final, "last_step": last}

    def stop_nonfinite(self) -> None:
        """Stop at the end of a step whose last optimizer steps were all non-finite (and skipped, so the weights
        are the last good ones): a checkpoint labelled with this step, its weights, optimizer state and prompt
        stream all as they are at its end (under PPO, earlier mini-batch steps of it may have applied), so that
        resuming continues with the next step's prompts."""
        self.save()
        self.stop_generators()
        raise NonFiniteError(
            f"step {self.step}: {self.nonfinite_run} optimizer steps in a row had a non-finite loss or gradient; "
            f"stopped with the last good weights saved in {self.run_dir / 'checkpoints'} as step {self.step} "
            "(lower lr, or check the data)")

    def stop_generators(self) -> None:
        if self.generators is not None:
            self.generators.stop()

    def evaluate(self) -> dict[str, float]:
        if self.generators is not None or self.sampler_stale:  # not synced at every step
            self.sampler.sync(self.policy)
            self.sampler_stale = False
        sampled = SamplingParams.from_config(self.cfg, self.cfg.eval_samples, evaluation=True)
        start = time.perf_counter()
        metrics = evaluate(self.sampler, self.tokens, self.task, sampled, self.cfg.seed,
                           max(resolved_inference_batch(self.cfg), self.cfg.eval_samples), self.cfg.task.eval_size)
        return {**metrics, "time/eval": time.perf_counter() - start}

    # ---------------------------------------------------------------- steps
    def timed_step(self, step: int) -> dict[str, float]:
        """Optimizer step `step` (SFT or RL): its metrics, phase times (time/inference, ...) and time/step."""
        start = time.perf_counter()
        self.step = step
        metrics = self.sft_step() if self.is_sft else self.rl_step(step)
        metrics.update(self.timers.pop())
        metrics["time/step"] = time.perf_counter() - start
        return metrics

    def rl_step(self, step: int) -> dict[str, float]:
        samples, keep, metrics = self.collect(step)
        metrics.update(self.update(samples, keep, step))
        with self.timers("sync"):
            if self.generators is None:
                self.sampler.sync(self.policy)
            elif step < self.steps:
                self.generators.publish(self.policy, step)
        return metrics

    # ---------------------------------------------------------------- rollouts
    def collect(self, step: int) -> tuple[list[TrainSample], list[bool], dict[str, float]]:
        """Step `step`'s training batch: its prompts' graded rollouts from the rollout source (`draw`), more rounds
        of prompts where dynamic sampling asks for them, then scored (`score`): (samples with advantages, the mask
        of samples kept for backprop, metrics)."""
        cfg = self.cfg
        problems: list[Problem] = self.stream.next(cfg.prompts_per_step)
        draws = [self.draw(step, problems, 0)]
        rounds = cfg.algorithm.dynamic_sampling_rounds
        while rounds and len(draws) <= rounds and informative_count(draws, cfg.group_size) < cfg.prompts_per_step:
            more: list[Problem] = self.stream.next(cfg.prompts_per_step)
            draws.append(self.draw(step, more, len(draws) * cfg.prompts_per_step))
        return self.score(draws)

    def draw_local(self, step: int, problems: list[Problem], first: int) -> Draw:
        """Rollout source: the trainers' own sampler. Data parallel: each rank samples its share of the prompts
        (whole groups), each with the seed of its index in the step (`first` + its place in `problems`), so the
        rollouts are those one process would sample; then every rank gathers them all."""
        cfg = self.cfg
        mine = self.world.shares(len(problems))
        prompts = [self.tokens(p.prompt) for p in problems[mine]]
        seeds = [mix32(cfg.seed, step, first + i) for i in range(len(problems))][mine]
        with self.timers("inference"):
            start = time.perf_counter()
            rollouts = generate_in_chunks(self.sampler, prompts, self.sampling, seeds,
                                          resolved_inference_batch(cfg))
            gen_time = time.perf_counter() - start
            self.sampler.offload()
        with self.timers("reward"):
            texts = [self.tokens.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
            graded = self.task.score(texts, [p for p in problems[mine] for _ in range(cfg.group_size)])
        if self.world.parallel:
            gathered = all_gather((rollouts, graded, gen_time), self.world)
            rollouts = [r for part, _, _ in gathered for r in part]
            graded = merge_graded([g for _, g, _ in gathered])
            gen_time = max(t for _, _, t in gathered)
        return Draw(rollouts, graded, gen_time)

    def draw_generators(self, step: int, problems: list[Problem], first: int) -> Draw:
        """Rollout source: the generator ranks (overlapped rollout). They draw the same prompts from their own copy
        of the stream; a batch sampled by weights `lag` optimizer steps older is marked so (`score` gives its samples
        their behaviour log-probs and the ratio cap)."""
        with self.timers("trainer_idle"):
            batches = self.generators.receive(step)
        rollouts = [r for b in batches for r in b.rollouts]
        gen_time = max(b.gen_time for b in batches)
        lags = [step - 1 - b.version for b in batches for _ in b.rollouts]
        metrics = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": max(lags),
                   "time/inference": gen_time, "time/generator_idle": max(b.idle_time for b in batches)}
        return Draw(rollouts, merge_graded([b.graded for b in batches]), gen_time, lags, metrics)

    def score(self, draws: list[Draw]) -> tuple[list[TrainSample], list[bool], dict[str, float]]:
        """The step batch from its draws: the groups it trains on (dynamic sampling: the first prompts_per_step
        groups whose rewards differ), rewards shaped by length, advantages, the gradient-filter and overlong masks,
        and the metrics (reward/* and response/* of the step's own prompts, the first draw, as every arm samples
        them)."""
        cfg, a = self.cfg, self.cfg.algorithm
        first = draws[0]
        rollouts = [r for d in draws for r in d.rollouts]
        rewards = torch.tensor([x for d in draws for x in d.graded.rewards])
        lags = [lag for d in draws for lag in (d.lags or [0] * len(d.rollouts))]
        metrics = {**first.metrics, **self.draw_metrics(draws)}
        if a.dynamic_sampling_rounds:
            groups = informative_groups(rewards, cfg.group_size).nonzero().flatten().tolist()[: cfg.prompts_per_step]
            groups = groups or list(range(len(first.rollouts) // cfg.group_size))  # none differ: the step's own
            index = [g * cfg.group_size + j for g in groups for j in range(cfg.group_size)]
            rollouts, rewards, lags = [rollouts[i] for i in index], rewards[index], [lags[i] for i in index]
            metrics.update({"sampling/rounds": len(draws), "sampling/groups": len(groups),
                            "sampling/samples_drawn": sum(len(d.rollouts) for d in draws)})
        if a.overlong_buffer:
            penalty = overlong_penalty([len(r.response_ids) for r in rollouts], cfg.max_new_tokens,
                                       round(a.overlong_buffer * cfg.max_new_tokens), a.overlong_penalty)
            rewards = (rewards.double() + penalty).float()
            metrics["reward/overlong_penalty"] = float(penalty.mean())
        adv = ADVANTAGES[a.advantage](rewards, cfg.group_size, a.adv_eps)
        keep = gradient_filter(adv, cfg.filter_threshold)
        if a.overlong_filter:
            truncated = torch.tensor([r.truncated for r in rollouts])
            keep = keep & ~truncated
            metrics["filter/overlong_frac"] = float(truncated.float().mean())
        samples = [TrainSample(r.prompt_ids, r.response_ids, float(v), sampler_logprobs=r.logprobs)
                   for r, v in zip(rollouts, adv, strict=True)]
        device = next(self.policy.parameters()).device
        cap = cfg.rollout.ratio_cap if cfg.rollout.ratio_cap is not None else math.inf
        for sample, rollout, lag in zip(samples, rollouts, lags, strict=True):
            if lag > 0:  # sampled by older weights: the ratio's denominator is the sampler's, capped
                sample.old_logprobs = torch.tensor(rollout.logprobs, dtype=torch.float32, device=device)
                sample.ratio_cap = cap
        metrics.update({"adv/abs_mean": float(adv.abs().mean()), "filter/kept_frac": float(keep.float().mean())})
        return samples, keep.tolist(), metrics

    def draw_metrics(self, draws: list[Draw]) -> dict[str, float]:
        """reward/* and response/* of the first draw (the step's own prompts); generation throughput over all."""
        first = draws[0]
        rewards = torch.tensor(first.graded.rewards)
        lengths = [len(r.response_ids) for r in first.rollouts]
        drawn = sum(len(r.response_ids) for d in draws for r in d.rollouts)
        return {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/timeouts": first.graded.timeouts, "reward/unparsed": first.graded.unparsed,
            **{f"reward/{k}": v for k, v in first.graded.counts.items()},
            "response/length_mean": sum(lengths) / len(lengths),
            "response/truncated_frac": sum(r.truncated for r in first.rollouts) / len(first.rollouts),
            "throughput/gen_tokens_per_s": drawn / max(sum(d.gen_time for d in draws), 1e-9),
        }

    def sft_step(self) -> dict[str, float]:
        items: list[Problem] = self.stream.next(step_batch(self.cfg))
        samples = [TrainSample(self.tokens(p.prompt), self.tokens(p.solution) + [self.eos_id]) for p in items]
        metrics = self.update(samples, [True] * len(samples), self.step)
        metrics["loss/sft"] = metrics.pop("loss/pg")
        self.sampler_stale = True  # synced before the next evaluation, the only thing SFT samples for
        return metrics

    # ---------------------------------------------------------------- update
    def update(self, samples: list[TrainSample], keep: list[bool], step: int) -> dict[str, float]:
        """ppo_epochs x ppo_minibatches optimizer steps; normalizers from each mini-batch BEFORE filtering. A filtered
        sample's KL term is dropped with it or kept (`filter_kl`, `backprop_set`)."""
        cfg, a = self.cfg, self.cfg.algorithm
        samples, keep = backprop_set(samples, keep, cfg.filter_kl, self.spec.beta)
        beta_effective = kl_beta_effective(samples, keep, self.spec.beta, a.aggregation)
        with self.timers("update"):
            start = time.perf_counter()
            off_policy = a.ppo_epochs * a.ppo_minibatches > 1
            if off_policy:  # samples of older weights keep their behaviour log-probs
                self.old_logprobs([s for s, k in zip(samples, keep, strict=True) if k and s.old_logprobs is None])
            # running sums of the optimizer steps' statistics, as host floats (each step's are read once, together
            # with its gradient norm, in optimizer_step: the update's only device reads)
            total = {**dict.fromkeys(SUMS, 0.0), "tokens": 0, "forward_samples": 0}
            grad_norms, optimizer_steps, kept_per_rank, balance = [], 0, [], []
            indices = list(range(len(samples)))
            size = len(samples) // a.ppo_minibatches
            for epoch in range(a.ppo_epochs):
                if a.ppo_minibatches > 1:
                    random.Random(mix32(cfg.seed, step, epoch)).shuffle(indices)
                for start_idx in range(0, len(indices), size):
                    chunk = indices[start_idx: start_idx + size]
                    norm = normalizer([len(samples[i].response_ids) for i in chunk], a.aggregation,
                                      cfg.max_new_tokens)
                    kept = [samples[i] for i in chunk if keep[i]]
                    if not kept:
                        continue
                    shares, passes = self.deal(kept)
                    stats = accumulate_gradients(self.policy, [kept[i] for i in shares[self.world.rank]], self.spec,
                                                 norm, cfg.train_microbatch, self.pad_id, self.ref, passes)
                    if self.world.parallel:
                        kept_per_rank += [len(share) for share in shares]
                        rank_tokens = [sum(kept[i].length for i in share) for share in shares]
                        balance.append(min(rank_tokens) / max(rank_tokens))
                        torch.distributed.all_reduce(stats.sums, group=self.world.group)  # summed over ranks
                        stats.tokens = sum(len(s.response_ids) for s in kept)
                        stats.forward_samples = len(kept)
                    grad_norm = self.optimizer_step(stats)
                    if grad_norm is None:
                        if self.nonfinite_run >= cfg.max_nonfinite_steps:
                            break  # the run stops at this step's end (fit): nothing more is applied
                        continue
                    grad_norms.append(grad_norm)
                    optimizer_steps += 1
                    _add(total, stats)
                if self.nonfinite_run >= cfg.max_nonfinite_steps:
                    break
            update_time = time.perf_counter() - start
        tokens = max(total["tokens"], 1)
        n_opt = max(optimizer_steps, 1)
        parallel = {"dist/kept_per_rank_min": min(kept_per_rank), "dist/kept_per_rank_max": max(kept_per_rank),
                    "dist/token_balance": min(balance)} if kept_per_rank else {}
        if self.generators is not None:
            parallel["async/capped_frac"] = total["capped"] / tokens
        if self.spec.entropy_coef > 0:
            parallel["entropy/mean"] = total["entropy_sum"] / tokens
        if total["mismatch_tokens"]:
            sampled = total["mismatch_tokens"]
            parallel.update({"mismatch/ratio_mean": total["mismatch_ratio_sum"] / sampled,
                             "mismatch/outside_frac": total["mismatch_outside"] / sampled,
                             "mismatch/corrected_frac": total["corrected"] / sampled})
        return {
            **parallel,
            "loss/total": total["loss"] / n_opt, "loss/pg": total["pg"] / n_opt, "loss/kl": total["kl_loss"] / n_opt,
            "kl/mean": total["kl_sum"] / tokens, "kl/beta_effective": beta_effective,
            "ppo/clip_frac": total["clipped"] / tokens,
            "ppo/approx_kl": total["approx_kl_sum"] / tokens, "ppo/optimizer_steps": optimizer_steps,
            "grad/norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "filter/forward_samples": total["forward_samples"], "loss/nonfinite_steps": self.nonfinite_total,
            "throughput/train_tokens_per_s": total["tokens"] / max(update_time, 1e-9),
        }

    def deal(self, kept: list[TrainSample]) -> tuple[list[list[int]], int | None]:
        """Which of the step's kept samples each rank processes, and the passes every rank runs (None: one
        process, all of them, micro-batches as they come)."""
        if not self.world.parallel:
            return [list(range(len(kept)))], None
        if not self.spec.share_prompt:
            return deal([s.length for s in kept], self.world.size, self.cfg.train_microbatch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(kept):  # a group's samples stay on one rank, where they share their prompt's forward
            groups.setdefault(tuple(s.prompt_ids), []).append(i)
        costs = [len(prompt) + sum(len(kept[i].response_ids) for i in members) for prompt, members in groups.items()]
        return deal_groups(list(groups.values()), costs, self.world.size, self.cfg.train_microbatch)

    def old_logprobs(self, kept: list[TrainSample]) -> None:
        """PPO: the pre-update policy's log-probs of the kept samples (data parallel: each rank computes its deal,
        then every rank gathers all of them)."""
        shares, passes = self.deal(kept)
        mine = [kept[i] for i in shares[self.world.rank]]
        old_logprobs(self.policy, mine, self.pad_id, self.spec, self.cfg.train_microbatch, passes)
        if not self.world.parallel:
            return
        computed = all_gather([s.old_logprobs.cpu() for s in mine], self.world)
        device = next(self.policy.parameters()).device
        for share, logprobs in zip(shares, computed, strict=True):
            for i, lp in zip(share, logprobs, strict=True):
                kept[i].old_logprobs = lp.to(device)

    def optimizer_step(self, stats: UpdateStats) -> float | None:
        """Clip and step; returns the gradient norm, or None when the step was skipped as non-finite.

        The step's one device read: the gradient norm together with `stats`' sums (its loss decides the skip)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        # FSDP: the norm of the whole (sharded) gradient, the same on every rank, so all ranks skip or step alike
        norm = stats.read(full_tensor(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)))[-1]
        loss = stats.loss
        if not (math.isfinite(norm) and math.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            return None
        self.nonfinite_run = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def _add(total: dict[str, float], stats: UpdateStats) -> None:
    """Add one optimizer step's statistics (already read by optimizer_step: no device read) to the totals."""
    for name, value in stats.as_dict().items():
        total[name] += value
