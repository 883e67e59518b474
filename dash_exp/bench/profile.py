"""Where a training step's time goes: torch.profiler over a few steps of the real trainer, by phase and by op.

The wall-clock of each phase (inference, reward, update, sync) next to the time its torch ops took; the rest
is Python and framework overhead (HF module code, the sampler loop, the grader).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dash_exp.bench import bench_trainer, components


def run(overrides: list[str], steps: int = 5, out: Path = Path("runs/bench")) -> dict[str, Any]:
    """Profile `steps` RL steps after one warm-up step; phase split, op time per phase, the top ops."""
    cfg, parts = components([f"run_dir={out / 'profile'}", *overrides])
    trainer = bench_trainer(cfg, parts, "profile")
    try:
        trainer.rl_step(1)  # warm-up
        trainer.timers.pop()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(2, steps + 2):
                trainer.rl_step(step)
        wall = {k.removeprefix("time/"): v / steps for k, v in trainer.timers.pop().items()}
    finally:
        trainer.sink.close()
        trainer.task.close()
    events = prof.key_averages()
    phases = {e.key.removeprefix("phase/"): e.cpu_time_total / 1e6 / steps
              for e in events if e.key.startswith("phase/")}
    ops = sorted((e for e in events if not e.key.startswith("phase/")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)
    op_total = sum(e.self_cpu_time_total for e in ops) / 1e6 / steps
    step_wall = sum(wall.values())
    return {
        "algorithm": cfg.algorithm.name, "steps": steps, "threads": torch.get_num_threads(),
        "wall_s_per_step": wall, "profiled_phase_s_per_step": phases,
        "op_s_per_step": op_total, "overhead_frac": max(0.0, 1 - op_total / step_wall) if step_wall else 0.0,
        "top_ops": [{"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps,
                     "share": e.self_cpu_time_total / 1e6 / steps / step_wall, "calls_per_step": e.count / steps}
                    for e in ops[:12]],
    }
