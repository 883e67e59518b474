"""The execution sandbox's cost: MBPP+ reference programs graded per second, the per-program overhead against
running the same program alone in a fresh interpreter (the authors' runner starts one per program), and the share
of a training step of the embedded code task spent grading.

python -m dash_exp.bench sandbox [--repeats N] [hydra overrides, e.g. task.mbpp=DIR]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dash_exp.config import compose_config

# programs timed alone and in the sandbox, one at a time (every k-th fast reference)
SAMPLE = 40


def _alone(row: dict[str, Any]) -> float:
    """Seconds to run the reference with its tests as one script in a fresh interpreter (as the authors do)."""
    script = "\n".join([*row["test_imports"], row["code"], *row["test_list"], row["test"]])
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, f.name], capture_output=True, timeout=120)
    seconds = time.perf_counter() - start
    Path(f.name).unlink()
    if proc.returncode:
        raise RuntimeError(f"task {row['task_id']}: its reference fails alone: {proc.stderr[-300:]!r}")
    return seconds


def _grading_share(overrides: list[str], steps: int) -> dict[str, float]:
    """time/reward over time/step in a short DASH run of task=pycode (the step's own metrics)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "dash_exp.run", "task=pycode", f"steps={steps}", "eval_every=0", "logger=none",
               "task.eval_size=8", f"run_dir={run_dir}", *overrides]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "time/step" in r][1:]  # the first step pays the sandbox's start
    reward, step = sum(r["time/reward"] for r in train), sum(r["time/step"] for r in train)
    return {"pycode_steps": len(train), "pycode_step_s": step / len(train), "pycode_reward_s": reward / len(train),
            "pycode_grading_share": reward / step}


def run(overrides: list[str], repeats: int, steps: int = 10) -> dict[str, Any]:
    from dash_exp.sandbox import Job, Sandbox
    from dash_exp.tasks.code import CodeGrader
    from dash_exp.tasks.mbpp import load_mbpp, mbpp_problem

    cfg = compose_config(["task=mbpp", "run_dir=.", *overrides]).task
    train, test = load_mbpp(cfg.mbpp)
    rows = train + test
    problems = [mbpp_problem(r, 120.0) for r in rows]
    sandbox = Sandbox()
    grader = CodeGrader(sandbox)
    try:
        sandbox.run([Job("x = 1\n", "x", "inputs = []")])  # start the server outside the timing
        start = time.perf_counter()
        runs = sandbox.run([p.tests.job(p.solution) for p in problems])
        wall = time.perf_counter() - start
        passed = sum(grader.outcome(r, p.tests) == "pass" for r, p in zip(runs, problems, strict=True))
        fast = [i for i, r in enumerate(runs) if r.seconds < 1.0]
        start = time.perf_counter()
        sandbox.run([problems[i].tests.job(problems[i].solution) for i in fast])
        fast_wall = time.perf_counter() - start
        sample = fast[:: max(1, len(fast) // SAMPLE)][:SAMPLE]
        alone, boxed = [], []
        for i in sample:
            p = problems[i]
            alone.append(min(_alone(rows[i]) for _ in range(repeats)))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                sandbox.run([p.tests.job(p.solution)])
                times.append(time.perf_counter() - t)
            boxed.append(min(times))
    finally:
        grader.close()
    return {"bench": "sandbox", "workers": sandbox.workers, "isolation": sandbox.isolation,
            "mbpp_programs": len(problems), "mbpp_passed": passed, "mbpp_wall_s": wall,
            "mbpp_programs_per_s": len(problems) / wall,
            "fast_programs": len(fast), "fast_programs_per_s": len(fast) / fast_wall, "sample": len(sample),
            "alone_median_s": statistics.median(alone), "sandbox_median_s": statistics.median(boxed),
            "overhead_ratio": statistics.median(boxed) / statistics.median(alone),
            **_grading_share([], steps)}
