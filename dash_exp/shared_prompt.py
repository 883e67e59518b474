"""Shared-prompt forward: each distinct prompt of a micro-batch runs through the decoder once, and every response to
it attends to that one copy's keys and values, with the gradient flowing back through them (Prefix Grouper,
Liu et al. 2025, arXiv 2506.05433).

Layout. The micro-batch becomes ONE flat sequence without padding: prompt_1, its responses, prompt_2, its
responses, ... Positions restart for each piece as in its own sequence: a prompt at 0..P-1, each of its responses
at P..P+R-1 (so rotary embeddings see what they see when the sample runs alone). Everything in a decoder layer but
attention is per token, so only attention needs to know the layout. `shared_prompt_attention` computes it in two
SDPA calls per layer:
- the prompts, padded to the longest one: causal self-attention (a padded query is discarded; a real one sees no
  padding, which comes after it);
- the responses, padded to the longest one: queries of response i against keys [its prompt's keys ; its own
  keys], masked to the prompt's real tokens and causally to its own.
Each response token thus attends to exactly the keys and values it attends to in `[prompt, response]` alone, at the
same positions: the log-probs and the gradient are the separate forward's, to float rounding (a different order of
sums), while each prompt's projections, MLPs and their backward run once per micro-batch instead of once per
sample. Samples group by their prompt's token ids, so any two samples with the same prompt share it.

What is shared is the cheaper of two prefixes, counted in decoder tokens per micro-batch (`shared_prefixes`): each
distinct prompt (a group's samples share it: the paper's raw prompts, long responses), or the longest prefix common
to every prompt of the micro-batch (few-shot exemplars, a chat template's system and exemplar turns), each
sample's "response" piece then being the rest of its prompt followed by its response, only the response scored.
The two stages above are the same for both: a shared piece, and pieces that attend to it.

The attention function is registered in transformers' `AttentionInterface` under `dash_shared_prompt:<impl>` (and
the mask function of `<impl>` under the same name). A call without a layout (generation, evaluation, any other
forward of the model) goes to `<impl>` unchanged, with the mask `<impl>` builds: enabling it changes nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PREFIX = "dash_shared_prompt:"


@dataclass
class SharedPromptLayout:
    """Where each prompt and each response sits in the flat sequence (device tensors; built by `pack`)."""

    # [n_prompts, P]: flat index of each prompt's token p (0 past its end), and which are real
    prompt_index: torch.Tensor
    prompt_real: torch.Tensor
    # [n_responses, R]: flat index of each response's token t (0 past its end), and which are real
    response_index: torch.Tensor
    response_real: torch.Tensor
    # [n_responses]: which prompt each response continues
    response_prompt: torch.Tensor
    # [n_responses, 1, R, P + R] bool: what each response token may attend to (its prompt's real tokens, its own
    # tokens up to itself)
    response_mask: torch.Tensor
    # [T]: for each flat position, its row in cat(the prompts' padded rows, the responses' padded rows) flattened:
    # one integer gather puts the two stages' outputs back into the flat sequence (no boolean indexing, which would
    # read its size back from the device)
    gather: torch.Tensor


@dataclass
class Packed:
    """A micro-batch as one flat sequence: the decoder's inputs, the layout, and where its log-probs come from."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    layout: SharedPromptLayout
    # per response token (samples in the caller's order, tokens in order): the flat position whose hidden state
    # predicts it, the token, and its (sample, index) in the left-aligned [B, R] output
    predict_at: torch.Tensor
    targets: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor


def shared_prefixes(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    ) -> tuple[list[Sequence[int]], list[list[int]], list[int]]:
    """What each sample shares: (prefix, tail, skip) per sample, the cheaper of two layouts by decoder tokens:
    - per prompt: the prefix is the whole prompt (samples with equal prompts share it), the tail the response;
    - common prefix: every sample shares the micro-batch's longest common prompt prefix (few-shot exemplars, a chat
      template's system turn), and its tail is the rest of its prompt, then its response.
    `skip` is how many leading tail tokens are prompt (not scored)."""
    per_prompt = sum(len(p) for p in {tuple(p) for p in prompts}) + sum(len(r) for r in responses)
    k = len(os.path.commonprefix([list(p) for p in prompts]))
    common = k + sum(len(p) - k + len(r) for p, r in zip(prompts, responses, strict=True))
    if k and common < per_prompt:
        tails = [list(p[k:]) + list(r) for p, r in zip(prompts, responses, strict=True)]
        return [prompts[0][:k]] * len(prompts), tails, [len(p) - k for p in prompts]
    return list(prompts), [list(r) for r in responses], [0] * len(prompts)


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device: torch.device) -> Packed:
    """The flat layout of samples (prompt_i, response_i), each prefix of `shared_prefixes` run once (samples with
    equal prefix token ids share one copy of it). Index tensors are built on the host and sent once."""
    prefixes, tails, skip_of = shared_prefixes(prompts, responses)
    prompt_of: dict[tuple[int, ...], int] = {}
    groups: list[list[int]] = []
    for i, prefix in enumerate(prefixes):
        key = tuple(prefix)
        if key not in prompt_of:
            prompt_of[key] = len(groups)
            groups.append([])
        groups[prompt_of[key]].append(i)
    flat: list[int] = []
    positions: list[int] = []
    prompt_start, response_start = [0] * len(groups), [0] * len(prompts)
    response_prompt = [0] * len(prompts)
    for g, members in enumerate(groups):
        prefix = prefixes[members[0]]
        prompt_start[g] = len(flat)
        flat += prefix
        positions += range(len(prefix))
        for i in members:
            response_start[i] = len(flat)
            response_prompt[i] = g
            flat += tails[i]
            positions += range(len(prefix), len(prefix) + len(tails[i]))
    prompt_len = torch.tensor([len(prefixes[m[0]]) for m in groups])
    tail_len = torch.tensor([len(t) for t in tails])
    width_p, width_r = int(prompt_len.max()), int(tail_len.max())
    prompt_real = torch.arange(width_p)[None, :] < prompt_len[:, None]
    response_real = torch.arange(width_r)[None, :] < tail_len[:, None]
    prompt_index = torch.where(prompt_real, torch.tensor(prompt_start)[:, None] + torch.arange(width_p), 0)
    response_index = torch.where(response_real, torch.tensor(response_start)[:, None] + torch.arange(width_r), 0)
    owner = torch.tensor(response_prompt)
    causal = torch.ones(width_r, width_r, dtype=torch.bool).tril()
    response_mask = torch.cat([prompt_real[owner][:, None, :].expand(-1, width_r, -1),
                               causal[None].expand(len(prompts), -1, -1)], dim=-1)[:, None]
    gather = torch.empty(len(flat), dtype=torch.long)
    gather[prompt_index[prompt_real]] = torch.arange(prompt_index.numel()).reshape(prompt_index.shape)[prompt_real]
    gather[response_index[response_real]] = prompt_index.numel() + torch.arange(response_index.numel()).reshape(
        response_index.shape)[response_real]
    # response token j of sample i (tail token skip_i + j) is predicted by the hidden state before it: the prefix's
    # last token for the tail's first token
    row = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(r) for r in responses]))
    col = torch.cat([torch.arange(len(r)) for r in responses])
    at = torch.tensor(skip_of)[row] + col  # the token's index in its tail
    before = torch.tensor(response_start)[row] + at - 1
    last_prompt_token = (torch.tensor(prompt_start) + prompt_len - 1)[owner][row]
    predict_at = torch.where(at == 0, last_prompt_token, before)
    ids = torch.tensor(flat)
    targets = ids[torch.tensor(response_start)[row] + at]
    send = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else (
        lambda t: t.to(device))
    layout = SharedPromptLayout(*(send(t) for t in (prompt_index, prompt_real, response_index, response_real, owner,
                                                    response_mask, gather)))
    return Packed(send(ids[None]), send(torch.tensor(positions)[None]), layout, *(send(t) for t in (
        predict_at, targets, row, col)))


def shared_prompt_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, *, fallback: str, shared_prompt: SharedPromptLayout | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature (query [1, heads, T, d], key and value [1, kv_heads, T, d] -> [1, T, heads,
    d]); without `shared_prompt` (any forward but `batching.response_logprobs`'), the `fallback` implementation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if shared_prompt is None:
        return ALL_ATTENTION_FUNCTIONS[fallback](module, query, key, value, attention_mask, **kwargs)
    lay = shared_prompt
    kwargs.pop("is_causal", None)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
    # stage 1: the shared prefixes (prompts), causal
    pq, pk, pv = (t[lay.prompt_index].transpose(1, 2) for t in (q, k, v))  # [n, heads, P, d]
    prompt_out, _ = sdpa_attention_forward(module, pq, pk, pv, None, is_causal=True, **kwargs)  # [n, P, heads, d]
    # stage 2: each response (in the common-prefix layout: rest of prompt, then response) against its prefix's keys
    # and values, then its own
    rq, rk, rv = (t[lay.response_index].transpose(1, 2) for t in (q, k, v))  # [m, heads, R, d]
    rk = torch.cat([pk[lay.response_prompt], rk], dim=2)
    rv = torch.cat([pv[lay.response_prompt], rv], dim=2)
    response_out, _ = sdpa_attention_forward(module, rq, rk, rv, lay.response_mask, is_causal=False, **kwargs)
    out = torch.cat([prompt_out.flatten(0, 1), response_out.flatten(0, 1)])[lay.gather]  # [T, heads, d]
    return out[None], None


def enable(model: torch.nn.Module) -> None:
    """Route `model`'s attention through `shared_prompt_attention` (idempotent). Raises ValueError for a model whose
    attention does not dispatch through transformers' AttentionInterface."""
    import functools

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    config = model.config
    current = config._attn_implementation
    if current.startswith(PREFIX):
        return
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"model.share_prompt: {type(model).__name__}'s attention does not go through transformers' "
                         "AttentionInterface; set model.share_prompt=false")
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(shared_prompt_attention, fallback=current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


# an already prepared 4D mask: transformers uses it as it is instead of building one (the layout is the mask)
def no_mask(device: torch.device) -> torch.Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
