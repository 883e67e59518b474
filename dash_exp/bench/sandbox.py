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


def _mode(problems: list, isolation: str, sample_of, repeats: int) -> dict[str, Any]:
    """One isolation mode: every reference graded at once, the fast ones again, then `sample_of(fast)` one at a
    time (best of `repeats` each)."""
    from dash_exp.sandbox import Job, Sandbox
    from dash_exp.tasks.code import CodeGrader

    sandbox = Sandbox(isolation=isolation)
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
        sample = sample_of(fast)
        boxed = []
        for i in sample:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                sandbox.run([problems[i].tests.job(problems[i].solution)])
                times.append(time.perf_counter() - t)
            boxed.append(min(times))
    finally:
        grader.close()
    return {"isolation": sandbox.isolation, "program_ns": sandbox.info.get("program_ns", ""),
            "landlock": sandbox.info.get("landlock", 0), "workers": sandbox.workers,
            "mbpp_passed": passed, "mbpp_wall_s": wall, "mbpp_programs_per_s": len(problems) / wall,
            "fast_programs": len(fast), "fast_programs_per_s": len(fast) / fast_wall, "sample": sample,
            "sandbox_median_s": statistics.median(boxed)}


def run(overrides: list[str], repeats: int, steps: int = 10, isolation: str | None = None) -> dict[str, Any]:
    """Each isolation mode this machine offers (or the one given), side by side in one run; the fresh-interpreter
    baseline and the training step's grading share once."""
    from dash_exp.sandbox import available_isolations
    from dash_exp.tasks.mbpp import load_mbpp, mbpp_problem

    cfg = compose_config(["task=mbpp", "run_dir=.", *overrides]).task
    train, test = load_mbpp(cfg.mbpp)
    rows = train + test
    problems = [mbpp_problem(r, 120.0) for r in rows]
    chosen: dict[str, list[int]] = {}

    def sample_of(fast: list[int]) -> list[int]:  # the first mode's sample, for every mode
        if "sample" not in chosen:
            chosen["sample"] = fast[:: max(1, len(fast) // SAMPLE)][:SAMPLE]
        return chosen["sample"]

    modes = {m: _mode(problems, m, sample_of, repeats) for m in ([isolation] if isolation else
                                                                   available_isolations() or ["none"])}
    alone = statistics.median(min(_alone(rows[i]) for _ in range(repeats)) for i in chosen["sample"])
    for m in modes.values():
        m["sample"] = len(m["sample"])
        m["overhead_ratio"] = m["sandbox_median_s"] / alone
    return {"bench": "sandbox", "mbpp_programs": len(problems), "alone_median_s": alone, "modes": modes,
            **_grading_share([], steps)}
