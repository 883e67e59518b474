"""Micro-batch machinery shared by RL, SFT and the warm-up: samples, padding, response log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TrainSample:
    """One sequence to backprop: prompt + response token ids, and per-sample training inputs."""

    prompt_ids: list[int]
    response_ids: list[int]
    # group-relative advantage (RL); unused by SFT
    advantage: float = 0.0
    # log-probs of response tokens under the pre-update policy (PPO), else None
    old_logprobs: torch.Tensor | None = None
    # log-probs of response tokens under the frozen reference policy (cached once computed)
    ref_logprobs: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def microbatches(samples: Sequence[TrainSample], size: int) -> list[list[TrainSample]]:
    """Length-sorted chunks of at most `size` samples (less padding; the summed loss is order-free)."""
    ordered = sorted(samples, key=lambda s: s.length)
    return [ordered[i: i + size] for i in range(0, len(ordered), size)]


def response_logprobs(
    model: torch.nn.Module, samples: Sequence[TrainSample], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token | prefix) for each sample, left-aligned: ([B, R], mask [B, R]).

    Runs the decoder on right-padded prompt+response and applies the LM head only at response
    positions (saves the [B, L, V] logits of prompt tokens). Logits are divided by `temperature`.
    """
    device = next(model.parameters()).device
    lengths = [s.length for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : s.length] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[i, : s.length] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    resp_len = torch.tensor([len(s.response_ids) for s in samples], device=device)
    start = torch.tensor([len(s.prompt_ids) for s in samples], device=device)
    r = int(resp_len.max())
    offsets = torch.arange(r, device=device)
    mask = offsets[None, :] < resp_len[:, None]
    # position p predicts token p + 1: the response token j is predicted at start + j - 1
    pred_pos = (start[:, None] - 1 + offsets[None, :]).clamp(max=width - 2)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    hidden = hidden.gather(1, pred_pos[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids.gather(1, pred_pos + 1)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return logp * mask, mask.to(logp.dtype)


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
