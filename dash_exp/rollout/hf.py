"""Batched sampling with transformers: left padding, KV cache, stop at EOS, per-token log-probs.

Sampling is Gumbel-max with counter-based noise keyed by (prompt seed, sample index, position, token),
so a prompt's samples do not depend on which other prompts share its batch: GRPO (small sampler calls)
and DASH (one large call) see the same rollouts for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dash_exp.batching import compute_autocast
from dash_exp.rollout.base import Rollout, SamplingParams

_M32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def mix32(*values: int) -> int:
    """Hash integers into one 32-bit key."""
    h = torch.tensor(0x2545F491, dtype=torch.int64)
    for v in values:
        h = _fmix32((h ^ (v & _M32)) * 0x9E3779B1 & _M32)
    return int(h)


def gumbel_noise(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab], a pure function of (key, position, token id)."""
    token = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    base = _fmix32((token + position * 0x9E3779B1) & _M32)
    bits = _fmix32(base[None, :] ^ keys[:, None])
    u = ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


class HFSampler:
    """Samples from the live policy module (colocated: `sync` has nothing to copy)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: Sequence[int],
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.model, self.pad_id, self.compute_dtype = model, pad_id, compute_dtype
        self.eos = torch.tensor(list(eos_ids))

    def offload(self) -> None:
        """Nothing to free: the sampler is the policy."""

    def sync(self, policy: torch.nn.Module) -> None:
        self.model = policy

    def _pick(self, logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, t: int):
        logits = logits.float()
        if params.greedy:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
        else:
            logits = logits / params.temperature
            logp = torch.log_softmax(logits, -1)
            kept = truncate_logits(logits, params.top_k, params.top_p)
            token = (kept + gumbel_noise(keys, t, logits.shape[-1])).argmax(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Rollout]:
        """Under autocast in the compute dtype: the fp32 weights are cast once per call (autocast's weight cache),
        with no second copy of the model kept between calls."""
        device = next(self.model.parameters()).device
        with torch.inference_mode(), compute_autocast(device, self.compute_dtype):
            return self._generate(prompts, params, seeds, device)

    def _generate(self, prompts: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int],
                  device: torch.device) -> list[Rollout]:
        model = self.model
        rows = [p for p in prompts for _ in range(params.n)]
        keys = torch.tensor([mix32(s, k) for s in seeds for k in range(params.n)], device=device)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        eos = self.eos.to(device)
        was_training = model.training
        model.eval()
        width_out = params.max_new_tokens
        tokens = torch.full((len(rows), width_out), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((len(rows), width_out), device=device)
        # rows still generating; finished rows are dropped from the batch (and the KV cache) as they stop
        active = torch.arange(len(rows), device=device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        try:
            # the prompt is read once per group; its KV cache and next-token logits are then shared by the n samples
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                        use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1].repeat_interleave(params.n, dim=0)
            cache.batch_repeat_interleave(params.n)
            attention = attention.repeat_interleave(params.n, dim=0)
            next_pos = positions[:, -1:].repeat_interleave(params.n, dim=0) + 1
            for t in range(width_out):
                token, logp = self._pick(logits, params, keys, t)
                tokens[active, t], logps[active, t] = token, logp
                finished |= torch.isin(token, eos)
                n_done = int(finished.sum())
                if n_done == len(active) or t == width_out - 1:
                    break
                # drop stopped rows once a quarter of the batch has stopped (the KV-cache copy costs about a step);
                # until then they decode on, and everything after their EOS is cut off in _rollouts
                if n_done * 4 >= len(active):
                    keep = (~finished).nonzero().squeeze(1)
                    active, token, keys, finished = active[keep], token[keep], keys[keep], finished[keep]
                    attention, next_pos = attention[keep], next_pos[keep]
                    cache.reorder_cache(keep)
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
                logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                               past_key_values=cache, use_cache=True).logits[:, -1]
                next_pos = next_pos + 1
        finally:
            model.train(was_training)
        return self._rollouts(rows, tokens[:, : t + 1].cpu(), logps[:, : t + 1].cpu(), eos.cpu())

    @staticmethod
    def _rollouts(rows: list[list[int]], tokens: torch.Tensor, logps: torch.Tensor, eos: torch.Tensor):
        is_eos = torch.isin(tokens, eos)
        stopped = is_eos.any(1)
        # length up to and including the first EOS; the whole width when truncated
        lengths = torch.where(stopped, is_eos.int().argmax(1) + 1, tokens.shape[1]).tolist()
        return [
            Rollout(prompt_ids=p, response_ids=tokens[i, :n].tolist(), logprobs=logps[i, :n].tolist(),
                    truncated=not bool(stopped[i]))
            for i, (p, n) in enumerate(zip(rows, lengths, strict=True))
        ]
