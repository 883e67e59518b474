"""Data parallelism on torch.distributed: one process per device under torchrun, the policy sharded with FSDP2.

The math is the single-process math. Every rank samples its share of the step's prompts (whole groups), then the
rollouts are gathered so every rank holds the whole step batch: advantages, the normalizer (before filtering) and
the gradient filter are computed exactly as with one process. The kept samples are then dealt out across ranks
by tokens (`deal`), every rank runs the same number of forward/backward passes (a rank short of samples runs
zero-weight passes, so FSDP's collectives always pair up), each rank's loss is divided by the GLOBAL normalizer,
and FSDP sums the gradients (divide factor 1), so the update equals the one-process update. World size 1 is the
plain code path: no process group, no sharding.

With overlapped rollout (rollout.generator_ranks > 0) the launch is split into roles (`split_roles`): the first
ranks train (their own `World`, whose collectives run on the trainers' group only) and the last ranks generate;
`Link` holds the point-to-point channels between trainer rank 0 and the generators (dash_exp.overlap).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the job (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # the process group of this world's collectives; None = the default group (every rank of the launch)
    group: Any = None

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shares(self, n: int) -> slice:
        """This rank's contiguous share of n items (n divisible by the world size)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


# one process, no process group
SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes, or a submitit job of several tasks (hydra/launcher=slurm with nodes x
    tasks_per_node > 1: its variables are exported as torchrun's); size 1 without either."""
    if "RANK" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            # every task sees all of its node's GPUs and takes cuda:LOCAL_RANK; the job's own numbers replace any
            # stale LOCAL_WORLD_SIZE / MASTER_* inherited from the launching process (no RANK: nothing set this up)
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def check_world(cfg: Any, world: World) -> None:
    """Reject what data parallelism (and the split into trainer and generator ranks) cannot run, in one line,
    before any model loads."""
    from dash_exp.errors import ConfigError

    generators = cfg.rollout.generator_ranks
    if generators:
        if world.size <= generators:
            raise ConfigError(f"rollout.generator_ranks={generators}: expected fewer than the launch's {world.size} "
                              f"process(es), the rest train (torchrun --nproc-per-node {generators + 1} or more)")
        if cfg.prompts_per_step % generators:
            raise ConfigError(f"prompts_per_step={cfg.prompts_per_step}: expected a multiple of "
                              f"rollout.generator_ranks={generators} (each generator samples an equal share)")
    if not world.parallel:
        return
    trainers = world.size - generators
    if not generators and cfg.prompts_per_step % trainers:  # (trainers beside generators sample nothing)
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step}: expected a multiple of the world size "
                          f"{trainers} (each rank samples whole groups of an equal share of the prompts)")
    if cfg.tune == "auto":
        raise ConfigError(f"tune=auto: probes one process's memory; with {world.size} ranks set train_microbatch "
                          "and inference_batch (or tune once with one process and reuse its numbers)")
    if torch.cuda.is_available() and world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={world.local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                          "visible: start at most one process per GPU (torchrun --nproc-per-node)")


def init(world: World) -> torch.device:
    """Join the process group (NCCL with CUDA, gloo on CPU) and return this rank's device; no group for size 1."""
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.parallel and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave(together: bool = True) -> None:
    """Leave the process group (torchrun ranks), if this process joined one (a no-op once left): the one teardown.
    `together` (the default): every rank of the launch, trainers and generators alike, first meets the others at a
    barrier on the default group, and only then tears its groups down. A rank that destroys gloo and exits while
    another still holds it (computing, or shutting its engine down) has aborted that rank in gloo's teardown
    ("terminate called without an active exception", CI). After a failure, `together=False` leaves at once,
    without the barrier: the others may never reach it (torchrun stops them once this rank exits)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if together:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class Link:
    """Point-to-point channels between trainer rank 0 (global rank 0) and the generator ranks, one process group
    each: `weights` (NCCL on GPU, gloo on CPU) carries new weights out, `samples` (gloo: pickled objects) carries
    step batches in."""

    # the generators' global ranks, in order
    generators: tuple[int, ...]
    weights: Any
    samples: Any


@dataclass(frozen=True)
class Roles:
    """This process's role in a split launch: `world` is the trainers' world (for a trainer) or the generators'
    (rank = index among them, for a generator)."""

    world: World
    link: Link | None
    generator: bool = False


def split_roles(world: World, generator_ranks: int) -> Roles:
    """The first world.size - generator_ranks ranks train, the rest generate; every rank of the launch calls this
    (it creates the trainers' group and the link's groups, which are collectives). No split: the world as is."""
    if not generator_ranks:
        return Roles(world, None)
    dist = torch.distributed
    trainers = world.size - generator_ranks
    generators = tuple(range(trainers, world.size))
    trainer_group = dist.new_group(list(range(trainers)))
    link = Link(generators, dist.new_group([0, *generators]), dist.new_group([0, *generators], backend="gloo"))
    if world.rank < trainers:
        return Roles(World(world.rank, trainers, world.local_rank, trainer_group), link)
    return Roles(World(world.rank - trainers, generator_ranks, world.local_rank), link, generator=True)


def shard(policy: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device,
          world: World | None = None) -> torch.nn.Module:
    """FSDP2: every decoder layer and the root sharded over the world's ranks (all ranks of the launch, or the
    trainers' group of a split launch), fp32 parameters gathered in the compute dtype, gradients reduced in fp32
    and SUMMED (divide factor 1: the loss is already divided by the global normalizer)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if world is not None and world.group is not None:
        mesh = DeviceMesh.from_group(world.group, device.type)
    else:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reduce_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32 (fp64 for a float64 test policy)
    policy_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    for layer in policy.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy_mp)
    fully_shard(policy, mesh=mesh, mp_policy=policy_mp)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            # a plain SUM reduce-scatter: FSDP's default averages (AVG), a factor alone becomes PREMUL_SUM, which
            # gloo lacks
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return policy


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP-sharded DTensor (a collective: every rank calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_weights(policy: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights by checkpoint name, one whole tensor at a time, in `dtype` (each fp32 master cast when
    its turn comes; no copy when the dtypes agree). Sharded: each gathered, in the same order on every rank (a
    collective). Tied weights appear under both names, as in a checkpoint."""
    for name, tensor in policy.state_dict().items():
        yield name, full_tensor(tensor.detach()).to(dtype)


def barrier(world: World) -> None:
    if world.parallel:
        torch.distributed.barrier(group=world.group)


def all_gather(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] for one process)."""
    if not world.parallel:
        return [obj]
    out: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(out, obj, group=world.group)
    return out


def deal(lengths: Sequence[int], size: int, microbatch: int) -> tuple[list[list[int]], int]:
    """Which items each of `size` ranks processes, and the forward/backward passes every rank runs.

    Longest first, each item to the rank with the fewest tokens so far among those with room (every rank gets
    floor or ceil of n / size items), so ranks carry about the same tokens. Passes: the fewest micro-batches of at
    most `microbatch` items that hold the largest share; every rank splits its share into that many micro-batches
    (a rank left with fewer items than passes, or none, pads with zero-weight passes). The same on every rank.
    """
    n = len(lengths)
    cap = -(-n // size)
    tokens, shares = [0] * size, [[] for _ in range(size)]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        rank = min((r for r in range(size) if len(shares[r]) < cap), key=lambda r: (tokens[r], r))
        shares[rank].append(i)
        tokens[rank] += lengths[i]
    return [sorted(share) for share in shares], -(-cap // microbatch)


def deal_groups(groups: Sequence[Sequence[int]], costs: Sequence[int], size: int,
                microbatch: int) -> tuple[list[list[int]], int]:
    """`deal` for the shared-prompt forward: whole groups (the items of one prompt, which share its forward) go to
    ranks, the costliest first (`costs`: the prompt's tokens once plus its items' own), each to the rank with the
    least cost so far. Passes: the fewest micro-batches of at most `microbatch` items that hold the largest share."""
    cost, shares = [0] * size, [[] for _ in range(size)]
    for g in sorted(range(len(groups)), key=lambda g: (-costs[g], g)):
        rank = min(range(size), key=lambda r: (cost[r], r))
        shares[rank].extend(groups[g])
        cost[rank] += costs[g]
    return [sorted(share) for share in shares], -(-max(len(share) for share in shares) // microbatch)
