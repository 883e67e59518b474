"""Entrypoint: compose config -> validate -> build task, policy, sampler -> train -> evaluate.

    python -m dash_exp.run algorithm=dash kl=off
    python -m dash_exp.run -m algorithm=grpo,dash kl=on,off steps=2

Heavy imports happen after validation, so a bad config fails in about a second, before any model loads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dash_exp.config import ConfigError, register_configs, resolved_sampler_dtype, resolved_threads, validate
from dash_exp.factory import Components, build, seed_everything

register_configs()


def run_name(cfg: Any) -> str:
    return f"{cfg.algorithm.name}-kl_{cfg.kl.name}-{cfg.model.name}"


# keys that do not change what a run computes: a rerun into the same run dir may change them freely
NOT_THE_RUN = ("logger.", "resume", "run_dir", "save_every", "keep_checkpoints", "keep_final_checkpoint")
# what tune=auto sets from its measurement (saved in the run's config.yaml, not in the command)
TUNED = ("train_microbatch", "inference_batch")


def config_changes(stored: dict[str, Any], cfg: DictConfig) -> list[str]:
    """The keys on which this config differs from the one a run dir's config.yaml holds, as 'key: old -> new',
    leaving out what does not change the run (NOT_THE_RUN), under tune=auto what tuning set, and a knob added to
    the schema since the run was made that holds its default (a new knob's default keeps the old behaviour: a
    sweep begun before it was added still resumes)."""
    from dash_exp.config import Config
    from dash_exp.mappings import flatten

    ignored = NOT_THE_RUN + (TUNED if cfg.tune == "auto" else ())
    old, new = flatten(stored), flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    schema = schema_defaults(Config) if new.keys() - old.keys() else {}
    added = {key for key in new.keys() - old.keys() if key in schema and new[key] == schema[key]}
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in added
            and not any(key == i or key.startswith(i) for i in ignored)]


def schema_defaults(schema: type, prefix: str = "") -> dict[str, Any]:
    """{flat key: default} of a structured config, into its groups (whose own field is MISSING at the top)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_defaults(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f"{prefix}{f.name}"] = default
    return out


# keys a run may be continued under (the learning rate is constant: more steps change nothing already done)
EXTENDS = ("steps", "epochs", "time_budget_s")


def finished_run(run_dir: Path, cfg: DictConfig, say: bool = True) -> dict[str, Any] | None:
    """resume=auto: the summary of the run this dir already holds when it finished with this config (it is not run
    again: a rerun sweep skips its finished jobs), else None (start, or resume from the latest checkpoint).
    - A finished run under another config is a ConfigError naming the keys, before anything is built: skipping
      it or continuing it would mix two experiments. Only its length (EXTENDS: steps, epochs, time_budget_s) may
      change: it then continues from its final checkpoint.
    - An unfinished run resumes from its checkpoint whatever changed (another layout of ranks, a generator that
      died): the keys that changed are printed (where `say`: rank 0 of a launch).
    resume=never starts over whatever the dir holds."""
    import yaml

    from dash_exp.checkpoint import latest_checkpoint

    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    ckpt = latest_checkpoint(run_dir)
    if cfg.resume != "auto" or not config.is_file() or not (summary.is_file() or ckpt):
        return None
    changes = config_changes(yaml.safe_load(config.read_text()) or {}, cfg)
    if not summary.is_file():
        if changes and say:
            print(f"{run_dir}: resuming {ckpt.name} under a changed config: {'; '.join(changes)}", flush=True)
        return None
    other = [c for c in changes if c.split(":")[0] not in EXTENDS]
    if other or (changes and ckpt is None):
        shown = "; ".join(other[:5]) + (f"; and {len(other) - 5} more" if len(other) > 5 else "")
        why = f"another config ({shown})" if other else f"no checkpoint to continue from ({'; '.join(changes)})"
        raise ConfigError(f"{run_dir} holds a finished run with {why}: pass resume=never to move it to previous/ "
                          "and start over, or choose another run dir (hydra.run.dir / hydra.sweep.dir)")
    return None if changes else json.loads(summary.read_text())


def prepare_run_dir(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from (resume=auto), with metrics.jsonl cut back to it; resume=never moves a
    previous run's checkpoints, metrics and summary to previous/<time>/ (nothing is deleted) and starts over.
    Either way an earlier attempt's error.txt goes to previous/<time>/ (this attempt may succeed)."""
    from dash_exp.checkpoint import checkpoint_dir, latest_checkpoint, read_meta
    from dash_exp.tracking import truncate_metrics

    archive(run_dir, [run_dir / ERROR_FILE])
    metrics = run_dir / "metrics.jsonl"
    if resume == "auto":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            truncate_metrics(metrics, read_meta(ckpt)["step"])
        return ckpt
    archive(run_dir, [checkpoint_dir(run_dir), metrics, run_dir / "summary.json"])
    return None


def drop_checkpoints(run_dir: Path) -> None:
    """keep_final_checkpoint=false: delete a finished run's checkpoints (after its summary.json is written, so a
    run killed before then still resumes from them)."""
    import shutil

    from dash_exp.checkpoint import checkpoint_dir

    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)


def archive(run_dir: Path, paths: list[Path]) -> None:
    """Move those of `paths` that exist into run_dir/previous/<time>/."""
    import time

    old = [p for p in paths if p.exists()]
    if old:
        to = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
        to.mkdir(parents=True, exist_ok=True)
        for p in old:
            p.rename(to / p.name)


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run, end to end; returns the summary also written to run_dir/summary.json."""
    from dash_exp.checkpoint import read_meta
    from dash_exp.distributed import all_gather, check_world, init, split_roles, world_from_env
    from dash_exp.tracking import MetricSink, NullSink
    from dash_exp.trainer import Trainer

    # torchrun (or SLURM) may start several ranks: rank 0 alone writes the run dir and logs
    launch = world_from_env()
    check_world(cfg, launch)
    device = init(launch)
    # each rank's Hydra picked its own time-stamped output dir: rank 0's is the run's
    run_dir = Path(all_gather(str(cfg.run_dir), launch)[0])
    cfg.run_dir = str(run_dir)
    done = finished_run(run_dir, cfg, launch.main)  # every rank reads the same files: they all skip, or none does
    if done is not None:
        if launch.main:
            print(f"{run_dir}: finished before with this config: skipped (its summary.json stands; resume=never "
                  "runs it again)", flush=True)
        return done
    seed_everything(cfg.seed, resolved_threads(cfg))
    # overlapped rollout: the last rollout.generator_ranks ranks generate, the others train in their own world
    roles = split_roles(launch, cfg.rollout.generator_ranks)
    if roles.generator:
        generate_only(cfg, roles, device)
        return {}
    world = roles.world
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    parts = build(cfg, world=world, device=device, role="trainer" if roles.link is not None else None)
    ckpt = all_gather(prepare_run_dir(run_dir, cfg.resume) if world.main else None, world)[0]
    tuned = auto_tune(cfg, parts, run_dir, reuse=ckpt is not None) if cfg.tune == "auto" else None
    if tuned is not None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resumed_from = read_meta(ckpt).get("wandb_id") if ckpt else None
    config = OmegaConf.to_container(cfg, resolve=True)
    sink = (MetricSink(run_dir, cfg.logger, run_name(cfg), run_name(cfg), config, resumed_from)  # type: ignore[arg-type]
            if world.main else NullSink())
    if tuned is not None and ckpt is None:
        sink.log(0, tuned.metrics())
    if cfg.max_prompt_tokens is not None and ckpt is None:
        sink.log(0, {"data/train_prompts": len(parts.task.train), "data/dropped_prompts": parts.dropped_prompts})
    generators = None
    if roles.link is not None:
        from dash_exp.batching import COMPUTE_DTYPES
        from dash_exp.overlap import GeneratorLink

        generators = GeneratorLink(roles.link, world, COMPUTE_DTYPES[resolved_sampler_dtype(cfg)], device)
        if world.main:
            print(f"overlapped rollout: trainer ranks 0-{world.size - 1}, generator ranks {roles.link.generators[0]}-"
                  f"{roles.link.generators[-1]}, staleness bound {cfg.rollout.overlap}", flush=True)
            stop_with_one_line_on_sigterm(generators)
    try:
        trainer = Trainer(cfg, parts.policy, parts.tokenizer, parts.sampler, parts.task, sink, run_dir,
                          ref=parts.ref, sft_items=parts.sft_items, world=world, generators=generators)
        summary = {"run": run_name(cfg), "run_dir": str(run_dir), "world_size": world.size,
                   "model_dir": Path(parts.model_path).name, **trainer.fit(ckpt)}
        # when it finished (Unix seconds), in the file: a copy of the run (committed results, a fresh clone) keeps it
        summary["finished_at"] = round(time.time(), 3)
    finally:
        parts.close()
    sink.close(summary["final"])
    if world.main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if not cfg.keep_final_checkpoint:
            drop_checkpoints(run_dir)
        report(summary, next(iter(parts.task.evals)))
    return summary


def stop_with_one_line_on_sigterm(generators: Any) -> None:
    """torchrun stops every rank with SIGTERM when one fails: the trainer then ends with one line naming the
    generator that died (a GeneratorError), not with the default silent termination."""
    import signal

    from dash_exp.overlap import GeneratorError

    def stop(signum: int, frame: Any) -> None:
        raise GeneratorError(generators.why_stopped())

    signal.signal(signal.SIGTERM, stop)


def generate_only(cfg: DictConfig, roles: Any, device: Any) -> None:
    """A generator rank of an overlapped run: build its sampler, generate what the trainers ask for, shut the
    engine down (it leaves the launch's process group alone: the rank joined it before the engine started), then
    wait for the trainers to end in `main` (distributed.leave)."""
    from dash_exp.batching import COMPUTE_DTYPES, TokenCache
    from dash_exp.overlap import generate

    parts = build(cfg, device=device, role="generator")
    dtype = COMPUTE_DTYPES[resolved_sampler_dtype(cfg)]
    try:  # the policy copy holds what the trainers send: weights in the sampler's dtype
        generate(cfg, roles.world, roles.link, parts.task, TokenCache(parts.tokenizer), parts.policy.to(dtype),
                 parts.sampler, dtype, device)
    finally:
        parts.close()


def auto_tune(cfg: DictConfig, parts: Components, run_dir: Path, reuse: bool) -> Any:
    """tune=auto: probe (or, when resuming, reuse run_dir/tune.json), apply to cfg, print; the TuneResult."""
    from dash_exp.tune import TuneResult, tune

    tuned = TuneResult.load(run_dir) if reuse else None
    if tuned is None:
        prompts = [parts.tokenizer.encode(p.prompt, add_special_tokens=False) for p in parts.task.train[:1000]]
        tuned = tune(cfg, parts.policy, parts.ref, parts.sampler, prompts, parts.tokenizer.pad_token_id)
        tuned.save(run_dir)
    print(tuned.describe(), flush=True)
    apply_tuning(cfg, tuned)  # what it applies, where that differs from the measurement, is said after
    return tuned


def apply_tuning(cfg: DictConfig, tuned: Any) -> None:
    """Set the measured batch sizes where they are knobs, never where they define the algorithm, then validate:
    - train_microbatch takes the measured one;
    - an inference_batch tied to it (GRPO: ${train_microbatch}, one micro-batch sampled then backpropagated)
      follows it, rounded down to whole groups; where less than one group fits, GRPO samples one group per call
      (inference_batch = group_size) and backprops it in the measured micro-batches (the same gradient);
    - inference_batch null (DASH, PPO: preemptive sampling, the whole step batch in one call) stays null;
    - an explicit inference_batch takes the measured generation knee."""
    micro = tuned.train_microbatch
    if OmegaConf.is_interpolation(cfg, "inference_batch"):
        if micro < cfg.group_size:  # never a micro-batch above what fits
            cfg.inference_batch = cfg.group_size
            print(f"tune=auto: inference_batch={cfg.group_size} (one group per call: fewer than a group of "
                  f"{cfg.group_size} fits a micro-batch of {micro})", flush=True)
        elif micro % cfg.group_size:
            micro -= micro % cfg.group_size
            print(f"tune=auto: train_microbatch={micro} (the measured {tuned.train_microbatch} rounded down to whole "
                  f"groups of {cfg.group_size}: inference_batch follows it)", flush=True)
    elif cfg.inference_batch is not None:
        cfg.inference_batch = tuned.inference_batch
    else:
        print("tune=auto: inference_batch stays null (preemptive sampling: the whole step batch in one call); the "
              "measured knee applies to an explicit inference_batch", flush=True)
    cfg.train_microbatch = micro
    validate(cfg)


def report(summary: dict[str, Any], eval_set: str) -> None:
    """Print start -> end held-out accuracy on the main evaluation set."""
    first, last = summary["initial"], summary["final"]
    for label, key in (("greedy", f"eval/{eval_set}/accuracy"), ("sampled", f"eval/{eval_set}/sampled_accuracy")):
        delta = 100 * (last[key] - first[key])
        print(f"held-out {label} accuracy: {first[key]:.3f} -> {last[key]:.3f} ({delta:+.1f} points)")
    print(f"run dir: {summary['run_dir']}  ({summary['time/elapsed']:.0f} s of training)")


ERROR_FILE = "error.txt"


def record_failure(run_dir: Path, exc: BaseException) -> Path:
    """Write the exception and its traceback into the run dir."""
    import traceback

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ERROR_FILE
    path.write_text("".join(traceback.format_exception(exc)))
    return path


class FailedJobsReport(Callback):
    """Hydra callback: after a multirun, list the jobs that failed and exit non-zero if any did."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{ERROR_FILE}"))
        if failed:
            lines = "\n".join(f"  {p.parent}: {p.read_text().strip().splitlines()[-1]}" for p in failed)
            print(f"{len(failed)} job(s) of the sweep failed:\n{lines}", file=sys.stderr)
            sys.exit(1)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        validate(cfg)
        train(cfg)
        from dash_exp.distributed import leave

        leave()  # every rank of the launch together (inside the try: a failure there is reported as any other)
    except Exception as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # one failed job must not stop the sweep: the error is in its run dir; FailedJobsReport sums up
            path = record_failure(Path(cfg.run_dir), exc)
            print(f"job failed: {type(exc).__name__}: {exc} (traceback in {path}); the sweep goes on", file=sys.stderr)
            return
        from dash_exp.tasks.math import DataError

        if isinstance(exc, ConfigError | DataError):  # bad input: one line, no traceback
            print(f"{'data' if isinstance(exc, DataError) else 'config'} error: {exc}", file=sys.stderr)
            sys.exit(2)
        record_failure(Path(cfg.run_dir), exc)
        from dash_exp.overlap import GeneratorError
        from dash_exp.trainer import NonFiniteError

        if isinstance(exc, NonFiniteError | GeneratorError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        from dash_exp.distributed import leave

        leave(together=False)  # after a failure at once: the other ranks may never come (a no-op once left)


if __name__ == "__main__":
    main()
