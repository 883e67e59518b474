"""The embedded code task: write `f(x) = a*x + b` from two of its values, graded by running hidden tests.

Prompt (MBPP+'s shape: the problem and asserts inside triple quotes)::

    \"\"\"
    f(1) == 8 and f(2) == 11
    \"\"\"

Trace (what the base model is warmed up on, and RL samples): the slope and intercept worked out in comments, then
the code. The arithmetic is the model's to do; a slip propagates into a wrong program, and a character-level
model's slips also make syntax and name errors::

    ```python
    def f(x):
        # a = 11-8 = 3
        # b = 8-3*1 = 5
        return 3*x+5
    ```

Reference (the terse "human" solution SFT-H trains on): the same program without the worked comments. Hidden
tests: f at 8 points (negative, zero, beyond the given ones), compared by the grader with a*x + b.
"""

from __future__ import annotations

import random
from typing import Any

from dash_exp.tasks.base import Problem
from dash_exp.tasks.code import CodeTests

TEST_POINTS = (-3, 0, 1, 2, 3, 5, 10, 17)


def prompt_of(p: int, y1: int, y2: int) -> str:
    return f'"""\nf({p}) == {y1} and f({p + 1}) == {y2}\n"""\n'


def program(a: int, b: int, comments: list[str] = ()) -> str:
    lines = ["def f(x):", *(f"    # {c}" for c in comments), f"    return {a}*x+{b}"]
    return "```python\n" + "\n".join(lines) + "\n```"


def cot_trace(a: int, b: int, p: int, rng: random.Random | None = None, noise: float = 0.0,
              restate: float = 0.0) -> str:
    """The worked solution; with probability `noise` one of its two steps slips by a small amount (and the slip
    propagates), with probability `restate` each step is written twice."""
    y1, y2 = a * p + b, a * (p + 1) + b
    slip = rng.randrange(2) if rng is not None and rng.random() < noise else -1
    a_got = a + (rng.choice([-2, -1, 1, 2]) if slip == 0 else 0)
    b_got = y1 - a_got * p + (rng.choice([-2, -1, 1, 2]) if slip == 1 else 0)
    steps = [f"a = {y2}-{y1} = {a_got}", f"b = {y1}-{a_got}*{p} = {b_got}"]
    comments = []
    for step in steps:
        comments.append(step)
        if restate and rng is not None and rng.random() < restate:
            comments.append(step)
    return program(a_got, b_got, comments)


def tests_of(a: int, b: int, timeout_s: float) -> CodeTests:
    expected = [a * x + b for x in TEST_POINTS]
    return CodeTests(entry="f", inputs=f"inputs = {[[x] for x in TEST_POINTS]}",
                     check=f"EXPECTED = {expected}\n\ndef check(_outs):\n    assert _outs == EXPECTED\n",
                     timeout_s=timeout_s)


def _draw(rng: random.Random, cfg: Any) -> tuple[int, int, int]:
    """(a, b, p): slope in [1, max_slope], intercept in [0, max_value], first point p in [0, max_point]."""
    return rng.randint(1, cfg.max_slope), rng.randint(0, cfg.max_value), rng.randint(0, cfg.max_point)


def make_problem(rng: random.Random, cfg: Any) -> tuple[Problem, tuple[int, int, int]]:
    a, b, p = _draw(rng, cfg)
    problem = Problem(prompt=prompt_of(p, a * p + b, a * (p + 1) + b), answer=f"{a}*x+{b}", solution=program(a, b),
                      tests=tests_of(a, b, cfg.time_limit_s))
    return problem, (a, b, p)


def make_splits(cfg: Any) -> tuple[list[Problem], list[Problem]]:
    """Fixed train and held-out test splits (disjoint prompts) from cfg.seed."""
    rng = random.Random(f"pycode:{cfg.seed}")
    seen: set[str] = set()
    problems: list[Problem] = []
    limit = cfg.max_slope * (cfg.max_value + 1) * (cfg.max_point + 1)
    if cfg.n_train + cfg.n_test > limit:
        raise ValueError(f"task.n_train + task.n_test = {cfg.n_train + cfg.n_test}: only {limit} distinct pycode "
                         f"problems exist at max_slope={cfg.max_slope}, max_value={cfg.max_value}, "
                         f"max_point={cfg.max_point}")
    while len(problems) < cfg.n_train + cfg.n_test:
        problem, _ = make_problem(rng, cfg)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems[: cfg.n_train], problems[cfg.n_train:]


def warmup_examples(cfg: Any, n: int, noise: float, seed: int, restate: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, noisy worked program) pairs for building the base model; fresh draws, not the RL splits."""
    rng = random.Random(f"pycode-warmup:{seed}")
    out = []
    for _ in range(n):
        a, b, p = _draw(rng, cfg)
        out.append((prompt_of(p, a * p + b, a * (p + 1) + b), cot_trace(a, b, p, rng, noise, restate)))
    return out
