"""The Sampler protocol (generate, sync), what it returns, and the keys samples are drawn with (`mix32`: the
same seed, step, prompt and sample index give the same key on every backend)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

_M32 = 0xFFFFFFFF


_Int = TypeVar("_Int", int, torch.Tensor)


def _fmix32(x: _Int) -> _Int:
    """murmur3's 32-bit finalizer, on Python ints or on int64 tensors, holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def mix32(*values: int) -> int:
    """Hash integers into one 32-bit key (host arithmetic: no tensor, no device read)."""
    h = 0x2545F491
    for v in values:
        h = _fmix32((h ^ (int(v) & _M32)) * 0x9E3779B1 & _M32)
    return h


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
