"""Run under torchrun by tests/test_distributed.py: a sharded trainer (FSDP2, gloo) takes one update and saves a
checkpoint; a fresh sharded trainer resumes from it. Records which ranks read the checkpoint file and, on rank 0,
the largest difference between the resumed and the saved weights and optimizer state, into the JSON file given as
the first argument.

    torchrun --nproc-per-node 2 tests/dist_resume.py out.json run_dir
"""

import copy
import json
import sys
from pathlib import Path

import torch
from dist_update import SMALL, step_batch, trainer

import dash_exp.checkpoint as checkpoint
from dash_exp.checkpoint import full_state, latest_checkpoint
from dash_exp.config import compose_config
from dash_exp.distributed import all_gather, init, leave, world_from_env
from dash_exp.models import load_tokenizer, resolve_model_path


class SyncRecorder:
    """The resumed trainer pushes its weights to its sampler: here, only whether it did."""

    synced = 0

    def sync(self, policy: torch.nn.Module) -> None:
        self.synced += 1


def flat(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}").items()}
    return {}


def main() -> None:
    out, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    world = world_from_env()
    device = init(world)
    torch.set_num_threads(1)
    cfg = compose_config([*SMALL, "algorithm=grpo", "kl=off"])
    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    samples, keep = step_batch("all")
    first = trainer(cfg, path, tokenizer, world, device)
    first.run_dir = run_dir
    first.update(copy.deepcopy(samples), keep, step=1)
    first.stream.consumed, first.step = 12, 3
    first.save()
    saved_policy, saved_optimizer = full_state(first.policy, first.optimizer)  # collectives: every rank

    reads: list[str] = []
    real_read = checkpoint._read_state
    checkpoint._read_state = lambda p: reads.append(str(p)) or real_read(p)
    resumed = trainer(cfg, path, tokenizer, world, device)
    resumed.sampler = SyncRecorder()
    resumed.resume(latest_checkpoint(run_dir))
    checkpoint._read_state = real_read
    policy, optimizer = full_state(resumed.policy, resumed.optimizer)
    readers = all_gather(len(reads), world)
    if world.main:
        before, after = flat(saved_optimizer), flat(optimizer)
        out.write_text(json.dumps({
            "reads_per_rank": readers,
            "max_weight_gap": max(float((saved_policy[k] - policy[k]).abs().max()) for k in saved_policy),
            "max_optimizer_gap": max(float((before[k].double() - after[k].double()).abs().max()) for k in before),
            "optimizer_tensors": [len(before), len(after)], "step": resumed.step,
            "consumed": resumed.stream.consumed, "synced": resumed.sampler.synced}))
    leave()


if __name__ == "__main__":
    main()
