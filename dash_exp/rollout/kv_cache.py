"""A KV cache allocated once per generation, for the HF sampler's decode loop.

transformers' DynamicCache grows by concatenation: every decode step allocates each layer's keys and values anew
and copies the whole cache into them (about 1 GB per step at batch 128 x 30 layers for SmolLM2-135M), so a larger
batch decodes SLOWER per token and half the CPU time goes to the kernel (page faults of fresh allocations). Here
each layer's keys and values live in one buffer sized for the prompt plus every new token: a step writes its
token in place and attention reads a view of the filled part.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose `keys` / `values` are views of buffers of `capacity` positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, repeats: int = 1,
                 scratch: torch.Tensor | None = None) -> None:
        super().__init__()
        batch, heads, length, _ = keys.shape
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_buffer = keys.new_empty((batch * repeats, heads, capacity, keys.shape[-1]))
        self.value_buffer = values.new_empty((batch * repeats, heads, capacity, values.shape[-1]))
        # where dropping rows gathers the kept ones: shared by the layers when it is large enough for this one's
        size = max(self.key_buffer.numel(), self.value_buffer.numel())
        self.scratch = scratch if scratch is not None and scratch.numel() >= size else keys.new_empty(size)
        # each prompt's rows, `repeats` samples each, written straight from the prompt's cache (no repeated copy)
        for buffer, states in ((self.key_buffer, keys), (self.value_buffer, values)):
            buffer.view(batch, repeats, heads, capacity, -1)[:, :, :, :length].copy_(states[:, None])
        self.length = length
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions, capacity {self.key_buffer.shape[2]}")
        self.key_buffer[:, :, self.length:end].copy_(key_states)
        self.value_buffer[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (the sampler drops finished rows), moved to the front of the same buffers
        through the shared scratch: nothing is allocated (a fresh copy per drop put a third of batch-128 decoding
        into the kernel, faulting in new pages)."""
        rows = len(indices)
        for buffer in (self.key_buffer, self.value_buffer):
            filled = buffer[:, :, : self.length]
            kept = self.scratch[: rows * filled[0].numel()].view(rows, *filled.shape[1:])
            torch.index_select(filled, 0, indices, out=kept)
            filled[:rows].copy_(kept)
        self.key_buffer, self.value_buffer = self.key_buffer[:rows], self.value_buffer[:rows]
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


def preallocate(cache: Any, capacity: int, repeats: int = 1) -> Any:
    """`cache` (a DynamicCache after the prompt's forward) with every layer moved into buffers of `capacity`
    positions, each prompt's row repeated `repeats` times (its samples)."""
    if any(type(layer) is not DynamicLayer for layer in cache.layers):  # sliding-window layers: left as they are
        cache.batch_repeat_interleave(repeats)
        return cache
    first = PreallocatedLayer(cache.layers[0].keys, cache.layers[0].values, capacity, repeats)
    cache.layers = [first, *(PreallocatedLayer(layer.keys, layer.values, capacity, repeats, first.scratch)
                             for layer in cache.layers[1:])]
    return cache
