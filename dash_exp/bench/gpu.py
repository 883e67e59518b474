"""The GPU check: the paper's step shape on the random Qwen2.5-0.5B proxy, GRPO and DASH side by side.

    python -m dash_exp.bench gpu          # one GPU, ~6 min: 64 prompts x 4 samples, 128 new tokens, 3 steps each
    python -m dash_exp.bench gpu --cpu    # the same code at test size (model=qwen2.5-test), seconds (the suite)
    scripts/gpu_check.sh                  # on a GPU machine without network: install wheels/, then the above

Needs only torch + transformers (+ this package's pure-Python dependencies); uses vLLM when it is installed
(rollout=auto). The model is `model.source=random` (exact shapes, 151,936 vocab, random weights), so speed and
memory are real and accuracy is not: nothing a random model says is correct, so rewards are drawn instead
(`synthetic_score`). Reports time/inference and time/update per algorithm, the DASH/GRPO time ratio, generation
and training tokens/s, peak CUDA memory while generating and while backpropagating, the fraction of the weights
one optimizer step at the recipe's lr changes (fp32 masters: ~1.0), and the peak memory of one micro-batch's
log-prob forward+backward chunked (model.logprob_chunk=null) against unchunked.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dash_exp.bench import bench_trainer, median
from dash_exp.tracking import peak_allocated_bytes

# one GPU within ~6 minutes: the paper's step batch (64 prompts x 4) on the 0.5B proxy; HF generation in GRPO's
# micro-batch-sized calls dominates, hence 128 new tokens (a random model never stops early: always all of them)
GPU_SHAPE = ["model=qwen2.5-0.5b", "model.source=random", "max_new_tokens=128", "epochs=null"]
# seconds on 2 CPU cores: the test-size proxy (real vocab), a small step batch
# (log-probs in chunks of 32 tokens: a micro-batch holds 4 x 64 response tokens)
CPU_SHAPE = ["model=qwen2.5-test", "prompts_per_step=4", "group_size=4", "train_microbatch=4", "max_new_tokens=64",
             "task.n_train=64", "threads=1", "rollout=hf", "lr=3e-6", "model.logprob_chunk=32"]
ALGORITHMS = ("grpo", "dash")


def synthetic_score(seed: int) -> Callable[[Sequence[str], Sequence[Any]], Any]:
    """A stand-in for `task.score`: each prompt gets a difficulty p ~ U(0, 1) (keyed by its text and `seed`), each
    sample reward ~ Bernoulli(p). Groups of 4 are then uniform (zero advantage, filtered by DASH) 40% of the time,
    so gradient filtering does real work, as on a real model."""
    from dash_exp.reward import GradeResult

    def score(responses: Sequence[str], problems: Sequence[Any]) -> GradeResult:
        rewards = []
        for k, problem in enumerate(problems):
            p = random.Random(f"{seed}:{problem.prompt}").random()
            rewards.append(float(random.Random(f"{seed}:{problem.prompt}:{k}:{responses[k]}").random() < p))
        return GradeResult(rewards=rewards, timeouts=0, unparsed=0)

    return score


def phase_peaks(trainer: Any) -> Callable[[int], dict[str, Any]]:
    """`timed_step` of the real trainer, its metrics joined by the peak CUDA memory allocated while generating
    (`collect`) and while updating (`update`), each measured on its own (None on CPU)."""
    device = next(trainer.policy.parameters()).device
    peaks: dict[str, float | None] = {}

    def measured(phase: Callable[..., Any], key: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                return phase(*args, **kwargs)
            finally:
                peaks[key] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

        return call

    trainer.collect = measured(trainer.collect, "mem/inference_cuda_peak_mb")
    trainer.update = measured(trainer.update, "mem/update_cuda_peak_mb")
    return lambda step: {**trainer.timed_step(step), **peaks}


def changed_fraction(policy: torch.nn.Module, step: Callable[[], Any]) -> float:
    """Fraction of the policy's weights (elements) that `step` changes."""
    before = [p.detach().clone() for p in policy.parameters()]
    step()
    changed = sum(int((b != p.detach()).sum()) for b, p in zip(before, policy.parameters(), strict=True))
    return changed / sum(b.numel() for b in before)


def logprob_peaks(trainer: Any, samples: list[Any]) -> dict[str, float]:
    """Peak MiB of one micro-batch's policy-gradient forward+backward, chunked (the config's logprob_chunk) and
    unchunked (one chunk holding every token)."""
    from dataclasses import replace

    from dash_exp.algorithms.update import accumulate_gradients

    micro = samples[: trainer.cfg.train_microbatch]
    device = next(trainer.policy.parameters()).device
    everything = sum(len(s.response_ids) for s in micro)
    out = {}
    for name, chunk in (("chunked", trainer.spec.logprob_chunk), ("unchunked", everything)):
        spec = replace(trainer.spec, logprob_chunk=chunk)

        def backward(spec: Any = spec) -> None:
            accumulate_gradients(trainer.policy, micro, spec, 1.0, len(micro), trainer.pad_id)
            trainer.policy.zero_grad(set_to_none=True)

        backward()  # warm-up: allocator pools, gradient buffers of the same size
        out[f"logprob_{name}_peak_mb"] = peak_allocated_bytes(backward, device) / 2**20
    out["logprob_chunked_over_unchunked"] = out["logprob_chunked_peak_mb"] / out["logprob_unchunked_peak_mb"]
    return out


def run(overrides: list[str], steps: int = 3, cpu: bool = False, out: Path = Path("runs/bench")) -> dict[str, Any]:
    """GRPO and DASH trainers on one set of components (one policy, one sampler), one step each in turn (order
    alternating); step 1 of each is a warm-up, left out of the medians. Each trainer's run dir: out/gpu/<algorithm>."""
    if steps < 2:
        raise ValueError(f"--steps {steps}: expected >= 2 (the first step of each algorithm is a warm-up)")
    shape = CPU_SHAPE if cpu else GPU_SHAPE
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("bench gpu: no CUDA device (use --cpu for the test-size flavour)")
    from dash_exp.config import compose_config, resolved_threads
    from dash_exp.factory import build, seed_everything

    cfgs = {a: compose_config(["logger=none", f"run_dir={out / 'gpu' / a}", f"algorithm={a}", f"steps={steps}",
                               *shape, *overrides]) for a in ALGORITHMS}
    cfg = cfgs["dash"]
    seed_everything(cfg.seed, resolved_threads(cfg))
    parts = build(cfg)
    parts.task.score = synthetic_score(cfg.seed)
    trainers = {a: bench_trainer(cfgs[a], parts, f"gpu-{a}") for a in ALGORITHMS}
    rows: dict[str, list[dict[str, Any]]] = {a: [] for a in ALGORITHMS}
    try:
        grpo = trainers["grpo"]
        timed_step = {a: phase_peaks(trainer) for a, trainer in trainers.items()}
        # one step at the recipe's lr: fp32 masters must move (nearly) every weight; bf16 weights would not
        fraction = changed_fraction(grpo.policy, lambda: rows["grpo"].append(timed_step["grpo"](1)))
        rows["dash"].append(timed_step["dash"](1))
        for step in range(2, steps + 1):
            for algorithm in ALGORITHMS if step % 2 else reversed(ALGORITHMS):
                rows[algorithm].append(timed_step[algorithm](step))
        samples, _, _ = grpo.collect(steps + 1)
        peaks = logprob_peaks(grpo, samples)
    finally:
        for trainer in trainers.values():
            trainer.sink.close()
        parts.close()
    return summarize(cfg, rows, fraction, peaks, cpu)


def summarize(cfg: Any, rows: dict[str, list[dict[str, Any]]], fraction: float, peaks: dict[str, float],
              cpu: bool) -> dict[str, Any]:
    """Medians over the timed steps (all but the first) per algorithm, and the DASH/GRPO ratios."""
    keys = ("time/step", "time/inference", "time/update", "throughput/gen_tokens_per_s",
            "throughput/train_tokens_per_s", "filter/kept_frac", "mem/inference_cuda_peak_mb",
            "mem/update_cuda_peak_mb")
    per_algorithm = {}
    for algorithm, steps in rows.items():
        timed = steps[1:]
        per_algorithm[algorithm] = {k: (median([r[k] for r in timed]) if timed[0][k] is not None else None)
                                    for k in keys}
    grpo, dash = per_algorithm["grpo"], per_algorithm["dash"]
    from dash_exp.rollout.registry import resolved_rollout

    return {
        "flavour": "cpu" if cpu else "gpu", "device": torch.cuda.get_device_name() if not cpu else "cpu",
        "model": cfg.model.name, "source": cfg.model.source, "dtype": cfg.model.dtype,
        "rollout": resolved_rollout(cfg.rollout.name), "prompts_per_step": cfg.prompts_per_step,
        "group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
        "train_microbatch": cfg.train_microbatch, "lr": cfg.lr, "timed_steps": len(rows["grpo"]) - 1,
        **per_algorithm,
        "ratio": {k: dash[k] / grpo[k] for k in ("time/step", "time/inference", "time/update")},
        "weights_changed_by_one_step": fraction, **peaks,
    }


def table(result: dict[str, Any]) -> str:
    """The check's result as one Markdown table."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [f"GPU check ({result['flavour']}: {result['device']}; {result['model']} {result['source']}, "
             f"{result['dtype']} compute, rollout={result['rollout']}, {result['prompts_per_step']} prompts x "
             f"{result['group_size']}, {result['max_new_tokens']} new tokens, micro-batch "
             f"{result['train_microbatch']}; medians of {result['timed_steps']} steps after a warm-up)", "",
             "| metric | GRPO | DASH | DASH/GRPO |", "|---|---|---|---|"]
    for key in result["grpo"]:
        ratio = result["ratio"].get(key)
        lines.append(f"| {key} | {fmt(result['grpo'][key])} | {fmt(result['dash'][key])} | {fmt(ratio)} |")
    lines += ["", "| check | value |", "|---|---|",
              f"| weights changed by one step at lr {result['lr']} | {result['weights_changed_by_one_step']:.4f} |",
              f"| log-prob fwd+bwd peak, chunked (MiB) | {result['logprob_chunked_peak_mb']:.1f} |",
              f"| log-prob fwd+bwd peak, unchunked (MiB) | {result['logprob_unchunked_peak_mb']:.1f} |",
              f"| chunked / unchunked | {result['logprob_chunked_over_unchunked']:.3f} |"]
    return "\n".join(lines)
