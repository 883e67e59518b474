"""Code problems graded by execution: the program of a response, run in the sandbox on hidden test inputs, its
plain-data outputs compared here with the expected ones.

The program is the LAST ```python fenced block of the response, else the last ``` block, else the raw text (the
paper authors' rule). The candidate never sees the expected outputs: the sandbox's child calls the entry point on
the test inputs and returns values only; `check` (trusted test code, never model-written) runs here on those
values. So exiting early, printing a success marker, patching the test helpers or returning an object whose
`__eq__` always holds all score 0.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dash_exp.reward import GradeResult
from dash_exp.sandbox import Call, CallFailed, Execution, Job, Sandbox
from dash_exp.tasks.base import GradedTask, Problem

_FENCED = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)
_ANY_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
OUTCOMES = ("no_code_block", "syntax_error", "timeout", "runtime_error", "wrong")


@dataclass(frozen=True)
class CodeTests:
    """The hidden tests of one problem."""

    # the function the tests call
    entry: str
    # source run in the sandbox that assigns `inputs`: one argument list per call
    inputs: str
    # trusted source run by the grader that defines `check(_outs)`, raising unless the outputs are right
    check: str
    # wall-clock limit for the whole program (seconds)
    timeout_s: float = 3.0
    # trusted source the program runs after: the problem's given code (HumanEval: its imports, helpers and the
    # signature the response may simply continue)
    prefix: str = ""

    def job(self, program: str, timeout_s: float | None = None) -> Job:
        """The sandbox job that runs `program` on these tests (under this problem's limit unless given)."""
        return Job(self.prefix + program, self.entry, self.inputs, self.timeout_s if timeout_s is None else timeout_s)


def extract_program(response: str) -> tuple[str, bool]:
    """(program, whether it came from a fenced block)."""
    for pattern in (_FENCED, _ANY_FENCE):
        blocks = pattern.findall(response)
        if blocks:
            return blocks[-1], True
    return response, False


class CodeGrader:
    """Reward 1.0 iff a response's program passes every hidden test; never raises on what a program does."""

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.sandbox = sandbox or Sandbox()
        self._checks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def grade(self, responses: Sequence[str], problems: Sequence[Problem]) -> GradeResult:
        if len(responses) != len(problems):
            raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
        programs = [extract_program(r) for r in responses]
        jobs = [p.tests.job(prog) for (prog, _), p in zip(programs, problems, strict=True)]
        counts = dict.fromkeys(OUTCOMES, 0)
        counts["no_code_block"] = sum(not fenced for _, fenced in programs)
        rewards = []
        for run, problem in zip(self.sandbox.run(jobs), problems, strict=True):
            outcome = self.outcome(run, problem.tests)
            rewards.append(float(outcome == "pass"))
            if outcome != "pass":
                counts[outcome] += 1
        return GradeResult(rewards, timeouts=counts["timeout"], unparsed=counts["syntax_error"], counts=counts)

    def outcome(self, run: Execution, tests: CodeTests) -> str:
        """pass, syntax_error, timeout, runtime_error (it raised, died or returned non-data) or wrong."""
        if run.status in ("syntax_error", "timeout"):
            return run.status
        if run.status != "ok" or any(isinstance(o.value if isinstance(o, Call) else o, CallFailed)
                                     for o in run.outputs):
            return "runtime_error"
        try:
            self._check(tests)(run.outputs)
        except Exception:  # an assertion, or any error of the comparison itself: not a pass
            return "wrong"
        return "pass"

    def _check(self, tests: CodeTests) -> Any:
        key = hashlib.sha256(tests.check.encode()).hexdigest()
        with self._lock:
            if key not in self._checks:
                scope: dict[str, Any] = {"__name__": "dash_exp_check"}
                exec(compile(tests.check, f"<check of {tests.entry}>", "exec"), scope)
                self._checks[key] = scope["check"]
            return self._checks[key]

    def close(self) -> None:
        self.sandbox.close()


class CodeTask(GradedTask):
    """A task whose rewards come from executing programs: each problem's program against its hidden tests."""

    def __init__(self, name: str, train: list[Problem], evals: dict[str, list[Problem]],
                 grader: CodeGrader | None = None) -> None:
        super().__init__(name, train, evals, grader=grader or CodeGrader())

    def score(self, responses: Sequence[str], problems: Sequence[Problem]) -> GradeResult:
        return self.grader.grade(responses, problems)


def reference_seconds(problems: Sequence[Problem], grader: CodeGrader, cache: Path | None,
                      limit_s: float = 120.0) -> list[float]:
    """Seconds each problem's reference solution takes in the grader's sandbox (`inf` if it fails or overruns
    `limit_s`), cached in `cache` (a JSON file keyed by the hash of each problem's program and tests)."""
    keys = [hashlib.sha256(json.dumps([p.tests.prefix, p.solution, p.tests.inputs, p.tests.check]).encode()
                           ).hexdigest()[:16]
            for p in problems]
    known: dict[str, float] = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        runs = grader.sandbox.run([problems[i].tests.job(problems[i].solution, limit_s) for i in todo])
        for i, run in zip(todo, runs, strict=True):
            passed = grader.outcome(run, problems[i].tests) == "pass"
            known[keys[i]] = run.seconds if passed else float("inf")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
    return [known[k] for k in keys]
