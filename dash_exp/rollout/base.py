"""The Sampler protocol (generate, sync) and what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from dash_exp.batching import TokenCache


@dataclass(frozen=True)
class SamplingParams:
    """Everything that shapes sampling; always passed explicitly, never taken from model defaults."""

    # samples per prompt
    n: int = 1
    temperature: float = 1.0
    # nucleus mass, 1.0 = off
    top_p: float = 1.0
    # top-k, 0 = off
    top_k: int = 0
    max_new_tokens: int = 64
    # argmax decoding (ignores temperature/top_p/top_k)
    greedy: bool = False

    @classmethod
    def from_config(cls, cfg: Any, n: int, evaluation: bool = False) -> SamplingParams:
        """The run's sampling knobs (temperature, top_p, top_k, max_new_tokens), n samples per prompt; for the
        sampled held-out `evaluation`, eval_temperature / eval_top_p where set."""
        temperature, top_p = cfg.temperature, cfg.top_p
        if evaluation:
            temperature = cfg.eval_temperature if cfg.eval_temperature is not None else temperature
            top_p = cfg.eval_top_p if cfg.eval_top_p is not None else top_p
        return cls(n=n, temperature=temperature, top_p=top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens)


@dataclass
class Rollout:
    """One sampled response."""

    prompt_ids: list[int]
    # response tokens, including the EOS token when the response stopped on its own
    response_ids: list[int]
    # log softmax(logits / temperature) of each response token (before top-p/top-k truncation)
    logprobs: list[float]
    # hit max_new_tokens without EOS
    truncated: bool


class Sampler(Protocol):
    """Generates from the CURRENT policy; `sync` is called after every optimizer step."""

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Rollout]:
        """params.n rollouts per prompt, grouped: [p0 s0, p0 s1, ..., p1 s0, ...].

        seeds[i] keys prompt i's sampling noise; a backend that honours it samples the same responses
        whatever the batch a prompt is sampled in.
        """
        ...

    def offload(self) -> None:
        """Rollouts of this step are done: free accelerator memory for training if the backend can."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the next `generate` sample from `policy`'s current weights."""
        ...

    def close(self) -> None:
        """Release the engine and its memory for good (the sampler is unusable afterwards)."""
        ...


def resolved_rollout(name: str) -> str:
    """auto -> vllm when CUDA is available, hf otherwise."""
    if name != "auto":
        return name
    return "vllm" if torch.cuda.is_available() else "hf"


def build_sampler(cfg: Any, policy: torch.nn.Module, tokens: TokenCache, model_path: str,
                  prompts: Sequence[str] = (), data_parallel: bool = False) -> Sampler:
    """The backend named by cfg.rollout.name (auto: vllm with CUDA, else hf); `tokens` is the run's tokenizer
    cache. `prompts` (the training prompts) size vLLM's KV cache on GPU: one step batch of the longest prompt plus
    max_new_tokens. `data_parallel`: the policy is sharded over ranks, and each rank gets its own engine holding the
    whole model (HF: an unsharded copy in the compute dtype; vLLM: an engine per rank on torch.distributed's external
    launcher), refreshed from the policy's full tensors at every sync."""
    from dash_exp.batching import COMPUTE_DTYPES

    name = resolved_rollout(cfg.rollout.name)
    if name == "hf":
        from dash_exp.models import build_reference, eos_token_ids
        from dash_exp.rollout.hf import HFSampler

        device = next(policy.parameters()).device
        model = build_reference(model_path, cfg.model.dtype, device) if data_parallel else policy
        tokenizer = tokens.tokenizer
        sampler = HFSampler(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_token_ids(tokenizer, policy),
                            compute_dtype=COMPUTE_DTYPES[cfg.model.dtype], own_copy=data_parallel)
        sampler.sync(policy)
        return sampler
    from dash_exp.rollout.vllm import VLLMSampler, vllm_available

    if not vllm_available():
        raise RuntimeError(f"rollout={cfg.rollout.name} needs vLLM, which is not installed: run `make install-vllm` "
                           "(or choose rollout=hf)")
    step_kv_gb = None
    if torch.cuda.is_available() and prompts:
        from dash_exp.config import step_batch
        from dash_exp.rollout.vllm import kv_cache_gb_for

        longest = max(len(tokens(p)) for p in prompts)
        step_kv_gb = kv_cache_gb_for(policy.config, step_batch(cfg), longest + cfg.max_new_tokens,
                                     COMPUTE_DTYPES[cfg.model.dtype])
    sampler = VLLMSampler(model_path, cfg.rollout, cfg.model.dtype, cfg.seed, step_kv_gb, data_parallel)
    sampler.sync(policy)  # the policy may already differ from the files on disk (resume, tests)
    return sampler
