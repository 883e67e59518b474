"""tune=auto: the knee rule, the memory budget on the real model, the GPU probe's logic (on CPU, with injected
allocation failures), and the choice applied, logged and reused."""

import gc
import json
import subprocess
import sys
import weakref
from contextlib import contextmanager

import pytest
import torch
import yaml
from conftest import REPO, TEST_OVERRIDES

from dash_exp.batching import TrainSample
from dash_exp.config import ConfigError, compose_config
from dash_exp.factory import build
from dash_exp.trainer import loss_spec
from dash_exp.tune import (
    BACKWARD_FACTOR,
    GpuMemory,
    TuneError,
    _backward,
    gpu_largest_microbatch,
    gpu_memory,
    held_optimizer_state,
    is_allocation_failure,
    knee,
    largest_microbatch,
    optimizer_state_mb,
    probe_fits,
)


@pytest.mark.unit
def test_knee_is_where_doubling_stops_paying():
    assert knee({8: 100.0, 16: 190.0, 32: 200.0, 64: 400.0}) == 16  # +5% from 16 to 32: stop at 16
    assert knee({8: 100.0, 16: 150.0, 32: 200.0}) == 32  # still rising at the cap
    assert knee({8: 100.0, 16: 105.0}) == 8
    assert knee({128: 7.0}) == 128


@pytest.mark.integration
def test_microbatch_follows_the_memory_budget_on_the_real_model(make_cfg):
    cfg = make_cfg()
    parts = build(cfg)
    parts.task.close()
    prompt = parts.tokenizer.encode(parts.task.train[0].prompt, add_special_tokens=False)
    args = (parts.policy, TrainSample(prompt, [prompt[-1]] * 64, advantage=1.0), 64, loss_spec(cfg),
            parts.tokenizer.pad_token_id, None)
    roomy, memory, method = largest_microbatch(*args, budget_mb=10_000.0)
    assert roomy == 64 and sorted(memory) == [1, 2, 4] and "predicted" in method
    # saved activations are linear in the micro-batch: fit on 1 and 4, predict 2
    per_sample = (memory[4] - memory[1]) / 3
    assert per_sample > 0 and memory[2] == pytest.approx(memory[1] + per_sample, rel=0.05)
    # a budget that holds BACKWARD_FACTOR x the activations of 5 sequences (and not 6) gives 5
    fixed = memory[1] - per_sample
    budget = BACKWARD_FACTOR * (fixed + 5.5 * per_sample)
    assert largest_microbatch(*args, budget_mb=budget)[0] == 5
    assert largest_microbatch(*args, budget_mb=0.0)[0] == 1
    # longer sequences save more per sequence
    longer = (parts.policy, TrainSample(prompt, [prompt[-1]] * 128, advantage=1.0), *args[2:])
    assert largest_microbatch(*longer, budget_mb=10_000.0)[1][1] > 1.5 * memory[1]
    assert all(p.grad is None for p in parts.policy.parameters())  # the probe leaves no gradient behind


def run_cli(args, env):
    proc = subprocess.run([sys.executable, "-m", "dash_exp.run", *TEST_OVERRIDES, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["dash", "grpo"])
def test_tune_auto_applies_logs_saves_and_reuses_its_choice(algorithm, tmp_path, cli_env):
    run_dir = tmp_path / "run"
    common = [f"algorithm={algorithm}", "tune=auto", f"hydra.run.dir={run_dir}", "save_every=1"]
    out = run_cli([*common, "steps=1"], cli_env)
    tuned = json.loads((run_dir / "tune.json").read_text())
    line = next(x for x in out.splitlines() if x.startswith("tune=auto:"))
    assert f"train_microbatch={tuned['train_microbatch']}" in line
    step_batch, group = 16, 4  # prompts_per_step=4, group_size=4 in the test overrides
    assert 1 <= tuned["train_microbatch"] <= step_batch
    assert tuned["inference_batch"] % group == 0 and tuned["inference_batch"] <= step_batch
    probed = sorted(int(b) for b in tuned["throughput"])
    assert probed == [4, 8, 16][: len(probed)]  # whole groups, doubling, up to the step batch
    assert tuned["inference_batch"] == knee({int(b): v for b, v in tuned["throughput"].items()})
    # the micro-batch: where backprop throughput stops rising, never above the largest that fits
    trained = {int(b): v for b, v in tuned["train_throughput"].items()}
    assert sorted(trained) == [1, 2, 4, 8, 16][: len(trained)] and max(trained) <= tuned["largest_fit"]
    assert tuned["train_microbatch"] == knee(trained)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    micro = tuned["train_microbatch"]
    if algorithm == "grpo" and micro >= 4:  # whole groups of group_size=4
        micro -= micro % 4
    assert cfg["train_microbatch"] == micro
    # GRPO's inference batch is its micro-batch by definition (at least a group), so it follows; DASH keeps null
    # (preemptive sampling)
    assert cfg["inference_batch"] == (max(micro, 4) if algorithm == "grpo" else None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "tune/train_microbatch": tuned["train_microbatch"],
            "tune/inference_batch": tuned["inference_batch"], "tune/seconds": tuned["seconds"]} in rows
    assert tuned["seconds"] > 0
    # a resumed run keeps the choice it started with (no new probe)
    tuned["train_microbatch"] = 3
    (run_dir / "tune.json").write_text(json.dumps(tuned))
    out = run_cli([*common, "steps=2"], cli_env)
    assert "train_microbatch=3 " in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_microbatch"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is True


# ---------------------------------------------------------------- the GPU probe's logic, on CPU

CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
ALLOCATION_FAILURES = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
                           "GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB "
                           "in use."),
    torch.cuda.OutOfMemoryError(""),  # the type decides, whatever the message
    RuntimeError(CUBLAS),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ltHandle, computeDesc...)`"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                 "call, so the stacktrace below might be incorrect."),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
    RuntimeError("CUDA driver error: out of memory"),
    RuntimeError("Triton Error [CUDA]: out of memory"),
    RuntimeError("cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY"),
    RuntimeError("HIP out of memory. Tried to allocate 1.50 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),
]
OTHER_ERRORS = [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
    RuntimeError("out of resource: shared memory, Required: 98304, Hardware limit: 65536"),
    RuntimeError("NCCL error: unhandled system error"),
    ValueError("beta > 0 needs a reference model"),
    KeyboardInterrupt("out of memory"),  # not an Exception: never swallowed
]


@pytest.mark.unit
@pytest.mark.parametrize("exc", ALLOCATION_FAILURES + OTHER_ERRORS, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_allocation_failures_are_told_from_other_errors(exc):
    assert is_allocation_failure(exc) == (exc in ALLOCATION_FAILURES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The real tiny policy (train mode), a sample (its first training prompt, up to 32 tokens, and 16 response
    tokens), its loss spec and pad id."""
    cfg = compose_config([*TEST_OVERRIDES, f"run_dir={tmp_path_factory.mktemp('tune') / 'run'}"])
    parts = build(cfg)
    parts.task.close()
    prompt = parts.tokenizer.encode(parts.task.train[0].prompt, add_special_tokens=False)[:32]
    parts.policy.train()
    return parts.policy, TrainSample(prompt, [prompt[-1]] * 16, advantage=1.0), loss_spec(cfg), \
        parts.tokenizer.pad_token_id


@contextmanager
def failing_at(policy, k, error, in_backward=False, length=None):
    """Raise `error` from inside the real forward (or backward) of any micro-batch of k or more sequences of
    `length` tokens (the tune fixture's sample); yields weakrefs to the tensors the failing pass had just allocated
    there (its activation, or gradient)."""
    allocated = []

    def fail(t):
        allocated.append(weakref.ref(t))
        raise error

    def hook(module, args, output):  # [k, L, H], or [1, k x L, H] flat (shared-prompt forward, distinct prompts)
        if output.shape[:-1].numel() >= k * length:
            if not in_backward:
                fail(output)
            output.register_hook(fail)

    handle = policy.model.layers[-1].mlp.down_proj.register_forward_hook(hook)
    try:
        yield allocated
    finally:
        handle.remove()


GPU = GpuMemory(free_mb=10 * 1024, state_mb=3 * 1024, sampler_mb=32 * 1024, sampler="VLLMSampler, awake")


@pytest.mark.integration
@pytest.mark.parametrize("error, in_backward", [(RuntimeError(CUBLAS), False),
                                                (torch.OutOfMemoryError("CUDA out of memory."), True)])
def test_gpu_probe_stops_at_the_first_allocation_failure_and_frees_it_first(tiny, error, in_backward):
    policy, sample, spec, pad_id = tiny
    trainable = [p for p in policy.parameters() if p.requires_grad]
    freed = []

    def free():  # what release_cuda_memory sees: the failed pass must be unreachable, the optimizer state held
        gc.collect()
        freed.append(([r() is None for r in allocated], all(p.grad is not None for p in trainable)))

    with failing_at(policy, 4, error, in_backward, sample.length) as allocated:
        fits, memory, method = gpu_largest_microbatch(policy, sample, 8, spec, pad_id, None, GPU,
                                                      peak_mb=lambda run: run() or 1.0, free=free)
    assert fits == 2 and memory == {1: 1.0, 2: 1.0, 4: None}  # doublings 1, 2, 4 (failed), never 8
    assert freed == [([True], True)]
    assert "allocation failed (at 4)" in method and "7,168 MB budget" in method and "sampler.offload()" in method
    assert all(p.grad is None for p in policy.parameters())  # the held state is released
    # and the model still trains afterwards
    _backward(policy, sample, 2, spec, pad_id, None)


@pytest.mark.integration
def test_probe_fits_counts_sizes_runs_the_backward_and_reraises_other_errors(tiny):
    policy, sample, spec, pad_id = tiny
    ran, freed = [], []

    def try_size(size):
        _backward(policy, sample, size, spec, pad_id, None)
        ran.append(size)
        return float(size)

    with failing_at(policy, 3, RuntimeError(CUBLAS), length=sample.length):
        assert probe_fits([1, 2, 3, 4], try_size, "unused", free=lambda: freed.append(1)) == (2, {1: 1.0, 2: 2.0,
                                                                                                  3: None})
    assert ran == [1, 2] and freed == [1]
    assert probe_fits([1, 2, 4], try_size, "unused", free=lambda: freed.append(2)) == (4, {1: 1.0, 2: 2.0, 4: 4.0})
    assert freed == [1]  # nothing failed: nothing to free
    with failing_at(policy, 2, RuntimeError("CUDA error: device-side assert triggered"), length=sample.length), \
            pytest.raises(RuntimeError, match="device-side assert"):
        probe_fits([1, 2, 4], try_size, "unused", free=lambda: freed.append(3))
    assert freed == [1]


@pytest.mark.integration
def test_micro_batch_1_not_fitting_stops_with_one_line(tiny):
    policy, sample, spec, pad_id = tiny
    freed = []
    with failing_at(policy, 1, torch.OutOfMemoryError("CUDA out of memory."), in_backward=True,
                    length=sample.length), \
            pytest.raises(TuneError) as caught:
        gpu_largest_microbatch(policy, sample, 8, spec, pad_id, None, GPU, peak_mb=lambda run: run() or 1.0,
                               free=lambda: freed.append(1))
    message = str(caught.value)
    assert message == (
        f"tune=auto: a micro-batch of 1 sequence of {sample.length} tokens does not fit in GPU memory (7.0 GB free "
        "after the weights, AdamW state and the sampler's 32.0 GB): lower max_new_tokens, turn on "
        "model.gradient_checkpointing, lower rollout.gpu_memory_utilization / rollout.kv_cache_gb or turn on "
        "rollout.enable_sleep_mode, or use a GPU with more memory")
    assert "\n" not in message and isinstance(caught.value, ConfigError)  # run.py prints it as one line
    assert freed == [1] and all(p.grad is None for p in policy.parameters())


@pytest.mark.integration
def test_optimizer_state_is_held_while_probing_and_its_failure_stops_the_run(tiny, monkeypatch):
    policy, *_ = tiny
    trainable = [p for p in policy.parameters() if p.requires_grad]
    with held_optimizer_state(policy, GPU):
        assert all(p.grad is not None and not p.grad.any() for p in trainable)
    assert all(p.grad is None for p in policy.parameters())
    assert optimizer_state_mb(policy) == pytest.approx(3 * 4 * sum(p.numel() for p in trainable) / 2**20)
    # an allocation failure while taking the moments (CUDA only: faked) is the one-line error, with nothing held
    real_empty_like = torch.empty_like
    calls = []

    def empty_like(t, *args, **kwargs):
        calls.append(1)
        if len(calls) > len(trainable):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB.")
        return real_empty_like(t, *args, **kwargs)

    monkeypatch.setattr(torch, "empty_like", empty_like)
    with pytest.raises(TuneError, match=r"^tune=auto: the gradients and AdamW state \(3\.0 GB, plus the step's "
                                        r"scratch\) do not fit in the 10\.0 GB") as caught, \
            held_optimizer_state(policy, GPU):
        pytest.fail("the probe ran without the optimizer state")
    assert "\n" not in str(caught.value)
    assert all(p.grad is None for p in policy.parameters())


@pytest.mark.integration
def test_gpu_budget_is_cuda_free_memory_less_the_optimizer_state(tiny, monkeypatch):
    policy, *_ = tiny
    weights_mb = sum(p.numel() * p.element_size() for p in policy.parameters()) / 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 16 * 2**30))
    asleep = type("VLLMSampler", (), {"asleep": True})()
    gpu = gpu_memory(policy, None, asleep)
    assert gpu.free_mb == 6 * 1024 and gpu.state_mb == optimizer_state_mb(policy)
    assert gpu.budget_mb == 6 * 1024 - gpu.state_mb
    # what is in use and is not the weights: the sampler's reservation (and the CUDA context)
    assert gpu.sampler_mb == pytest.approx(10 * 1024 - weights_mb) and gpu.sampler == "VLLMSampler, asleep (sleep mode)"
    assert "CUDA free after sampler.offload()" in gpu.describe() and "VLLMSampler, asleep" in gpu.describe()


@pytest.mark.unit
@pytest.mark.parametrize(("algorithm", "overrides", "tuned", "micro", "infer"), [
    ("dash", [], (8, 4), 8, None),  # null = preemptive sampling: the algorithm, not a knob
    ("ppo", [], (4, 8), 4, None),
    ("dash", ["inference_batch=16"], (4, 8), 4, 8),  # an explicit inference batch is a knob: it takes the knee
    ("grpo", [], (2, 16), 2, 4),  # less than a group fits: one group per call, backpropagated 2 at a time
    ("grpo", [], (6, 16), 4, 4),  # GRPO samples whole groups: the micro-batch is rounded down to them
    ("grpo", [], (8, 4), 8, 8),
])
def test_tuning_changes_knobs_never_the_algorithm_and_the_result_validates(make_cfg, algorithm, overrides, tuned,
                                                                          micro, infer):
    from dash_exp.config import resolved_inference_batch, step_batch, validate
    from dash_exp.run import apply_tuning
    from dash_exp.tune import TuneResult

    cfg = make_cfg(f"algorithm={algorithm}", "tune=auto", *overrides)
    apply_tuning(cfg, TuneResult(*tuned))
    assert (cfg.train_microbatch, cfg.inference_batch) == (micro, infer)
    assert resolved_inference_batch(cfg) == (infer or step_batch(cfg))
    validate(cfg)
