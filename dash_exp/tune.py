"""tune=auto: measure, before training, on the run's own model, sampler and prompts,

- the largest micro-batch whose backward pass of worst-case-length samples fits (GPU: doubling until CUDA
  runs out of memory; CPU, where running out of RAM kills the process instead: the bytes the forward saves
  for backward at micro-batches 1, 2 and 4, counted exactly with saved_tensors_hooks, extrapolated linearly
  against a budget);
- train_microbatch: within that, where backprop throughput on real rollouts stops rising (larger
  micro-batches pad more: on CPU the largest that fits is slower than a moderate one);
- inference_batch: the sampler-call size (whole groups) where generation throughput stops rising.

"Stops rising": doubling the size gains less than GAIN in tokens/s (best of two timings). Both are capped at
the step batch: neither can usefully be larger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample
from dash_exp.config import step_batch
from dash_exp.rollout.base import Sampler, SamplingParams
from dash_exp.tracking import memory_available_mb

# a doubled batch must raise tokens/s by this factor to count as still rising
GAIN = 1.1
# share of the available memory the CPU backward may add when tune_memory_gb is null
MEMORY_SHARE = 0.8
# CPU: peak memory of a backward pass per MB of activations saved by its forward (activations + their gradients)
BACKWARD_FACTOR = 2.0
# micro-batches per backprop timing
MICROBATCHES = 4
TUNE_FILE = "tune.json"


@dataclass
class TuneResult:
    train_microbatch: int
    inference_batch: int
    # inference batch (samples) -> generation tokens/s
    throughput: dict[int, float] = field(default_factory=dict)
    # the largest micro-batch that fits, and micro-batch -> backprop tokens/s (up to it)
    largest_fit: int = 0
    train_throughput: dict[int, float] = field(default_factory=dict)
    # micro-batch -> MB: saved activations (CPU) or peak allocated (CUDA; None where it ran out of memory)
    memory: dict[int, float | None] = field(default_factory=dict)
    # what the micro-batch had to fit in (MB), and how it was decided
    budget_mb: float = 0.0
    method: str = ""
    # wall-clock seconds the probes took
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {"tune/train_microbatch": self.train_microbatch, "tune/inference_batch": self.inference_batch,
                "tune/seconds": self.seconds}

    def describe(self) -> str:
        def tps(by_size: dict[int, float]) -> str:
            return ", ".join(f"{b}: {v:,.0f}" for b, v in by_size.items())

        return (f"tune=auto: train_microbatch={self.train_microbatch} (backprop tokens/s by micro-batch: "
                f"{tps(self.train_throughput)}; fits up to {self.largest_fit}: {self.method}); "
                f"inference_batch={self.inference_batch} (generation tokens/s by batch: {tps(self.throughput)}); "
                f"probed in {self.seconds:.1f} s")

    def save(self, run_dir: Path) -> None:
        (run_dir / TUNE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> TuneResult | None:
        path = run_dir / TUNE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        for key in ("throughput", "train_throughput", "memory"):
            raw[key] = {int(k): v for k, v in raw[key].items()}
        return cls(**raw)


def _doublings(start: int, cap: int) -> list[int]:
    """start, 2*start, 4*start, ... below cap, then cap."""
    sizes = []
    while start < cap:
        sizes.append(start)
        start *= 2
    return [*sizes, cap]


def knee(throughput: dict[int, float]) -> int:
    """The first batch size whose doubling gains less than GAIN in tokens/s (the largest if none does)."""
    sizes = sorted(throughput)
    for size, bigger in zip(sizes, sizes[1:], strict=False):
        if throughput[bigger] < GAIN * throughput[size]:
            return size
    return sizes[-1]


def probe_knee(sizes: list[int], tokens_per_s: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """Measure sizes in order (best of two) until throughput stops rising; the knee and tokens/s by size."""
    throughput: dict[int, float] = {}
    for size in sizes:
        throughput[size] = max(tokens_per_s(size), tokens_per_s(size))
        if knee(throughput) != size:  # stopped rising: larger sizes are not worth probing
            break
    return knee(throughput), throughput


def _per_second(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


def _backward(policy: torch.nn.Module, sample: TrainSample, size: int, spec: LossSpec, pad_id: int,
              ref: torch.nn.Module | None) -> None:
    accumulate_gradients(policy, [sample] * size, spec, 1.0, size, pad_id, ref)
    policy.zero_grad(set_to_none=True)


def saved_activations_mb(policy: torch.nn.Module, sample: TrainSample, size: int, spec: LossSpec, pad_id: int,
                         ref: torch.nn.Module | None) -> float:
    """MB the forward of a micro-batch of `size` copies of `sample` keeps alive for backward (parameters and
    views of one storage counted once; parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _backward(policy, sample, size, spec, pad_id, ref)
    return sum(storages.values()) / 2**20


def largest_microbatch(policy: torch.nn.Module, sample: TrainSample, cap: int, spec: LossSpec, pad_id: int,
                       ref: torch.nn.Module | None, budget_mb: float) -> tuple[int, dict[int, float | None], str]:
    """Largest micro-batch of `sample` whose forward/backward fits in `budget_mb` more memory; MB by probed
    size (CUDA: peak allocated, None where out of memory; CPU: saved activations); how it was decided."""
    device = next(policy.parameters()).device
    memory: dict[int, float | None] = {}
    if device.type == "cuda":
        fits = 1
        for size in _doublings(1, cap):
            try:
                torch.cuda.reset_peak_memory_stats()
                _backward(policy, sample, size, spec, pad_id, ref)
                memory[size] = torch.cuda.max_memory_allocated() / 2**20
                fits = size
            except torch.cuda.OutOfMemoryError:
                memory[size] = None
                policy.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                break
        return fits, memory, "largest that ran without a CUDA out-of-memory error"
    for size in _doublings(1, min(cap, 4)):
        memory[size] = saved_activations_mb(policy, sample, size, spec, pad_id, ref)
    sizes = sorted(memory)
    per_sample = (memory[sizes[-1]] - memory[sizes[0]]) / max(sizes[-1] - sizes[0], 1)  # type: ignore[operator]
    fixed = memory[sizes[0]] - per_sample * sizes[0]  # type: ignore[operator]
    # during backward the activations' gradients are alive next to the activations: twice the saved bytes
    fits = int((budget_mb / BACKWARD_FACTOR - fixed) // per_sample) if per_sample > 0 else cap
    size = max(1, min(cap, fits))
    return size, memory, (f"{per_sample:.2f} MB saved for backward per sequence of {sample.length} tokens; "
                          f"predicted {BACKWARD_FACTOR:g} x {fixed + per_sample * size:,.1f} MB within a "
                          f"{budget_mb:,.0f} MB budget")


def tune(cfg: Any, policy: torch.nn.Module, ref: torch.nn.Module | None, sampler: Sampler,
         prompts: list[list[int]], pad_id: int) -> TuneResult:
    """Probe both batch sizes for this config on these components (`prompts`: training prompt token ids)."""
    from dash_exp.trainer import loss_spec

    start = time.perf_counter()
    cap, spec = step_batch(cfg), loss_spec(cfg)
    params = SamplingParams.from_config(cfg, cfg.group_size)
    rollouts: list[Any] = []

    def generate(samples: int) -> int:
        # the first samples // n training prompts (at most a step batch's)
        rollouts[:] = sampler.generate(prompts[: samples // params.n], params, range(samples // params.n))
        return sum(len(r.response_ids) for r in rollouts)

    generate(params.n)  # warm-up (first-call compilation, allocator)
    inference_batch, throughput = probe_knee([n * params.n for n in _doublings(1, max(1, cap // params.n))],
                                             lambda size: _per_second(lambda: generate(size)))
    sampler.offload()
    longest = max(prompts, key=len)
    # worst case: the longest training prompt with a response of max_new_tokens (any token costs the same)
    worst = TrainSample(longest, [longest[-1]] * cfg.max_new_tokens, advantage=1.0)
    # gradients and AdamW's two moments (allocated at the first optimizer step, after this probe): 3 x the weights
    state_mb = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2**20
    budget = cfg.tune_memory_gb * 1024 if cfg.tune_memory_gb is not None else MEMORY_SHARE * memory_available_mb()
    was_training = policy.training
    policy.train()
    largest, memory, method = largest_microbatch(policy, worst, cap, spec, pad_id, ref, budget - state_mb)
    # backprop MICROBATCHES micro-batches of the last probe's rollouts (cycled) at each micro-batch size that fits
    real = [TrainSample(r.prompt_ids, r.response_ids, advantage=1.0) for r in rollouts]

    def backprop(size: int) -> int:
        batch = [real[i % len(real)] for i in range(size * MICROBATCHES)]
        tokens = accumulate_gradients(policy, batch, spec, float(len(batch)), size, pad_id, ref).tokens
        policy.zero_grad(set_to_none=True)
        return tokens

    microbatch, train_throughput = probe_knee(_doublings(1, largest), lambda size: _per_second(lambda: backprop(size)))
    policy.train(was_training)
    sampler.sync(policy)
    return TuneResult(microbatch, inference_batch, throughput, largest, train_throughput, memory,
                      budget - state_mb, method, time.perf_counter() - start)
