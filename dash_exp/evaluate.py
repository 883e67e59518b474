"""Held-out evaluation from the command line (the metrics themselves: dash_exp.evaluation):

    python -m dash_exp.evaluate task=math checkpoint=runs/<run dir> n=8 out=eval.json task.eval_size=100

`checkpoint` is a run dir (its latest checkpoint), a checkpoint dir (state.pt) or a model directory saved
with save_pretrained; without it the configured model itself is evaluated. `n` is samples per problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dash_exp.batching import TokenCache
from dash_exp.evaluation import evaluate
from dash_exp.rollout.base import SamplingParams


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(our key=value arguments: checkpoint, n, out), Hydra overrides."""
    ours, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("checkpoint", "n", "out"):
            ours[key] = value
        else:
            overrides.append(arg)
    return ours, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m dash_exp.evaluate [checkpoint=...] [n=...] [out=...] [hydra overrides]`."""
    from dash_exp.checkpoint import load_policy_weights
    from dash_exp.config import compose_config, resolved_inference_batch, resolved_threads
    from dash_exp.factory import build, seed_everything
    from dash_exp.tracking import MetricSink

    ours, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(ours.get("out", "eval.json"))
    n = int(ours.get("n", "1"))
    checkpoint = ours.get("checkpoint")
    if checkpoint and (Path(checkpoint) / "config.json").is_file():  # a save_pretrained directory
        overrides += ["model.source=hub", f"model.path_or_id={checkpoint}"]
    cfg = compose_config([f"eval_samples={n}", f"run_dir={out.parent.resolve()}", *overrides])
    seed_everything(cfg.seed, resolved_threads(cfg))
    parts = build(cfg, need_train=False)
    step = 0
    sampled = SamplingParams.from_config(cfg, n, evaluation=True)
    try:
        if checkpoint and not (Path(checkpoint) / "config.json").is_file():
            step = load_policy_weights(parts.policy, Path(checkpoint))
            parts.sampler.sync(parts.policy)
        metrics = evaluate(parts.sampler, TokenCache(parts.tokenizer), parts.task, sampled, cfg.seed,
                           max(resolved_inference_batch(cfg), n), cfg.task.eval_size)
    finally:
        parts.close()
    result = {"checkpoint": checkpoint, "step": step, "model": cfg.model.name, "task": cfg.task.name, "n": n,
              "eval_size": cfg.task.eval_size, "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if cfg.logger.name == "wandb":
        sink = MetricSink(out.parent, cfg.logger, f"eval-{cfg.model.name}-{cfg.task.name}", "eval", result,
                          filename=out.stem + ".metrics.jsonl")
        sink.log(step, metrics)
        sink.close(metrics)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
