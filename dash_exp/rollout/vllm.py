"""vLLM's offline engine, colocated in the training process, with weight sync after every optimizer step.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so `sync` can hand it the policy's own
parameter tensors one at a time through `collective_rpc("reload_weights", ...)`: no copy of the whole
model, no restart. Sampling (`rollout.seeded`, default): one request per sample, each with its own seed
mix32(prompt seed, k), the key the HF sampler draws the k-th sample of a prompt with, so a sample does not depend
on the batch it is drawn in (up to the engine's numerics); one seed for a request of n samples would give them
all one generator. `seeded=false`: requests of n samples from the engine seeded once, LLM(seed=...). Log-probs
are vLLM's "processed" ones, i.e. after temperature (vLLM's default returns them before temperature), matching
training's logits / temperature.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from dash_exp.distributed import full_weights
from dash_exp.rollout.base import Rollout, SamplingParams, mix32
from dash_exp.tracking import release_cuda_memory

# the in-process engine needs this before it is built
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# vLLM on CPU otherwise asks for most of NUMA node 0 for its KV cache and refuses to start
DEFAULT_CPU_KV_CACHE_GB = 1.0


class _ProcessState:
    """What building an in-process vLLM engine on CPU changes globally: torch.set_num_threads (made a
    no-op), the thread count, and the global RNGs (seeded). Captured before, put back after."""

    def __init__(self) -> None:
        self.set_num_threads = torch.set_num_threads
        self.threads = torch.get_num_threads()
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def restore(self) -> None:
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.threads)
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])


@contextlib.contextmanager
def _launch_group_kept(keep: bool) -> Iterator[None]:
    """While `keep`: vLLM's in-process engine shutdown (EngineCore.shutdown -> cleanup_dist_env_and_memory) still
    destroys its own groups but not the default one, which it did not create: the launch's group, which every rank
    leaves together (distributed.leave, a barrier first). Destroyed here, a generator or data-parallel rank would
    leave it alone and early, and the ranks still waiting for it would fail ("Connection closed by peer")."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_own(group: Any = None) -> None:
        if group is not None and group is not torch.distributed.group.WORLD:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_own
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def kv_cache_gb_for(model_config: Any, sequences: int, tokens: int, dtype: torch.dtype) -> float:
    """GiB of KV cache that hold `sequences` sequences of `tokens` tokens at once: per token, K and V for every
    layer and KV head (Qwen2.5-0.5B in bf16: 2 x 24 x 2 x 64 x 2 = 12,288 bytes)."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * dtype.itemsize
    return sequences * tokens * per_token / 2**30


def engine_kwargs(model_path: str, rollout: Any, dtype: str, seed: int, on_gpu: bool,
                  step_kv_gb: float | None = None) -> dict[str, Any]:
    """LLM(...) arguments for the configured rollout settings. The KV cache: `rollout.kv_cache_gb` when set;
    else on GPU `step_kv_gb` (what one step batch needs, so the rest of the GPU stays with training while it
    backprops), or vLLM's gpu_memory_utilization sizing when that is unknown; on CPU 1 GiB."""
    kwargs: dict[str, Any] = {
        "model": model_path, "tokenizer": model_path, "dtype": dtype, "seed": seed,
        "logprobs_mode": "processed_logprobs",
        "enforce_eager": (not on_gpu) if rollout.enforce_eager is None else rollout.enforce_eager,
        "tensor_parallel_size": rollout.tensor_parallel_size,
    }
    if rollout.max_model_len is not None:
        kwargs["max_model_len"] = rollout.max_model_len
    kv_gb = rollout.kv_cache_gb
    if kv_gb is None:
        kv_gb = step_kv_gb if on_gpu else DEFAULT_CPU_KV_CACHE_GB
    if kv_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = rollout.enable_sleep_mode
    elif getattr(rollout, "seeded", True):
        # vLLM 0.32 on CPU: a seeded request whose prompt is prefilled in chunks has its draw undone by rewinding its
        # generator's offset, which CPU generators lack ("CPU Generator does not use offset"); whole prefills only
        kwargs["enable_chunked_prefill"] = False
    return kwargs


class VLLMSampler:
    """Generates with vLLM from the current policy; `sync` pushes the policy's weights into the engine."""

    def __init__(self, model_path: str, rollout: Any, dtype: str, seed: int, step_kv_gb: float | None = None,
                 data_parallel: bool = False, own_worker: bool = False) -> None:
        from vllm import LLM

        state = _ProcessState()
        self.on_gpu = torch.cuda.is_available()
        # the model runs in worker processes (tensor parallel, or a worker of its own): weights travel pickled
        self.remote_workers = rollout.tensor_parallel_size > 1 or own_worker
        self.seeded = bool(getattr(rollout, "seeded", True))
        self.sleep_mode = self.on_gpu and rollout.enable_sleep_mode
        # the engine runs in the compute dtype; sync casts the fp32 master weights to it
        self.dtype = getattr(torch, dtype)
        # vLLM sets up torch.distributed for its own (single-process) worker unless the trainer already has
        self.owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        try:
            kwargs = engine_kwargs(model_path, rollout, dtype, seed, self.on_gpu, step_kv_gb)
            if data_parallel:  # one engine per rank, in the rank's process, on the trainer's process group
                kwargs["distributed_executor_backend"] = "external_launcher"
            elif own_worker:  # a generator rank: the worker's torch.distributed world is its own, not the launch's
                kwargs["distributed_executor_backend"] = "mp"
                if self.on_gpu:  # the worker takes cuda:0 of what it sees: this rank's GPU
                    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                    index = torch.cuda.current_device()
                    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
            self.llm = LLM(**kwargs)
        finally:
            state.restore()
        self.asleep = False

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Rollout]:
        """params.n rollouts per prompt, prompt-major. Seeded (default, not greedy): the k-th sample of prompt i is
        its own request with seed mix32(seeds[i], k); else one request of n per prompt from the engine's seed."""
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("VLLMSampler.generate after offload: call sync first (sleep mode released the weights)")
        common = {"temperature": 0.0 if params.greedy else params.temperature,
                  "top_p": 1.0 if params.greedy else params.top_p, "top_k": 0 if params.greedy else params.top_k,
                  "max_tokens": params.max_new_tokens, "logprobs": 0}
        if self.seeded and not params.greedy:
            asked = [list(p) for p in prompts for _ in range(params.n)]
            sampling: Any = [VLLMParams(n=1, seed=mix32(s, k), **common) for s in seeds for k in range(params.n)]
        else:
            asked = [list(p) for p in prompts]
            sampling = VLLMParams(n=params.n, **common)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in asked], sampling, use_tqdm=False)
        rollouts = []
        for prompt, out in zip(asked, outputs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)]
                rollouts.append(Rollout(prompt_ids=prompt, response_ids=ids, logprobs=logprobs,
                                        truncated=completion.finish_reason == "length"))
        return rollouts

    def offload(self) -> None:
        """Sleep mode (GPU): release vLLM's weights and KV cache while the trainer backprops; the next sync
        brings them back (level 2: the old weights are not kept, sync overwrites them anyway)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync(self, policy: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine in place, then drop stale prefix-cache entries."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        # in-process: a generator hands over one tensor at a time, on the policy's device. Tensor parallel: the
        # workers are other processes and the list is pickled to each; CUDA tensors would be saved with
        # torch.save and rebuilt by every worker on cuda:0, so they travel as CPU tensors (in the engine's
        # dtype), which each worker copies to its own GPU
        # (tied weights go under both names: vLLM re-ties them only when it sees both)
        if self.remote_workers:
            weights: Any = [(name, t.cpu()) for name, t in full_weights(policy, self.dtype)]
        else:
            weights = full_weights(policy, self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory now, not at garbage collection: a sweep's next job builds
        its own engine in this process (vLLM checks free GPU memory at start-up, and sleep mode's allocator
        serves one engine per process)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with _launch_group_kept(not self.owns_process_group):
            llm.llm_engine.engine_core.shutdown()
        del llm
        if self.owns_process_group:
            cleanup_dist_env_and_memory()  # vLLM's own teardown: its process groups, gc, the CUDA cache
        else:
            release_cuda_memory()
