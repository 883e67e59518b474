"""One metric sink for every run: run_dir/metrics.jsonl always, Weights & Biases when configured."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new peak-memory window (Linux: reset VmHWM; CUDA: reset the allocator's peak), so each run
    of a multirun, which shares one process, reports its own peak."""
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, float]:
    """`mem/peak_mb`: peak resident memory since the last reset (VmHWM; ru_maxrss where /proc is absent);
    `mem/cuda_peak_mb` on a GPU: peak memory allocated by torch."""
    try:
        hwm_kb = _status_kb("VmHWM:")
    except (OSError, StopIteration):
        hwm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"mem/peak_mb": hwm_kb / 1024}
    import torch

    if torch.cuda.is_available():
        out["mem/cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_allocated_bytes(fn: Callable[[], Any], device: Any) -> int:
    """Peak bytes of tensors allocated while fn() runs, above what was allocated before: the CUDA allocator's
    statistics, or on CPU the profiler's allocation and free events summed in time order (the process's RSS
    hides the allocator's reuse of freed memory)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def release_cuda_memory() -> None:
    """Collect garbage (reference cycles), then hand the CUDA allocator's cached blocks back to the driver."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _status_kb(field: str, path: Path = _STATUS) -> int:
    return next(int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith(field))


def memory_available_mb() -> float:
    """Memory the system can still give without swapping (MemAvailable)."""
    return _status_kb("MemAvailable:", Path("/proc/meminfo")) / 1024


class Timers:
    """Named wall-clock accumulators: `with timers("inference"): ...` then `timers.pop()`. Each phase is also
    a labelled range in torch.profiler traces (`python -m dash_exp.bench profile`)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        import torch

        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase/{name}"):
                yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """`time/<name>` seconds since the last pop, and reset."""
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out


def wandb_mode(requested: str) -> str:
    """online only with credentials; otherwise offline (one warning)."""
    if requested == "online" and not os.environ.get("WANDB_API_KEY"):
        warnings.warn("logger.mode=online but WANDB_API_KEY is not set: logging to W&B offline", stacklevel=2)
        return "offline"
    return requested


class NullSink:
    """The sink of a data-parallel rank other than 0 (rank 0 logs for the whole job)."""

    wandb_id = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Rank 0 logs."""

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Nothing to close."""


class MetricSink:
    """Writes each step's metrics as one JSON line (flushed) and, if enabled, to a W&B run.

    Resuming (`resumed_from`: the W&B id of the killed attempt): `metrics.jsonl` has been cut back to the
    checkpoint, and W&B's history must say the same. W&B ignores a resumed run's log calls for steps below the
    steps it has already seen, and its rewind (`resume_from="<id>?_step=<k>"`) is a private preview of the hosted
    service that offline runs cannot use. So every attempt is a W&B run of its own: the resumed one logs the kept
    rows of `metrics.jsonl` again, then its own, and its history is exactly `metrics.jsonl`; it carries
    `resumed_from` in its config and the tag `resumed`. The killed attempt is set aside: offline, its run files
    move to `wandb/superseded/` (so `wandb sync` of the run dir's offline runs skips it); online, it is tagged
    `superseded` (best effort; `analysis.runs.load_wandb` skips such runs)."""

    def __init__(self, run_dir: Path, logger_cfg: Any, run_name: str, group: str, config: dict[str, Any],
                 resumed_from: str | None = None, filename: str = "metrics.jsonl") -> None:
        self.path = run_dir / filename
        self.file = self.path.open("a")
        self.wandb_run = None
        mode = wandb_mode(logger_cfg.mode) if logger_cfg.name == "wandb" else "disabled"
        if mode != "disabled":
            if resumed_from:
                supersede_wandb_run(run_dir, logger_cfg, mode, resumed_from)
                config = {**config, "resumed_from": resumed_from}
            self.wandb_run = self._init_wandb(run_dir, logger_cfg, mode, run_name, group, config,
                                              ["resumed"] if resumed_from else [])
            if self.wandb_run is not None and resumed_from:
                self._replay()

    def _replay(self) -> None:
        """The kept rows of `metrics.jsonl` into the new W&B run, in order (same-step rows merge into one)."""
        self.file.flush()
        for line in self.path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                step = row.pop("step")
                self._wandb_log({k: v for k, v in row.items() if v is not None}, step)

    @staticmethod
    def _init_wandb(run_dir, logger_cfg, mode, run_name, group, config, extra_tags):
        try:
            import wandb

            return wandb.init(
                project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group or group,
                tags=[*logger_cfg.tags, *extra_tags], name=run_name, config=config, dir=str(run_dir), mode=mode,
                settings=wandb.Settings(console="off", quiet=True, init_timeout=logger_cfg.init_timeout),
            )
        except Exception as exc:  # W&B is optional: metrics.jsonl still has everything
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(f"W&B disabled for this run ({type(exc).__name__}: {reason}); metrics go to "
                          f"{run_dir / 'metrics.jsonl'} only", stacklevel=2)
            return None

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self._wandb_log(metrics, step)

    def _wandb_log(self, metrics: dict[str, Any], step: int) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as exc:  # a W&B failure mid-run must not stop training
                warnings.warn(f"W&B logging failed ({type(exc).__name__}); continuing with metrics.jsonl only",
                              stacklevel=3)
                self.wandb_run = None

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.file.close()
        if self.wandb_run is not None:
            try:
                if summary:
                    self.wandb_run.summary.update(summary)
                self.wandb_run.finish()
            except Exception as exc:
                warnings.warn(f"W&B finish failed ({type(exc).__name__}); metrics.jsonl is complete", stacklevel=2)


def supersede_wandb_run(run_dir: Path, logger_cfg: Any, mode: str, run_id: str) -> None:
    """Set every earlier attempt's W&B run aside (see MetricSink): the checkpoint's (`run_id`) and any later one
    killed before its first checkpoint (found by its files under wandb/). Offline, their run files move to
    wandb/superseded/; online, they get the tag `superseded` (one warning if the API cannot be reached)."""
    wandb_dir = run_dir / "wandb"
    earlier = sorted(wandb_dir.glob("offline-run-*")) + sorted(wandb_dir.glob("run-*"))
    ids = {run_id} | {d.name.rsplit("-", 1)[-1] for d in earlier if d.is_dir()}
    for old in earlier:
        if old.name.startswith("offline-run-") and old.is_dir():
            (wandb_dir / "superseded").mkdir(exist_ok=True)
            os.replace(old, wandb_dir / "superseded" / old.name)
    if mode != "online":
        return
    try:
        import wandb

        api = wandb.Api(timeout=logger_cfg.init_timeout)
        for old_id in sorted(ids):
            run = api.run(f"{logger_cfg.entity or api.default_entity}/{logger_cfg.project}/{old_id}")
            if "superseded" not in run.tags:
                run.tags = [*run.tags, "superseded"]
                run.update()
    except Exception as exc:
        warnings.warn(f"W&B: could not tag the earlier attempts {sorted(ids)} as superseded ({type(exc).__name__}); "
                      "the resumed run carries the full history (config resumed_from)", stacklevel=3)


def _jsonable(value: Any) -> Any:
    value = float(value) if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows a resume from `step` will not write again: every row before `step`, and the training
    row of `step` itself (a later row at `step`, such as the final evaluation of a shorter run, goes)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] < step or (r["step"] == step and "time/step" in r)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
