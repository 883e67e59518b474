"""HumanEval, task=mbpp's out-of-distribution set: its tests drive the candidate in the sandbox and are replayed,
trusted, in the grader."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import REPO, humaneval_file

from dash_exp.tasks.code import CodeGrader
from dash_exp.tasks.humaneval import humaneval_problem, load_humaneval
from dash_exp.tasks.math import DataError

FIXTURES = REPO / "tests" / "data" / "humaneval" / "test.jsonl"


@pytest.fixture(scope="module")
def grader():
    g = CodeGrader()
    yield g
    g.close()


@pytest.fixture(scope="module")
def problems():
    return {p.tests.entry: p for p in load_humaneval(str(FIXTURES))}


@pytest.mark.integration
@pytest.mark.real_model
@pytest.mark.sandbox
def test_every_canonical_solution_passes_and_each_answering_another_problem_fails(grader):
    """All 164 problems, read from the package's .jsonl.gz: the canonical continuation of each prompt passes."""
    every = load_humaneval(str(humaneval_file()))
    assert len(every) == 164
    assert grader.grade([p.solution for p in every], every).rewards == [1.0] * 164
    assert grader.grade([p.solution for p in every[1:] + every[:1]], every).rewards == [0.0] * 164


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_fenced_full_function_and_a_bare_continuation_both_run_after_the_prompt(grader, problems):
    p = problems["truncate_number"]
    fenced = "Here it is:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    wrong = "```python\ndef truncate_number(number):\n    return round(number % 1.0, 1)\n```"
    assert grader.grade([fenced, "    return number % 1.0\n", wrong], [p] * 3).rewards == [1.0, 1.0, 0.0]


@pytest.mark.unit
@pytest.mark.sandbox
def test_the_verdict_is_the_trusted_replay_not_the_sandboxs_run(grader, problems):
    """Task 32 checks find_zero's root with the prompt's `poly`: a program that redefines `poly` passes its own
    check in the sandbox but not the grader's replay; forged verdicts and always-equal objects score 0."""
    p = problems["find_zero"]
    patched = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n"
    always = ("class A(float):\n    def __eq__(self, other):\n        return True\n"
              "    def __lt__(self, other):\n        return True\n\ndef find_zero(xs):\n    return A(0.0)\n")
    exits = "import sys\nsys.exit(0)\n"
    raises = "def find_zero(xs):\n    raise SystemExit(0)\n"
    assert grader.grade([patched, always, exits, raises, p.solution], [p] * 5).rewards == [0.0] * 4 + [1.0]


@pytest.mark.unit
@pytest.mark.sandbox
def test_unseeded_random_inputs_are_the_same_in_the_sandbox_and_the_replay(grader, problems):
    # task 38 draws its strings from the global `random` without a seed; task 53 draws its numbers the same way
    for entry in ("decode_cyclic", "add"):
        p = problems[entry]
        assert grader.grade([p.solution] * 3, [p] * 3).rewards == [1.0] * 3


@pytest.mark.integration
@pytest.mark.real_model
@pytest.mark.sandbox
def test_references_to_the_entry_point_inside_the_test_mean_the_candidate(grader):
    # task 33's check compares with sort_third(...) itself, as HumanEval's harness (the test runs in the program's
    # scope) intends
    with gzip.open(humaneval_file(), "rt") as f:
        rows = [json.loads(line) for line in f]
    p = humaneval_problem(rows[33])
    wrong = "def sort_third(l):\n    return sorted(l)\n"
    assert grader.grade([p.solution, wrong], [p, p]).rewards == [1.0, 0.0]


@pytest.mark.unit
def test_a_row_without_its_check_is_named(tmp_path):
    row = json.loads(FIXTURES.read_text().splitlines()[0])
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(row, test="def test(c):\n    pass\n")) + "\n")
    with pytest.raises(DataError, match=r"HumanEval/0: expected its test to define check\(candidate\)"):
        load_humaneval(str(tmp_path / "bad.jsonl"))
