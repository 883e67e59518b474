"""Per-token log-probs through the LM head without materializing all [N, V] logits at once.

Memory contract of `token_logprobs`: tokens go through the head `chunk` at a time, so beyond its inputs and [N]
output the extra memory is O(chunk x V + V x H) in forward and in backward; the V x H part is the head's weight
grad (and, under autocast, one low-precision copy of the weight per chunk). With grad enabled each chunk runs under
non-reentrant activation checkpointing: its logits are dropped after the forward and recomputed, under the same
autocast state, one chunk at a time during backward."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

# fp32 logits of this many elements take 256 MiB: the default per-chunk budget
_AUTO_CHUNK_ELEMENTS = 2**26


def auto_chunk(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits take about 256 MiB (441 for Qwen2.5's 151,936-token vocab)."""
    return max(1, _AUTO_CHUNK_ELEMENTS // vocab_size)


def _scaled_logits(hidden: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    """head(hidden) / temperature, at least fp32: [n, V]."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain math on all rows at once: hidden [n, H], targets [n] -> [n]."""
    logits = _scaled_logits(hidden, head, temperature)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def _logprobs_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """`_logprobs` and the entropy of each row's distribution, H = logsumexp(z) - sum_v softmax(z)_v z_v, from the
    same logits: [n, 2]."""
    logits = _scaled_logits(hidden, head, temperature)
    lse = logits.logsumexp(-1)
    entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return torch.stack([logits.gather(-1, targets[..., None]).squeeze(-1) - lse, entropy], dim=-1)


def _vocab_size(head: torch.nn.Module, hidden: torch.Tensor) -> int:
    size = getattr(head, "out_features", None)
    if size is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        size = head.weight.shape[0]
    if size is None:  # an unusual head: ask it
        with torch.no_grad():
            size = head(hidden[:1]).shape[-1]
    return int(size)


def token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk: int | None = None,
    entropy: bool = False,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[target] for each of N tokens: hidden [N, H], targets [N] -> [N].

    The result is fp32 (or wider, for a wider head). Leading dims are allowed: hidden [..., H], targets [...].
    `chunk` is the number of tokens whose logits exist at once (None: `auto_chunk` of the head's vocab size).
    entropy=True: [..., 2], the log-prob and the entropy of the token's whole distribution, from the same chunk of
    logits (the memory contract holds).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"model.logprob_chunk must be a positive number of tokens (or null for auto), got {chunk}")
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but targets has {targets.shape[0]}")
    if chunk is None:
        chunk = auto_chunk(_vocab_size(head, hidden))
    fn, shape = (_logprobs_entropy, (*shape, 2)) if entropy else (_logprobs, shape)
    if hidden.shape[0] <= chunk:
        return fn(hidden, head, targets, temperature).reshape(shape)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    # split (not slicing) so the backward concatenates the chunks' hidden grads once
    for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True):
        if not grad:
            parts.append(fn(h, head, t, temperature))
            continue
        with _uncached_autocast(hidden.device.type):
            # the head is deterministic (no dropout): no RNG state to stash per chunk
            parts.append(checkpoint(fn, h, head, t, temperature, use_reentrant=False, preserve_rng_state=False))
    return torch.cat(parts).reshape(shape)


def _uncached_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The current autocast without its weight-cast cache (nothing, when autocast is off).

    With the cache, every chunk would use one shared low-precision copy of the head weight, whose grad then sums
    all chunks' contributions in that low precision (~3x the rounding error of the unchunked grad over 64 chunks).
    Casting per chunk sends each chunk's grad through its own cast back to the fp32 weight, summed in fp32. The
    checkpoint records this state, so the recomputation casts per chunk too.
    """
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
