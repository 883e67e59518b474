"""The sampler registry: `build_sampler` makes the backend a config names (the protocol in rollout.base never
imports its implementations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dash_exp.rollout.base import Sampler

if TYPE_CHECKING:
    from dash_exp.batching import TokenCache


# On CPU, auto picks vLLM for models of at least this many parameters. Measured on 2 cores (docs/performance.md):
# the tiny 1M-parameter model generates 11,400 tokens/s with the HF sampler against vLLM's 7,200 (batch 128);
# SmolLM2-135M 144 against vLLM's 258 (batch 128) and 103 against 207 (batch 16). The crossover lies between the
# two sizes and is not measured more finely.
VLLM_CPU_MIN_PARAMS = 20_000_000


def vllm_installed() -> bool:
    """Whether vLLM can be imported (found without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolved_rollout(name: str, n_params: int | None = None) -> str:
    """auto -> vllm when CUDA is available; on CPU vllm for a model of at least VLLM_CPU_MIN_PARAMS parameters when
    vLLM is installed, else hf."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "vllm"
    big = n_params is not None and n_params >= VLLM_CPU_MIN_PARAMS
    return "vllm" if big and vllm_installed() else "hf"


def step_kv_cache_gb(cfg: Any, model_config: Any, longest_prompt: int) -> float:
    """GiB of vLLM KV cache that one step batch needs (every sequence at the longest prompt plus max_new_tokens),
    in the dtype the engine runs in (`resolved_sampler_dtype`: rollout.dtype, else the model's), not the
    trainer's: an fp32 engine beside bf16 training needs twice the cache."""
    from dash_exp.batching import COMPUTE_DTYPES
    from dash_exp.config import resolved_sampler_dtype, step_batch
    from dash_exp.rollout.vllm import kv_cache_gb_for

    return kv_cache_gb_for(model_config, step_batch(cfg), longest_prompt + cfg.max_new_tokens,
                           COMPUTE_DTYPES[resolved_sampler_dtype(cfg)])


def build_sampler(cfg: Any, policy: torch.nn.Module, tokens: TokenCache, model_path: str,
                  prompts: Sequence[str] = (), data_parallel: bool = False, backend: str | None = None,
                  own_worker: bool = False) -> Sampler:
    """The backend named by cfg.rollout.name (auto: `resolved_rollout` by device and model size); `tokens` is the
    run's tokenizer cache. `prompts` (the training prompts) size vLLM's KV cache on GPU: one step batch of the
    longest prompt plus max_new_tokens. `data_parallel`: the policy is sharded over ranks, and each rank gets its
    own engine holding the whole model (HF: an unsharded copy in the compute dtype; vLLM: an engine per rank on
    torch.distributed's external launcher), refreshed from the policy's full tensors at every sync. `backend`
    overrides cfg.rollout.name; `own_worker` runs a vLLM engine's model in a worker process of its own (a generator
    rank of a split launch)."""
    from dash_exp.batching import COMPUTE_DTYPES
    from dash_exp.config import resolved_sampler_dtype

    name = resolved_rollout(backend or cfg.rollout.name, sum(p.numel() for p in policy.parameters()))
    if name == "hf":
        from dash_exp.models import eos_token_ids, load_frozen_copy
        from dash_exp.rollout.hf import HFSampler

        device = next(policy.parameters()).device
        model = load_frozen_copy(model_path, cfg.model.dtype, device) if data_parallel else policy
        tokenizer = tokens.tokenizer
        sampler = HFSampler(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_token_ids(tokenizer, policy),
                            compute_dtype=COMPUTE_DTYPES[cfg.model.dtype], own_copy=data_parallel)
        sampler.sync(policy)
        return sampler
    if not vllm_installed():
        raise RuntimeError(f"rollout={cfg.rollout.name} needs vLLM, which is not installed: run `make install-vllm` "
                           "(or choose rollout=hf)")
    from dash_exp.rollout.vllm import VLLMSampler

    step_kv_gb = None
    if torch.cuda.is_available() and prompts:
        step_kv_gb = step_kv_cache_gb(cfg, policy.config, max(len(tokens(p)) for p in prompts))
    dtype = resolved_sampler_dtype(cfg)
    sampler = VLLMSampler(model_path, cfg.rollout, dtype, cfg.seed, step_kv_gb, data_parallel, own_worker)
    sampler.sync(policy)  # the policy may already differ from the files on disk (resume, tests)
    return sampler
