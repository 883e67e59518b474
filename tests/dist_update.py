"""Run under torchrun by tests/test_distributed.py: one update of a fixed step batch with the policy sharded over
the ranks (FSDP2, gloo) and, on rank 0, the same update in one process; both in float64. Writes the largest
weight difference and both updates' metrics to the JSON file given as the first argument.

    torchrun --nproc-per-node 2 tests/dist_update.py out.json keep=all algorithm=ppo kl=on
    torchrun --nproc-per-node 2 tests/dist_update.py out.json keep=all algorithm=dash single=separate
"""

import copy
import json
import random
import sys
from pathlib import Path

import torch

from dash_exp.batching import TrainSample
from dash_exp.checkpoint import full_state
from dash_exp.config import compose_config
from dash_exp.distributed import SINGLE, World, init, leave, shard, world_from_env
from dash_exp.models import build_reference, load_policy, load_tokenizer, resolve_model_path
from dash_exp.tracking import NullSink
from dash_exp.trainer import Trainer

SMALL = ["task.n_train=64", "task.n_test=16", "task.eval_size=8", "prompts_per_step=4", "group_size=4",
         "train_microbatch=4", "max_new_tokens=40", "logger=none", "threads=1", "run_dir=unused"]


def step_batch(keep_rule: str) -> tuple[list[TrainSample], list[bool]]:
    """16 samples of 4 groups (each group's 4 share their prompt); `all`: every sample with |advantage| > 0.1 kept
    (4 dropped); `one`: only one kept (so one rank is left with nothing)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randint(4, 12))] for _ in range(4)]
    samples = [TrainSample(prompts[i // 4], [rng.randrange(3, 90) for _ in range(rng.randint(2, 20))],
                           advantage=0.0 if i % 4 == 3 else rng.uniform(-1.5, 1.5)) for i in range(16)]
    keep = [abs(s.advantage) > 0.1 for s in samples]
    if keep_rule == "one":
        keep = [i == 5 for i in range(16)]
    return samples, keep


def trainer(cfg, path: str, tokenizer, world: World, device: torch.device) -> Trainer:
    policy = load_policy(path, device).double()
    if world.parallel:
        shard(policy, torch.float64, device)
    ref = build_reference(path, cfg.model.dtype, device).double() if cfg.kl.beta > 0 else None
    return Trainer(cfg, policy, tokenizer, None, None, NullSink(), Path("unused"), ref=ref,
                   sft_items=[None] * 64, world=world)


def main() -> None:
    out, keep_rule, overrides = Path(sys.argv[1]), sys.argv[2].split("=")[1], sys.argv[3:]
    # single=separate: the one-process update without the shared-prompt forward (today's, to compare with)
    single_overrides = [o for o in overrides if o != "single=separate"]
    overrides, separate = single_overrides, len(single_overrides) < len(overrides)
    world = world_from_env()
    device = init(world)
    torch.set_num_threads(1)
    cfg = compose_config([*SMALL, *overrides])
    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    samples, keep = step_batch(keep_rule)
    parallel = trainer(cfg, path, tokenizer, world, device)
    metrics = parallel.update(copy.deepcopy(samples), keep, step=1)
    state, _ = full_state(parallel.policy, parallel.optimizer)
    if world.main:
        single_cfg = compose_config([*SMALL, *overrides, *(["model.share_prompt=false"] if separate else [])])
        single = trainer(single_cfg, path, tokenizer, SINGLE, device)
        expected = single.update(copy.deepcopy(samples), keep, step=1)
        reference = single.policy.state_dict()
        gap = max(float((state[k] - reference[k]).abs().max()) for k in reference)
        moved = max(float((state[k] - load_policy(path, device).double().state_dict()[k]).abs().max())
                    for k in reference)
        out.write_text(json.dumps({"max_weight_gap": gap, "max_weight_change": moved, "parallel": metrics,
                                   "single": expected, "world_size": world.size}))
    leave()  # together: rank 1 waits there while rank 0 still computes the one-process update


if __name__ == "__main__":
    main()
