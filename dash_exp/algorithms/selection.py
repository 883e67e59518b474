"""Which sampled responses a step trains on, and reward shaping by length: pure functions over a step's rewards and
response lengths (the trainer applies them before advantages: `Trainer.score`).

  dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, Sec. 3.2): a group whose rewards are all equal has
      advantage 0 for every member and teaches nothing; such groups are dropped and more prompts are sampled
      until the step has prompts_per_step informative groups (at most `dynamic_sampling_rounds` extra sampler
      rounds; the step trains on what it has after the last)
  overlong filtering (DAPO Sec. 3.4): a truncated response (no EOS within max_new_tokens) is left out of the loss
  soft overlong punishment (DAPO Sec. 3.4, eq. 13): with L = max_new_tokens and B = overlong_buffer,
      R_len(y) = 0 for |y| <= L - B, (L - B - |y|) / B for L - B < |y| <= L, -1 beyond, times overlong_penalty,
      added to the task's reward
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """One bool per group: its rewards are not all equal (some member has a non-zero advantage)."""
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) > groups.amin(dim=1)


def overlong_penalty(lengths: Sequence[int], max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment of each response, by its length in tokens (0 where buffer is 0)."""
    length = torch.tensor(list(lengths), dtype=torch.float64)
    if buffer <= 0:
        return torch.zeros_like(length)
    start = max_new_tokens - buffer
    ramp = (start - length) / buffer
    penalty = torch.where(length <= start, torch.zeros_like(length),
                          torch.where(length <= max_new_tokens, ramp, -torch.ones_like(length)))
    return factor * penalty
