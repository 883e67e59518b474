"""tune=auto: measure, before training, on the run's own model, sampler and prompts,

- the largest micro-batch whose backward pass of worst-case-length samples fits. GPU: doubling until an
  allocation fails (`probe_fits`), with the gradients and AdamW's moments held as the first optimizer step will
  hold them for good (`held_optimizer_state`), in the memory CUDA reports free after `sampler.offload()` (what
  vLLM keeps while training is not free: `gpu_memory`); micro-batch 1 failing stops the run (`TuneError`).
  CPU, where running out of RAM kills the process instead: the bytes the forward saves for backward at
  micro-batches 1, 2 and 4, counted exactly with saved_tensors_hooks, extrapolated linearly against a budget;
- train_microbatch: within that, where backprop throughput on real rollouts stops rising (larger
  micro-batches pad more: on CPU the largest that fits is slower than a moderate one);
- inference_batch: the sampler-call size (whole groups) where generation throughput stops rising.

"Stops rising": doubling the size gains less than GAIN in tokens/s (best of two timings). Both are capped at
the step batch: neither can usefully be larger.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dash_exp.algorithms.update import LossSpec, accumulate_gradients
from dash_exp.batching import TrainSample
from dash_exp.config import ConfigError, step_batch
from dash_exp.rollout.base import Sampler, SamplingParams
from dash_exp.tracking import memory_available_mb, release_cuda_memory

# a doubled batch must raise tokens/s by this factor to count as still rising
GAIN = 1.1
# share of the available memory the CPU backward may add when tune_memory_gb is null
MEMORY_SHARE = 0.8
# CPU: peak memory of a backward pass per MB of activations saved by its forward (activations + their gradients)
BACKWARD_FACTOR = 2.0
# micro-batches per backprop timing
MICROBATCHES = 4
TUNE_FILE = "tune.json"
# what an error's message says when an allocation failed (CUDA runtime/driver, cuBLAS, cuDNN, PyTorch allocators);
# matched case-insensitively. CUBLAS_STATUS_NOT_INITIALIZED is often an OOM in disguise, but not only: not here
ALLOCATION_FAILURES = (
    "out of memory",  # torch.OutOfMemoryError's "CUDA out of memory", "CUDA error: out of memory", HIP, Triton
    "cuda_error_out_of_memory", "cudaerrormemoryallocation",  # driver / runtime API names
    "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace",
    "cumemalloc", "cumemcreate", "failed to allocate", "can't allocate memory",
)
FIX = ("lower max_new_tokens, turn on model.gradient_checkpointing, lower rollout.gpu_memory_utilization / "
       "rollout.kv_cache_gb or turn on rollout.enable_sleep_mode, or use a GPU with more memory")


class TuneError(ConfigError):
    """tune=auto found nothing that fits: one line (a ConfigError: run.py prints it without a traceback)."""


@dataclass
class TuneResult:
    train_microbatch: int
    inference_batch: int
    # inference batch (samples) -> generation tokens/s
    throughput: dict[int, float] = field(default_factory=dict)
    # the largest micro-batch that fits, and micro-batch -> backprop tokens/s (up to it)
    largest_fit: int = 0
    train_throughput: dict[int, float] = field(default_factory=dict)
    # micro-batch -> MB: saved activations (CPU) or peak allocated (CUDA; None where an allocation failed)
    memory: dict[int, float | None] = field(default_factory=dict)
    # what the micro-batch had to fit in (MB; GPU: CUDA free memory less the optimizer state), how it was decided
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
              ref: torch.nn.Module | None, keep_grads: bool = False) -> None:
    """Forward/backward of `size` copies of `sample`; nothing of it outlives the call but .grad (zeroed in place
    when `keep_grads`, else dropped). Fresh copies of the sample: the reference forward runs at every size. Each
    copy's prompt differs in its first two tokens, so that the shared-prompt forward shares nothing (the worst case
    for memory: a micro-batch of distinct prompts)."""
    vocab, k = policy.get_input_embeddings().num_embeddings, min(2, len(sample.prompt_ids))
    copies = [dataclasses.replace(sample, ref_logprobs=None,
                                  prompt_ids=[i % vocab, i // vocab % vocab][:k] + sample.prompt_ids[k:])
              for i in range(size)]
    accumulate_gradients(policy, copies, spec, 1.0, size, pad_id, ref)  # its stats: dropped at once
    policy.zero_grad(set_to_none=not keep_grads)


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
    """CPU: largest micro-batch of `sample` whose forward/backward is predicted to fit in `budget_mb` more
    memory; saved-activation MB by probed size; how it was decided."""
    memory: dict[int, float | None] = {}
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


# ---------------------------------------------------------------- GPU: run until an allocation fails


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether `exc` says that memory ran out: torch.OutOfMemoryError (torch.cuda's too), or any other error
    whose message names a failed allocation (a cuBLAS handle or workspace is a RuntimeError, for one)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, Exception) and any(marker in message for marker in ALLOCATION_FAILURES)


def drop_frames(exc: BaseException) -> None:
    """Detach the tracebacks of `exc` and the exceptions it chains, clearing their finished frames' locals: the
    failed pass's tensors go even if something still holds the exception object (a frame keeps its function,
    and with it closure cells, such as the result of torch's Module._call_impl, alive: clearing is not enough)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # skips frames still running (the caller's)
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def probe_fits(sizes: list[int], try_size: Callable[[int], float], none_fit: str,
               free: Callable[[], None] = release_cuda_memory) -> tuple[int, dict[int, float | None]]:
    """Run try_size (its peak MB) on increasing sizes until an allocation fails: the largest size that ran and MB
    by size (None where it failed). Another error propagates; the first size failing raises TuneError(none_fit).

    `free` runs only after the failed size's tensors are gone: the exception's traceback holds the frames of the
    failed forward/backward (its activations); they are cleared, and `free` runs after the `except` block."""
    memory: dict[int, float | None] = {}
    fits = 0
    for size in sizes:
        failed = False
        try:
            memory[size] = try_size(size)
        except Exception as exc:
            if not is_allocation_failure(exc):
                raise
            drop_frames(exc)
            failed = True  # free below, not in here: exc (and sys.exc_info()) stay alive until the block ends
        if not failed:
            fits = size
            continue
        memory[size] = None
        free()
        if not fits:
            raise TuneError(none_fit)
        break
    return fits, memory


def optimizer_state_mb(policy: torch.nn.Module) -> float:
    """What the first optimizer step adds for good: gradients and AdamW's two moments, each the size of the
    trainable (fp32 master) weights."""
    return 3 * sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad) / 2**20


def _weights_mb(*modules: torch.nn.Module | None) -> float:
    """MB of the parameters and buffers of `modules` (shared storages counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in modules if m is not None
                for t in (*m.parameters(), *m.buffers())}
    return sum(storages.values()) / 2**20


@dataclass
class GpuMemory:
    """The GPU memory the micro-batch probe starts from (MB), measured after sampler.offload()."""

    # CUDA free memory (torch.cuda.mem_get_info, allocator cache emptied): what vLLM holds is not free
    free_mb: float
    # gradients + AdamW moments, held during the probe (optimizer_state_mb)
    state_mb: float
    # in use beyond the policy's and reference's weights: the sampler's share, CUDA contexts, other processes
    sampler_mb: float
    # the sampler's state in words (e.g. "vLLM, awake")
    sampler: str = "the sampler"

    @property
    def budget_mb(self) -> float:
        return self.free_mb - self.state_mb

    def describe(self) -> str:
        return (f"{self.budget_mb:,.0f} MB budget = {self.free_mb:,.0f} MB CUDA free after sampler.offload() "
                f"(what the sampler keeps is not free: {self.sampler_mb:,.0f} MB in use beyond the weights, by "
                f"{self.sampler} and the CUDA context) less {self.state_mb:,.0f} MB of gradients and AdamW state, "
                f"held while probing")

    def no_fit(self, tokens: int) -> str:
        """The one-line error for micro-batch 1 not fitting."""
        return (f"tune=auto: a micro-batch of 1 sequence of {tokens} tokens does not fit in GPU memory "
                f"({self.budget_mb / 1024:.1f} GB free after the weights, AdamW state and the sampler's "
                f"{self.sampler_mb / 1024:.1f} GB): {FIX}")


def gpu_memory(policy: torch.nn.Module, ref: torch.nn.Module | None, sampler: Sampler) -> GpuMemory:
    """Measure the policy's GPU now (call after sampler.offload(): vLLM in sleep mode then holds ~nothing)."""
    device = next(policy.parameters()).device
    release_cuda_memory()
    free, total = torch.cuda.mem_get_info(device)
    in_use_mb = (total - free) / 2**20
    name = type(sampler).__name__
    if hasattr(sampler, "asleep"):
        name += ", asleep (sleep mode)" if sampler.asleep else ", awake (its weights and KV cache)"
    return GpuMemory(free / 2**20, optimizer_state_mb(policy), max(0.0, in_use_mb - _weights_mb(policy, ref)), name)


@contextmanager
def held_optimizer_state(policy: torch.nn.Module, gpu: GpuMemory) -> Iterator[None]:
    """Hold what the optimizer keeps from its first step on: zeroed .grad on every trainable parameter (the
    probe's backward accumulates into them in place, as a step's later micro-batches do) and tensors shaped like
    AdamW's exp_avg and exp_avg_sq. Allocated for real rather than subtracted from a number: the probe learns
    what fits by running, so only memory actually taken constrains it (and the allocator sees the real tensor
    sizes). Raises TuneError if the state itself, or the step's scratch, does not fit."""
    params = [p for p in policy.parameters() if p.requires_grad]
    moments: list[torch.Tensor] = []
    failed = False
    try:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        moments = [torch.empty_like(p) for p in params for _ in range(2)]
        # the step itself (foreach AdamW, the default on CUDA) computes sqrt(exp_avg_sq) into one more list of
        # weight-sized tensors while no activations are alive: it must fit next to the state
        scratch = [torch.empty_like(p) for p in params]
        del scratch
    except Exception as exc:
        if not is_allocation_failure(exc):
            raise
        drop_frames(exc)
        failed = True  # the partial allocations are gone once this block ends
    try:
        if failed:
            raise TuneError(f"tune=auto: the gradients and AdamW state ({gpu.state_mb / 1024:.1f} GB, plus the "
                            f"step's scratch) do not fit in the {gpu.free_mb / 1024:.1f} GB of GPU memory free "
                            f"next to the weights and the sampler's {gpu.sampler_mb / 1024:.1f} GB: {FIX}")
        yield
    finally:
        moments.clear()
        policy.zero_grad(set_to_none=True)
        release_cuda_memory()


def _cuda_peak_mb(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def peak(run: Callable[[], None]) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)  # an asynchronous failure surfaces here, in this size's probe
        return torch.cuda.max_memory_allocated(device) / 2**20

    return peak


def gpu_largest_microbatch(policy: torch.nn.Module, sample: TrainSample, cap: int, spec: LossSpec, pad_id: int,
                           ref: torch.nn.Module | None, gpu: GpuMemory,
                           peak_mb: Callable[[Callable[[], None]], float] | None = None,
                           free: Callable[[], None] = release_cuda_memory,
                           ) -> tuple[int, dict[int, float | None], str]:
    """GPU: the largest doubling of micro-batches of `sample` (up to cap) whose forward/backward runs with the
    optimizer state held; peak allocated MB by size (None: failed); how it was decided. `peak_mb(run)` runs one
    probe and returns its peak (default: CUDA's allocator statistics)."""
    peak = peak_mb or _cuda_peak_mb(next(policy.parameters()).device)
    with held_optimizer_state(policy, gpu):
        fits, memory = probe_fits(
            _doublings(1, cap),
            lambda size: peak(lambda: _backward(policy, sample, size, spec, pad_id, ref, keep_grads=True)),
            gpu.no_fit(sample.length), free=free)
    failed = [size for size, mb in memory.items() if mb is None]
    ran = f"largest that ran before an allocation failed (at {failed[0]})" if failed else "every size up to the cap ran"
    return fits, memory, f"{ran}; {gpu.describe()}"


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
    was_training = policy.training
    policy.train()
    if next(policy.parameters()).device.type == "cuda":
        gpu = gpu_memory(policy, ref, sampler)
        budget = gpu.budget_mb
        largest, memory, method = gpu_largest_microbatch(policy, worst, cap, spec, pad_id, ref, gpu)
    else:
        available = MEMORY_SHARE * memory_available_mb() if cfg.tune_memory_gb is None else cfg.tune_memory_gb * 1024
        # less the gradients and AdamW's two moments (allocated at the first optimizer step, after this probe)
        budget = available - optimizer_state_mb(policy)
        largest, memory, method = largest_microbatch(policy, worst, cap, spec, pad_id, ref, budget)
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
                      budget, method, time.perf_counter() - start)
