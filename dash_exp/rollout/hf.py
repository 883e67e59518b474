"""Batched sampling with transformers: left padding, KV cache, stop at EOS, per-token log-probs.

Sampling is inverse-CDF with counter-based randomness: at each position a row draws ONE uniform
u = hash(key, position) in (0, 1] (its key hashed from the prompt seed and the sample index: a [B] integer hash per
step, nothing [B, vocab]), and takes the first token at which the cumulative softmax of its temperature-scaled,
top-k/top-p-truncated logits reaches u. So a prompt's samples do not depend on which other prompts share its batch:
GRPO (small sampler calls) and DASH (one large call) see the same rollouts for the same seed. The distribution is
softmax's up to float32 resolution (u has 24 random bits; the CDF is a float32 cumulative sum). Per decode step
the sampling needs one [B, vocab] float32 tensor (the unnormalised probabilities, turned into their CDF in place)
beside the step's logits (divided by the temperature in place); top-k adds a [B, vocab] bool mask, top-p a sort.

The KV cache is allocated once per call, for the prompt and every new token (`rollout.kv_cache`): a decode step
writes in place instead of re-allocating and copying the whole cache as DynamicCache's concatenation does.

No device sync per decode step: which rows have stopped at EOS is looked at every `CHECK_EVERY` steps (one read);
rows that stopped in between decode on harmlessly (everything after the first EOS is cut in `_rollouts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dash_exp.batching import compute_autocast
from dash_exp.rollout.base import _M32, Rollout, SamplingParams, _fmix32, mix32
from dash_exp.rollout.kv_cache import preallocate

# decode steps between two looks at which rows have stopped (each look is one device read)
CHECK_EVERY = 8


def uniform_noise(keys: torch.Tensor, position: int) -> torch.Tensor:
    """One uniform in (0, 1] per row ([B] float32, 24 random bits), a pure function of (key, position)."""
    bits = _fmix32((keys ^ mix32(position)) * 0x9E3779B1 & _M32)
    return ((bits >> 8) + 1).to(torch.float32) / float(1 << 24)


def inverse_cdf_sample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's index drawn with probability weights[i, j] / sum(weights[i]) at its uniform u[i] in (0, 1]: the first
    index whose cumulative weight reaches u[i] x the row's total. `weights` ([B, V], >= 0, float) is overwritten by
    its cumulative sums: no temporary beyond [B]."""
    cdf = weights.cumsum_(-1)
    token = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * cdf[:, -1:]).squeeze(1)
    return token.clamp_(max=cdf.shape[-1] - 1)


def truncation_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """True where a logit is outside the top-k or outside the top-p nucleus (of the top-k); None when neither
    is on."""
    cut = None
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        cut = logits < kth
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits if cut is None else logits.masked_fill(cut, float("-inf")),
                                          dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        del sorted_logits
        outside = probs.cumsum(-1).sub_(probs) > top_p
        del probs
        outside = outside.scatter(-1, order, outside)
        cut = outside if cut is None else cut.logical_or_(outside)
    return cut


class HFSampler:
    """Samples from the live policy module (colocated: `sync` has nothing to copy), or with `own_copy` (data
    parallel: the policy is sharded) from an unsharded compute-dtype copy that `sync` refreshes."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: Sequence[int],
                 compute_dtype: torch.dtype = torch.float32, own_copy: bool = False) -> None:
        self.model, self.pad_id, self.compute_dtype, self.own_copy = model, pad_id, compute_dtype, own_copy
        self.eos = torch.tensor(list(eos_ids))

    def offload(self) -> None:
        """Nothing to free: the sampler is the policy (or a copy that the next step samples from)."""

    def close(self) -> None:
        """Nothing to shut down: the model goes with its last reference."""

    def sync(self, policy: torch.nn.Module) -> None:
        """Sample from `policy` itself, or (own_copy: data parallel, the policy is sharded over ranks) copy its
        full tensors, one at a time and in the same order on every rank, into this rank's unsharded copy."""
        if not self.own_copy:
            self.model = policy
            return
        from dash_exp.distributed import full_weights

        target = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in full_weights(policy, self.compute_dtype):
                target[name].copy_(tensor)

    def _pick(self, logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, t: int):
        """The next token of each row and its log softmax(logits / T) (before truncation); no device sync.

        `logits` ([B, V], this step's model output, which nothing else reads) may be overwritten."""
        if params.greedy:
            logits = logits.float()
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
            return token, logp.gather(-1, token[:, None]).squeeze(-1)
        scaled = logits.float()
        if params.temperature != 1.0:
            scaled.div_(params.temperature)
        cut = truncation_mask(scaled, params.top_k, params.top_p)
        top, best = scaled.max(-1, keepdim=True)
        # the one [B, V] temporary: unnormalised probabilities, then (in place) their CDF
        weights = torch.sub(scaled, top).exp_()
        log_z = weights.sum(-1, keepdim=True).log_()
        if cut is not None:
            weights.masked_fill_(cut, 0.0)
        token = inverse_cdf_sample(weights, uniform_noise(keys, t))
        del weights
        if cut is not None:
            # a parallel cumsum (CUDA) may round a cut token's cumulative weight past its predecessor's; should u
            # land in that ulp, take the most likely token instead (never a cut one)
            token = torch.where(cut.gather(-1, token[:, None]).squeeze(1), best.squeeze(1), token)
        logp = scaled.gather(-1, token[:, None]) - top - log_z
        return token, logp.squeeze(-1)

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
        # sdpa takes the padding mask as it is when given 4-D (True: attend), which spares transformers a device read
        # per forward (it checks a 2-D mask for padding to pick its own)
        mask_4d = getattr(model.config, "_attn_implementation", None) == "sdpa"
        try:
            # the prompt is read once per group; its KV cache and next-token logits are then shared by the n samples
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                        use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].repeat_interleave(params.n, dim=0)
            cache = preallocate(out.past_key_values, width + width_out, params.n)
            # the padding mask of every position to come, allocated once: step t attends to its first width + t + 1
            attention = torch.cat([attention.repeat_interleave(params.n, dim=0),
                                   attention.new_ones((len(rows), width_out))], dim=1)
            next_pos = positions[:, -1:].repeat_interleave(params.n, dim=0) + 1
            for t in range(width_out):
                token, logp = self._pick(logits, params, keys, t)
                tokens[active, t], logps[active, t] = token, logp
                if t == width_out - 1:
                    break
                finished |= torch.isin(token, eos)
                if (t + 1) % CHECK_EVERY == 0:
                    # the look (one device read): stop when every row has stopped; drop stopped rows once a quarter
                    # of the batch has (the KV-cache copy costs about a step); until then they decode on
                    alive = (~finished).nonzero().squeeze(1)
                    if len(alive) == 0:
                        break
                    if (len(active) - len(alive)) * 4 >= len(active):
                        active, token, keys, finished = active[alive], token[alive], keys[alive], finished[alive]
                        attention, next_pos = attention[alive], next_pos[alive]
                        cache.reorder_cache(alive)
                mask = attention[:, : width + t + 1]
                mask = mask[:, None, None, :].bool() if mask_4d else mask
                logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                               past_key_values=cache, use_cache=True).logits[:, -1]
                next_pos = next_pos + 1
        finally:
            model.train(was_training)
        return self._rollouts(rows, tokens[:, : t + 1].cpu(), logps[:, : t + 1].cpu(), self.eos)

    @staticmethod
    def _rollouts(rows: list[list[int]], tokens: torch.Tensor, logps: torch.Tensor, eos: torch.Tensor):
        is_eos = torch.isin(tokens, eos)
        stopped = is_eos.any(1)
        # length up to and including the first EOS; the whole width when truncated
        lengths = torch.where(stopped, is_eos.int().argmax(1) + 1, tokens.shape[1]).tolist()
        token_rows, logp_rows = tokens.tolist(), logps.tolist()
        return [
            Rollout(prompt_ids=p, response_ids=token_rows[i][:n], logprobs=logp_rows[i][:n], truncated=not stop)
            for i, (p, n, stop) in enumerate(zip(rows, lengths, stopped.tolist(), strict=True))
        ]
