"""Procedural multi-step arithmetic: chains of + and - with step-by-step solutions ending in \\boxed{}.

Prompt:    ``37+25-18=?\\n``
CoT trace: ``37+25=62\\n62-18=44\\n\\boxed{44}``  (what the base model is warmed up on, and RL samples)
           ``37+25=62\\n37+25=62\\n62-18=44\\n\\boxed{44}``  (the same with its first step restated: longer)
Reference: ``\\boxed{44}``                     (terse "human" solution used by SFT-H)
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

from dash_exp.config import ConfigError
from dash_exp.tasks.base import Problem


def _chain(rng: random.Random, n_terms: int, max_value: int) -> tuple[list[int], list[str]]:
    """Numbers and operators of one chain whose running value never goes negative."""
    numbers, ops = [rng.randint(0, max_value)], []
    value = numbers[0]
    for _ in range(n_terms - 1):
        b = rng.randint(0, max_value)
        op = "-" if b <= value and rng.random() < 0.5 else "+"
        value = value - b if op == "-" else value + b
        numbers.append(b)
        ops.append(op)
    return numbers, ops


def prompt_of(numbers: list[int], ops: list[str]) -> str:
    expr = str(numbers[0]) + "".join(f"{op}{b}" for op, b in zip(ops, numbers[1:], strict=True))
    return f"{expr}=?\n"


def chain_value(numbers: list[int], ops: list[str]) -> int:
    value = numbers[0]
    for op, b in zip(ops, numbers[1:], strict=True):
        value = value - b if op == "-" else value + b
    return value


def cot_trace(numbers: list[int], ops: list[str], rng: random.Random | None = None, noise: float = 0.0,
              restate: float = 0.0) -> str:
    """Step-by-step solution. With probability `noise` one step carries a small slip that propagates (a slip
    below 0 is clamped to 0, so a step whose true result is 0 may keep it). With probability `restate` each step
    is restated once as written (a slip included) before moving on, so traces of one problem differ in length
    and nothing in the trace says whether restating pays."""
    slip_at = rng.randrange(len(ops)) if rng is not None and rng.random() < noise else -1
    value, lines = numbers[0], []
    for i, (op, b) in enumerate(zip(ops, numbers[1:], strict=True)):
        result = value - b if op == "-" else value + b
        if i == slip_at:
            result = max(0, result + rng.choice([-10, -2, -1, 1, 2, 10]))
        lines.append(f"{value}{op}{b}={result}")
        if restate and rng is not None and rng.random() < restate:
            lines.append(lines[-1])
        value = result
    return "\n".join(lines) + f"\n\\boxed{{{value}}}"


def make_problem(rng: random.Random, cfg: Any) -> tuple[Problem, list[int], list[str]]:
    numbers, ops = _chain(rng, rng.randint(cfg.min_terms, cfg.max_terms), cfg.max_value)
    answer = str(chain_value(numbers, ops))
    problem = Problem(prompt=prompt_of(numbers, ops), answer=answer, solution=f"\\boxed{{{answer}}}",
                      worked=cot_trace(numbers, ops))
    return problem, numbers, ops


def make_splits(cfg: Any) -> tuple[list[Problem], list[Problem]]:
    """Fixed train and held-out test splits (disjoint prompts) from cfg.seed."""
    rng = random.Random(f"arith:{cfg.seed}")
    # the bounds read once (an OmegaConf node resolves every attribute access: 100x slower per draw)
    bounds = SimpleNamespace(min_terms=cfg.min_terms, max_terms=cfg.max_terms, max_value=cfg.max_value)
    seen: set[str] = set()
    problems: list[Problem] = []
    wanted, draws = cfg.n_train + cfg.n_test, 0
    while len(problems) < wanted:
        if draws == 100 * wanted:
            raise ConfigError(f"task.n_train + task.n_test = {wanted}: only {len(problems)} distinct chains of "
                             f"{cfg.min_terms}-{cfg.max_terms} numbers up to {cfg.max_value} were drawn; ask for "
                             "fewer problems or raise task.max_terms / task.max_value")
        draws += 1
        problem, _, _ = make_problem(rng, bounds)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems[: cfg.n_train], problems[cfg.n_train:]


def warmup_examples(cfg: Any, n: int, noise: float, seed: int, restate: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, noisy CoT trace with steps restated at rate `restate`) pairs for building the base model; fresh
    chains, not the RL splits."""
    rng = random.Random(f"warmup:{seed}")
    out = []
    for _ in range(n):
        problem, numbers, ops = make_problem(rng, cfg)
        out.append((problem.prompt, cot_trace(numbers, ops, rng, noise, restate)))
    return out
