"""Micro-batch machinery shared by RL, SFT and the warm-up: samples, padding, response log-probs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dash_exp.logprobs import token_logprobs

# model.dtype -> the compute dtype (weights stay fp32)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainSample:
    """One sequence to backprop: prompt + response token ids, and per-sample training inputs."""

    prompt_ids: list[int]
    response_ids: list[int]
    # group-relative advantage (RL); unused by SFT
    advantage: float = 0.0
    # log-probs of response tokens under the pre-update policy (PPO) or, for a sample of older weights
    # (overlapped rollout), under the behaviour policy as the sampler recorded them; None = the current policy's
    old_logprobs: torch.Tensor | None = None
    # truncation cap on this sample's importance ratio where its advantage is negative (inf = none)
    ratio_cap: float = math.inf
    # log-probs of response tokens under the frozen reference policy (cached once computed)
    ref_logprobs: torch.Tensor | None = None
    # the sampler's own log-probs of the response tokens, as it returned them (rollout correction and the mismatch
    # metrics); None for samples it did not generate (SFT)
    sampler_logprobs: list[float] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def microbatches(samples: Sequence[TrainSample], size: int, passes: int | None = None,
                 by_prompt: bool = False) -> list[list[TrainSample]]:
    """Length-sorted chunks of at most `size` samples (less padding; the summed loss is order-free). With
    `passes` (data parallel: every rank runs the same number), exactly that many near-equal chunks, empty ones
    where there are fewer samples than passes. by_prompt (shared-prompt forward): samples of one prompt next to each
    other, prompts by length, so that a group shares its prompt within a chunk wherever the chunk size allows."""
    if by_prompt:
        ordered = sorted(samples, key=lambda s: (len(s.prompt_ids), s.prompt_ids, len(s.response_ids)))
    else:
        ordered = sorted(samples, key=lambda s: s.length)
    if passes is None:
        return [ordered[i: i + size] for i in range(0, len(ordered), size)]
    n = len(ordered)
    return [ordered[k * n // passes: (k + 1) * n // passes] for k in range(passes)]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory, asynchronously (a plain copy waits for the GPU)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def compute_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Forward and backward in the compute dtype (`model.dtype`) over fp32 master weights; off for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def response_logprobs(
    model: torch.nn.Module, samples: Sequence[TrainSample], pad_id: int, temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32, chunk: int | None = None, entropy: bool = False,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, ...]:
    """log pi(response token | prefix) for each sample, left-aligned: ([B, R], mask [B, R]); entropy=True adds the
    entropy of each of those tokens' distributions [B, R] (same chunks of logits) as a third tensor.

    Runs the decoder on right-padded prompt+response (no attention mask: causal attention never lets padding reach
    a real token) under `compute_autocast` and applies the LM head only
    at the response tokens, `chunk` tokens at a time (`logprobs.token_logprobs`: O(chunk x vocab) memory in
    forward and backward). Logits are divided by `temperature`. Indices are built on the host: no device sync.
    share_prompt: the samples share one forward of each distinct prompt, or of the prefix all their prompts have in
    common, whichever runs fewer tokens (`shared_prompt`: one flat sequence without padding; the same values to
    float rounding).
    """
    if share_prompt:
        return _shared_prompt_logprobs(model, samples, temperature, compute_dtype, chunk, entropy)
    device = next(model.parameters()).device
    width = max(s.length for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : s.length] = torch.tensor(s.prompt_ids + s.response_ids)
    resp_len = torch.tensor([len(s.response_ids) for s in samples])
    mask = torch.arange(int(resp_len.max()))[None, :] < resp_len[:, None]
    # position p predicts token p + 1: response token j of sample i is predicted at len(prompt_i) + j - 1
    row = torch.repeat_interleave(torch.arange(len(samples)), resp_len)
    col = torch.cat([torch.arange(len(s.response_ids)) for s in samples])
    pred_pos = col + torch.repeat_interleave(torch.tensor([len(s.prompt_ids) - 1 for s in samples]), resp_len)
    targets = input_ids[row, pred_pos + 1]
    row, col, pred_pos, targets, input_ids = (to_device(t, device) for t in (row, col, pred_pos, targets, input_ids))
    with compute_autocast(device, compute_dtype):
        # right padding under causal attention: no position attends to a later one, so the padding never reaches a
        # real token and no attention mask is needed (a mask makes transformers read it back from the device)
        hidden, head = final_hidden_states(model, input_ids)
        logp = token_logprobs(hidden[row, pred_pos], head, targets, temperature, chunk, entropy)
    return _left_aligned(logp, row, col, mask.to(device), entropy)


def _left_aligned(logp: torch.Tensor, row: torch.Tensor, col: torch.Tensor, mask: torch.Tensor,
                  entropy: bool) -> tuple[torch.Tensor, ...]:
    """Per-token log-probs (and entropies: [..., 2]) at (row, col) as [B, R] tensors, with the mask in their dtype."""
    if entropy:
        logp, ent = logp.unbind(-1)
    out = logp.new_zeros(mask.shape)
    out[row, col] = logp
    if not entropy:
        return out, mask.to(dtype=logp.dtype)
    ent_out = ent.new_zeros(mask.shape)
    ent_out[row, col] = ent
    return out, mask.to(dtype=logp.dtype), ent_out


def _shared_prompt_logprobs(model: torch.nn.Module, samples: Sequence[TrainSample], temperature: float,
                            compute_dtype: torch.dtype, chunk: int | None, entropy: bool) -> tuple[torch.Tensor, ...]:
    """`response_logprobs` through one flat sequence in which each shared prefix runs once (`shared_prompt`)."""
    from dash_exp import shared_prompt

    device = next(model.parameters()).device
    shared_prompt.enable(model)
    packed = shared_prompt.pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], device)
    resp_len = torch.tensor([len(s.response_ids) for s in samples])
    mask = torch.arange(int(resp_len.max()))[None, :] < resp_len[:, None]
    with compute_autocast(device, compute_dtype):
        hidden, head = final_hidden_states(model, packed.input_ids, position_ids=packed.position_ids,
                                           attention_mask=shared_prompt.no_mask(device),
                                           shared_prompt=packed.layout)
        logp = token_logprobs(hidden[0, packed.predict_at], head, packed.targets, temperature, chunk, entropy)
    return _left_aligned(logp, packed.row, packed.col, mask.to(device), entropy)


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                        **kwargs: object) -> tuple[torch.Tensor, torch.nn.Module]:
    """The decoder's last hidden states [B, L, H] and the LM head, without the [B, L, V] logits; `kwargs` go to the
    decoder's forward (position ids, the shared-prompt layout).

    An FSDP-sharded model runs its own (root) forward with the head swapped for the identity, so that FSDP's
    hooks gather the root's parameters (embeddings, final norm, the tied head) and reduce their gradients; the
    root keeps them gathered after forward, so the real head can then be applied in chunks."""
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings()
    if not isinstance(model, FSDPModule):
        return model.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state, head
    model.set_output_embeddings(torch.nn.Identity())
    try:
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits, head
    finally:
        model.set_output_embeddings(head)


def pad_right(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack 1-D tensors, zero-padded on the right to `width`."""
    out = torch.zeros((len(rows), width), dtype=rows[0].dtype, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


class TokenCache:
    """Tokenize each distinct text once (prompts and reference solutions recur every epoch)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids
