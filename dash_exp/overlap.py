"""Overlapped rollout (rollout.generator_ranks > 0): generator ranks sample the next steps while trainer ranks
backprop this one.

One torchrun launch, split by `distributed.split_roles`: the first ranks train (FSDP2 over their own group when
there are several), the last `rollout.generator_ranks` ranks generate, each with its own sampler. Step t's prompts
(the same stream and per-prompt seeds as the synchronous loop) are shared out between the generators in whole
groups; each samples its share with the newest weights it holds, grades it and sends it to trainer rank 0 with the
weights' version and the behaviour log-probs (`StepBatch`). After every optimizer step the trainers publish the new
weights (version = RL steps done) to every generator.

Staleness bound k = rollout.overlap: step t is generated from a version >= t - 1 - k (t - 1 is what the synchronous
loop would use); k = 0 makes the generators wait for every version (separate processes, no overlap, exactly the
synchronous samples). A sample from an older version is corrected in the loss against its behaviour log-probs,
with the ratio truncated at rollout.ratio_cap (algorithms.losses).

Channels (trainer rank 0 <-> each generator, torch.distributed point to point, one process group each):
  weights  a header [version, stop] then every tensor in state-dict order, in the sampler's dtype (NCCL on GPU,
           gloo on CPU)
  samples  pickled objects (gloo): the start message out; StepBatch objects in, None ending a generator's stream
A generator's receiver thread takes every version as it arrives and its sender thread sends batches as they are
made, so a trainer never waits on a busy generator, and a generator waits only for a version the trainers will
send (or for stop): no cycle of waits, hence no deadlock. Stop: the trainers send a stop header, then read what
each generator still sends up to its None.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dash_exp.config import resolved_inference_batch
from dash_exp.distributed import Link, World, full_weights
from dash_exp.evaluation import generate_in_chunks
from dash_exp.reward import GradeResult
from dash_exp.rollout.base import Rollout, Sampler, SamplingParams, mix32
from dash_exp.tasks.base import ProblemStream


@dataclass
class StepBatch:
    """One generator's share of one step: its rollouts, graded, and where they came from."""

    step: int
    # the weights' version that generated them (RL steps done when they were published)
    version: int
    rollouts: list[Rollout]
    graded: GradeResult
    # seconds the generator spent generating, and waiting for weights recent enough before that
    gen_time: float
    idle_time: float


class GeneratorError(RuntimeError):
    """A generator rank stopped answering (its process died or its channel broke)."""


def _send(obj: Any, dst: int, group: Any) -> None:
    torch.distributed.send_object_list([obj], dst=dst, group=group)


def _recv(src: int, group: Any) -> Any:
    box: list[Any] = [None]
    torch.distributed.recv_object_list(box, src=src, group=group)
    return box[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a dead child of the same launcher stays a zombie until torchrun reaps it
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _header(version: int, stop: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor([version, int(stop)], dtype=torch.int64, device=device)


# ------------------------------------------------------------------ trainer side
class GeneratorLink:
    """The trainers' end: start the generators, receive each step's batches, publish weights, stop."""

    def __init__(self, link: Link, world: World, dtype: torch.dtype, device: torch.device) -> None:
        self.link, self.world, self.dtype = link, world, dtype
        # weights travel on the device: NCCL's on a GPU, gloo's on the CPU (the default group's backend)
        self.device = device
        self.stopped = False
        # each generator's (host, pid), told at start: to name one that dies
        self.processes: dict[int, tuple[str, int]] = {}

    def start(self, step: int, steps: int, stream: dict[str, Any], policy: torch.nn.Module) -> None:
        """Tell the generators where the run stands (after a resume too), learn their processes, and publish the
        weights they start from."""
        if self.world.main:
            for g in self.link.generators:
                _send({"step": step, "steps": steps, "stream": stream}, g, self.link.samples)
            self.processes = {g: _recv(g, self.link.samples) for g in self.link.generators}
        self.publish(policy, step)

    def why_stopped(self) -> str:
        """One line on why the run is being stopped from outside (torchrun stops every rank when one fails): the
        generators whose process is gone, where they ran on this host."""
        host = socket.gethostname()
        dead = [f"generator rank {g} (pid {pid})" for g, (where, pid) in self.processes.items()
                if where == host and not _alive(pid)]
        if dead:
            return f"{', '.join(dead)} died; the launcher stopped the run (resume it with the same command)"
        return "the launcher stopped the run (SIGTERM): one of its ranks failed (see its report)"

    def receive(self, step: int) -> list[StepBatch]:
        """Every generator's batch of `step` (generator order), on every trainer rank."""
        batches: list[Any] = [None]
        if self.world.main:
            batches = [[self._receive_from(g, step) for g in self.link.generators]]
        if self.world.parallel:
            torch.distributed.broadcast_object_list(batches, src=0, group=self.world.group)
        return batches[0]

    def _receive_from(self, rank: int, step: int) -> StepBatch:
        try:
            batch = _recv(rank, self.link.samples)
        except RuntimeError as exc:
            raise GeneratorError(f"generator rank {rank} stopped answering before sending step {step} "
                                 f"({str(exc).strip().splitlines()[0]})") from exc
        if not isinstance(batch, StepBatch) or batch.step != step:
            raise GeneratorError(f"generator rank {rank} sent {batch!r:.80} where step {step}'s batch was due")
        return batch

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Send the policy's weights as `version` to every generator, one whole tensor at a time (gathered: a
        collective over the trainers when the policy is sharded; rank 0 sends). Blocks only until each generator's
        receiver thread takes them."""
        if self.world.main:
            for g in self.link.generators:
                torch.distributed.send(_header(version, False, self.device), g, group=self.link.weights)
        for _, tensor in full_weights(policy, self.dtype):
            if self.world.main:
                tensor = tensor.to(self.device).contiguous()
                for g in self.link.generators:
                    torch.distributed.send(tensor, g, group=self.link.weights)

    def stop(self) -> None:
        """Stop the generators and read what each still sends, up to its end-of-stream None (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        if not self.world.main:
            return
        for g in self.link.generators:
            torch.distributed.send(_header(-1, True, self.device), g, group=self.link.weights)
        for g in self.link.generators:
            while _recv(g, self.link.samples) is not None:
                pass


# ------------------------------------------------------------------ generator side
class WeightInbox:
    """A generator's receiver thread: takes every version the trainers send as it arrives and keeps the newest."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, link: Link, device: torch.device) -> None:
        self.model, self.dtype, self.link = model, dtype, link
        self.device = device
        self.numels = [t.numel() for t in model.state_dict().values()]
        self.cond = threading.Condition()
        self.newest: tuple[int, torch.Tensor] | None = None
        self.loaded = -1
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="weight-inbox", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            while True:
                header = _header(0, False, self.device)
                torch.distributed.recv(header, 0, group=self.link.weights)
                version, stop = header.tolist()
                flat = None
                if not stop:  # the tensors in state-dict order, into one buffer (the model keeps generating)
                    flat = torch.empty(sum(self.numels), dtype=self.dtype, device=self.device)
                    for part in flat.split(self.numels):
                        torch.distributed.recv(part, 0, group=self.link.weights)
                with self.cond:
                    if flat is not None:
                        self.newest = (version, flat)
                    self.stopped = bool(stop)
                    self.cond.notify_all()
                if stop:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def wait_for(self, version: int) -> float:
        """Block until a version >= `version` has arrived (or stop); the seconds waited."""
        start = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.error is not None or self.loaded >= version
                               or (self.newest is not None and self.newest[0] >= version))
            if self.error is not None:
                raise GeneratorError(f"the trainers' weights stopped arriving: {self.error}") from self.error
        return time.perf_counter() - start

    def load_newest(self) -> int:
        """Copy the newest arrived version into the model if it is newer than the loaded one; the loaded version."""
        with self.cond:
            newest, self.newest = self.newest, None
        if newest is not None and newest[0] > self.loaded:
            version, flat = newest
            with torch.no_grad():
                for tensor, part in zip(self.model.state_dict().values(), flat.split(self.numels), strict=True):
                    tensor.copy_(part.view_as(tensor))
            self.loaded = version
        return self.loaded

    def wait_stop(self) -> None:
        self.thread.join()


class BatchOutbox:
    """A generator's sender thread: sends its batches to trainer rank 0 in order, then None."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.queue: queue.Queue[StepBatch | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="batch-outbox", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            _send(batch, 0, self.link.samples)
            if batch is None:
                return

    def put(self, batch: StepBatch) -> None:
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


def generate(cfg: Any, world: World, link: Link, task: Any, tokens: Any, model: torch.nn.Module,
             sampler: Sampler, dtype: torch.dtype, device: torch.device) -> int:
    """A generator rank's whole life: the steps the trainers ask for, each from weights at most rollout.overlap
    versions stale, then wait for stop. Returns the number of batches sent."""
    start = _recv(0, link.samples)
    _send((socket.gethostname(), os.getpid()), 0, link.samples)  # for the trainers' report, should this process die
    stream = ProblemStream(task.train, seed=cfg.seed)
    stream.load_state_dict(start["stream"])
    inbox, outbox = WeightInbox(model, dtype, link, device), BatchOutbox(link)
    sampling = SamplingParams.from_config(cfg, cfg.group_size)
    sent = 0
    try:
        for step in range(start["step"] + 1, start["steps"] + 1):
            problems = stream.next(cfg.prompts_per_step)
            # the version the run starts from, at least; then at most `overlap` versions behind step - 1
            idle = inbox.wait_for(max(start["step"], step - 1 - cfg.rollout.overlap))
            if inbox.stopped:
                break
            loaded, version = inbox.loaded, inbox.load_newest()
            if version != loaded:
                sampler.sync(model)
            share = world.shares(len(problems))
            prompts = [tokens(p.prompt) for p in problems[share]]
            seeds = [mix32(cfg.seed, step, i) for i in range(len(problems))][share]
            begin = time.perf_counter()
            rollouts = generate_in_chunks(sampler, prompts, sampling, seeds, resolved_inference_batch(cfg))
            gen_time = time.perf_counter() - begin
            texts = [tokens.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
            graded = task.score(texts, [p for p in problems[share] for _ in range(cfg.group_size)])
            outbox.put(StepBatch(step, version, rollouts, graded, gen_time, idle))
            sent += 1
        inbox.wait_stop()
    finally:
        outbox.close()
    return sent

