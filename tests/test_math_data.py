"""MATH-500 / GSM8K data on real files: reference answers grade as correct, loaders report file:line, the hub is the
default source and a local copy overrides it, the offline error, the MATH train split is de-duplicated against
MATH-500, prompt formats. Real math-verify grading, no mocks.

The files are $DASH_EXP_DATA's (conftest: the full ../shared/data where it exists, else the 40-row fixtures in
tests/data); the full-set counts (500/500, 1319/1319) are checked whenever the full files are there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA_DIR, REPO

from dash_exp.config import TaskConfig, compose_config
from dash_exp.reward import Grader, extract_boxed
from dash_exp.tasks.math import (
    GSM8K_FIELDS,
    INSTRUCTION,
    MATH_FIELDS,
    DataError,
    PromptFormatter,
    gsm8k_final,
    gsm8k_problem,
    load_rows,
    math_problem,
    read_jsonl,
)
from dash_exp.tasks.registry import build_task

MATH500 = DATA_DIR / "math500" / "test.jsonl"
GSM8K_TRAIN = DATA_DIR / "gsm8k" / "train.jsonl"
GSM8K_TEST = DATA_DIR / "gsm8k" / "test.jsonl"
# the sizes of the full splits; the fixtures are smaller
FULL_SIZES = {MATH500: 500, GSM8K_TRAIN: 7473, GSM8K_TEST: 1319}


def n_rows(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


def local_sources(**kw: Any) -> dict[str, Any]:
    """TaskConfig fields that read the local copy (a plain TaskConfig() names the hub datasets)."""
    return {"math500": str(DATA_DIR / "math500"), "gsm8k": str(DATA_DIR / "gsm8k"), **kw}


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(timeout_s=5) as g:
        yield g


@pytest.fixture(scope="module")
def math500_rows() -> list[dict[str, Any]]:
    return read_jsonl(MATH500, MATH_FIELDS)


@pytest.fixture(scope="module")
def gsm8k_test_rows() -> list[dict[str, Any]]:
    return read_jsonl(GSM8K_TEST, GSM8K_FIELDS)


# ------------------------------------------------------------------ the references grade as correct
@pytest.mark.unit
def test_math500_solutions_grade_against_their_own_answers(grader, math500_rows):
    result = grader.grade([r["solution"] for r in math500_rows], [r["answer"] for r in math500_rows])
    correct = sum(result.rewards)
    # measured: 500/500 (each solution's last \boxed{} is the `answer` field verbatim, up to surrounding spaces)
    print(f"MATH-500 self-grading ({MATH500}): {correct:.0f}/{len(math500_rows)}")
    assert len(math500_rows) == n_rows(MATH500) and len(math500_rows) in (40, 500)
    assert correct >= 0.99 * len(math500_rows)
    assert result.unparsed == 0 and result.timeouts == 0


@pytest.mark.unit
def test_math500_answers_are_the_last_box_of_the_solution(math500_rows):
    # math_problem falls back to the last \boxed{} when a row has no `answer` (e.g. the MATH train split)
    same = sum(extract_boxed(r["solution"]).strip() == r["answer"].strip() for r in math500_rows)
    assert same == len(math500_rows)
    row = math500_rows[0]
    assert math_problem({"problem": row["problem"], "solution": row["solution"]})[1] == extract_boxed(row["solution"])


@pytest.mark.unit
def test_gsm8k_references_grade_as_correct(grader, gsm8k_test_rows):
    finals = [gsm8k_final(r["answer"]) for r in gsm8k_test_rows]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", f) for f in finals), [f for f in finals if not f.isdigit()][:5]
    result = grader.grade([f"The answer is \\boxed{{{f}}}." for f in finals], finals)
    assert result.rewards == [1.0] * len(gsm8k_test_rows) and result.unparsed == 0

    converted = [gsm8k_problem(r) for r in gsm8k_test_rows]
    assert all(s.endswith(f"\\boxed{{{a}}}.") and "<<" not in s for _, a, s in converted)
    result = grader.grade([s for _, _, s in converted], [a for _, a, _ in converted])
    assert result.rewards == [1.0] * len(gsm8k_test_rows) and result.unparsed == 0


@pytest.mark.unit
def test_gsm8k_final_strips_thousands_separators_and_requires_the_marker():
    assert gsm8k_final("She pays 1,200 + 34 = <<1200+34=1234>>1,234 dollars.\n#### 1,234") == "1234"
    assert gsm8k_final("#### -5") == "-5"
    question, answer, solution = gsm8k_problem({"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6 apples\n#### 6"})
    assert (question, answer, solution) == ("Q?", "6", "2 * 3 = 6 apples\nThe answer is \\boxed{6}.")
    with pytest.raises(DataError, match="####"):
        gsm8k_final("the answer is 6")


# ------------------------------------------------------------------ hand-made answer pairs
# (boxed answer, reference, correct?): only pairs whose verdict is mathematically clear
EQUIVALENT = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("1/2", "\\frac{1}{2}"),
    ("1/2", "0.5"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("0.25", "\\frac{1}{4}"),
    ("2.50", "2.5"),
    ("3", "3.0"),
    # negatives
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-\\frac{1}{2}"),
    ("-2.5", "-\\frac{5}{2}"),
    ("-7", "-7.0"),
    ("-0", "0"),
    # degrees
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30", "30^\\circ"),
    # intervals
    ("[1, 2)", "[1,2)"),
    ("\\left[0, 1\\right)", "[0,1)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("(2,\\infty)", "(2, \\infty)"),
    ("x \\in [-2,7]", "[-2,7]"),
    # \text{} wrappers and units
    ("\\text{east}", "east"),
    ("\\mathrm{east}", "\\text{east}"),
    ("\\text{(C)}", "C"),
    ("5\\text{ cm}", "5"),
    ("5", "5\\text{ cm}"),
    ("864", "864 \\mbox{ inches}^2"),
    ("\\$32", "32"),
    ("10,080", "10080"),
    ("10,\\!080", "10080"),
    # tuples, sets
    ("(1, 2)", "(1,2)"),
    ("(1,2,3)", "(1, 2, 3)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    # roots
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\sqrt{3}", "3^{1/2}"),
    ("\\sqrt{4}", "2"),
    # pi and expressions
    ("2\\pi", "2 \\pi"),
    ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi"),
    ("\\frac{\\pi}{2}", "\\frac12\\pi"),
    ("x^2+2x+1", "(x+1)^2"),
    ("x=5", "5"),
]
DIFFERENT = [
    ("\\frac{1}{3}", "0.33"),
    ("\\frac{1}{2}", "\\frac{2}{1}"),
    ("\\dfrac{3}{4}", "\\frac{4}{3}"),
    ("0.2", "\\frac{1}{4}"),
    ("2.5", "2.05"),
    ("100", "1000"),
    ("-3", "3"),
    ("3", "-3"),
    ("-2.5", "\\frac{5}{2}"),
    ("-\\infty", "\\infty"),
    ("30^\\circ", "60"),
    ("45^\\circ", "135"),
    ("(1,2)", "[1,2]"),
    ("[1,2)", "(1,2]"),
    ("(3,4]", "(3,4)"),
    ("[0,1]", "(0,1)"),
    ("\\text{east}", "\\text{west}"),
    ("\\text{(C)}", "\\text{(B)}"),
    ("5\\text{ cm}", "6"),
    ("(1,2)", "(2,1)"),
    ("(1,2,3)", "(1,3,2)"),
    ("(-1, 4)", "(-1,-4)"),
    ("(1,2)", "(1,2,3)"),
    ("\\sqrt{2}", "2"),
    ("\\sqrt{12}", "3\\sqrt{2}"),
    ("2\\sqrt{2}", "\\sqrt{2}"),
    ("\\pi", "3.14159"),
    ("3.14", "\\pi"),
    ("\\pi", "2\\pi"),
    ("4\\pi", "12.566"),
]
PAIRS = [(a, b, 1.0) for a, b in EQUIVALENT] + [(a, b, 0.0) for a, b in DIFFERENT]


@pytest.mark.unit
@pytest.mark.parametrize(("answer", "reference", "reward"), PAIRS, ids=[f"{a} vs {b}" for a, b, _ in PAIRS])
def test_hand_made_pairs(grader, answer, reference, reward):
    result = grader.grade([f"Some work first. So the answer is $\\boxed{{{answer}}}$."], [reference])
    assert result.rewards == [reward], f"{answer!r} vs {reference!r}"
    assert result.unparsed == 0 and result.timeouts == 0


@pytest.mark.unit
def test_enough_pairs_of_both_kinds():
    assert len(PAIRS) >= 30 and len(EQUIVALENT) >= 15 and len(DIFFERENT) >= 15


@pytest.mark.unit
def test_a_response_without_a_box_gets_zero_and_counts_as_unparsed(grader):
    result = grader.grade(["The answer is 5.", "so \\boxed{5}", "5"], ["5", "5", "5"])
    assert result.rewards == [0.0, 1.0, 0.0]
    assert result.unparsed == 2 and result.timeouts == 0


# ------------------------------------------------------------------ loaders
@pytest.mark.unit
def test_read_jsonl_reads_every_line_of_the_local_files():
    full = n_rows(MATH500) == FULL_SIZES[MATH500]
    for path, fields in ((MATH500, MATH_FIELDS), (GSM8K_TRAIN, GSM8K_FIELDS), (GSM8K_TEST, GSM8K_FIELDS)):
        # the full copy has every row of the full split; the fixtures have 40 of each
        assert len(read_jsonl(path, fields)) == n_rows(path) == (FULL_SIZES[path] if full else 40), path
    rows = load_rows(str(MATH500), MATH_FIELDS)  # .jsonl through load_rows
    assert len(rows) == n_rows(MATH500)
    assert set(rows[0]) >= {"problem", "solution", "answer", "subject", "level", "unique_id"}
    # a directory holding <split>.jsonl reads that file
    assert load_rows(str(MATH500.parent), MATH_FIELDS, "test") == rows
    assert load_rows(str(GSM8K_TRAIN.parent), GSM8K_FIELDS, "train") == read_jsonl(GSM8K_TRAIN, GSM8K_FIELDS)


GOOD = json.dumps({"problem": "p", "solution": "s"})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("lines", "where", "expected"),
    [
        ([GOOD, GOOD, '{"problem": "p", "solution": '], 3, "invalid JSON"),
        ([GOOD, "", json.dumps({"problem": "p"})], 3, "field 'solution' must be a string (got missing)"),
        ([GOOD, json.dumps({"problem": 3, "solution": "s"})], 2, "field 'problem' must be a string (got int)"),
        ([json.dumps({"problem": None, "solution": "s"})], 1, "field 'problem' must be a string (got NoneType)"),
        ([GOOD, "[1, 2]"], 2, "expected a JSON object with fields problem, solution"),
    ],
    ids=["invalid-json", "missing-field-after-blank-line", "wrong-type", "null", "not-an-object"],
)
def test_malformed_line_names_path_line_and_expectation(tmp_path, lines, where, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl(path, MATH_FIELDS)
    message = str(info.value)
    assert f"bad.jsonl:{where}:" in message and str(path) in message
    assert expected in message
    with pytest.raises(DataError, match=re.escape(f"bad.jsonl:{where}:")):
        load_rows(str(path), MATH_FIELDS)


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_empty_and_missing_files_raise(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no rows (empty file)")):
        read_jsonl(path, MATH_FIELDS)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        read_jsonl(tmp_path / "nope.jsonl", MATH_FIELDS)
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "nope.parquet"), MATH_FIELDS)


@pytest.mark.unit
def test_load_rows_from_a_local_parquet(tmp_path, math500_rows):
    import pandas as pd

    rows = math500_rows[:5]
    pd.DataFrame(rows).to_parquet(tmp_path / "math.parquet")
    assert load_rows(str(tmp_path / "math.parquet"), MATH_FIELDS) == rows

    bad = tmp_path / "bad.parquet"
    pd.DataFrame([{"problem": 7, "solution": "s"}, {"problem": 8, "solution": "s"}]).to_parquet(bad)
    with pytest.raises(DataError, match=re.escape(f"{bad}: row 0: field 'problem' must be a string (got int)")):
        load_rows(str(bad), MATH_FIELDS)
    pd.DataFrame([{"problem": "p", "solution": "s"}, {"problem": "q"}]).to_parquet(bad)  # missing -> null
    with pytest.raises(DataError, match=re.escape(f"{bad}: row 1: field 'solution' must be a string")):
        load_rows(str(bad), MATH_FIELDS)


@pytest.mark.unit
def test_load_rows_from_a_local_dataset_dir_through_datasets(tmp_path, monkeypatch, math500_rows):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep ~/.cache clean
    rows = [{k: r[k] for k in ("problem", "solution", "answer")} for r in math500_rows[:4]]
    (tmp_path / "ds").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "ds" / "train.parquet")
    assert load_rows(str(tmp_path / "ds"), MATH_FIELDS, "train") == rows
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'ds'}: cannot load split 'test'")):
        load_rows(str(tmp_path / "ds"), MATH_FIELDS, "test")


@pytest.mark.unit
def test_parquet_row_without_answer_falls_back_to_the_box(tmp_path):
    import pandas as pd

    rows = [{"problem": "a", "solution": "\\boxed{2}", "answer": "2"}, {"problem": "b", "solution": "so \\boxed{3}"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "mixed.parquet")
    assert [math_problem(r)[1] for r in load_rows(str(tmp_path / "mixed.parquet"), MATH_FIELDS)] == ["2", "3"]


# ------------------------------------------------------------------ build_task: math and gsm8k
FAKE_TRAIN = [
    {"problem": "What is $1+1$?", "solution": "We have $1+1=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "What is $2\\cdot 3$?", "solution": "$2\\cdot 3 = \\boxed{6}$.", "level": "Level 1", "type": "Algebra"},
    None,  # replaced by a MATH-500 problem (with extra surrounding whitespace): must be dropped
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 2",
     "type": "Prealgebra"},
    {"problem": "What is $3^2$?", "solution": "$3^2=\\boxed{9}$.", "level": "Level 1", "type": "Algebra"},
]


def fake_train_rows(math500_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dup = math500_rows[7]
    rows = list(FAKE_TRAIN)
    rows[2] = {"problem": f"  {dup['problem']}\n", "solution": dup["solution"], "level": f"Level {dup['level']}",
               "type": dup["subject"]}
    return rows


def math_cfg(train_path: Any = None, **kw: Any) -> TaskConfig:
    extra = {} if train_path is None else {"train_path": str(train_path)}
    return TaskConfig(name="math", **local_sources(**extra, **kw))


@pytest.fixture
def train_files(tmp_path, math500_rows) -> dict[str, Path]:
    import pandas as pd

    rows = fake_train_rows(math500_rows)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    return {"jsonl": tmp_path / "train.jsonl", "parquet": tmp_path / "train.parquet"}


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_math_task_drops_math500_duplicates_and_evaluates_on_math500_and_gsm8k(train_files, math500_rows,
                                                                                   gsm8k_test_rows, kind):
    task = build_task(math_cfg(train_files[kind]))
    try:
        kept = [r for i, r in enumerate(FAKE_TRAIN) if i != 2]
        assert [p.prompt for p in task.train] == [r["problem"] for r in kept]  # raw: the problem text itself
        assert [p.answer for p in task.train] == ["2", "6", "\\frac{1}{2}", "9"]  # from the last \boxed{}
        assert [p.solution for p in task.train] == [r["solution"] for r in kept]
        assert list(task.evals) == ["math500", "gsm8k"] and task.test is task.evals["math500"]
        assert len(task.evals["math500"]) == n_rows(MATH500) and len(task.evals["gsm8k"]) == n_rows(GSM8K_TEST)
        assert [p.prompt for p in task.evals["math500"]] == [r["problem"] for r in math500_rows]
        assert [p.answer for p in task.evals["math500"]] == [r["answer"] for r in math500_rows]
        assert [p.prompt for p in task.evals["gsm8k"]] == [r["question"] for r in gsm8k_test_rows]
        assert [p.answer for p in task.evals["gsm8k"]] == [gsm8k_final(r["answer"]) for r in gsm8k_test_rows]
        # the task's own scoring: every reference solution is right
        graded = task.score([p.solution for p in task.evals["math500"][:30]], task.evals["math500"][:30])
        assert graded.rewards == [1.0] * 30
    finally:
        task.close()


@pytest.mark.unit
def test_math_prompt_formats(train_files, math500_rows):
    question = math500_rows[0]["problem"]
    task = build_task(math_cfg(train_files["jsonl"], prompt_format="instruct"))
    try:
        assert task.evals["math500"][0].prompt == f"{question}\n{INSTRUCTION}\n"
        assert task.train[0].prompt == f"{FAKE_TRAIN[0]['problem']}\n{INSTRUCTION}\n"
        assert "\\boxed{}" in INSTRUCTION
    finally:
        task.close()

    task = build_task(math_cfg(train_files["jsonl"], prompt_format="few_shot", few_shot=2))
    try:
        prefix = "".join(f"Problem: {r['problem']}\nSolution: {r['solution']}\n\n" for r in FAKE_TRAIN[:2])
        assert task.evals["math500"][0].prompt == f"{prefix}Problem: {question}\nSolution:"
        # the exemplars are not trained on; the MATH-500 duplicate is still gone
        assert [p.prompt for p in task.train] == [f"{prefix}Problem: {r['problem']}\nSolution:"
                                                  for r in (FAKE_TRAIN[3], FAKE_TRAIN[4])]
    finally:
        task.close()

    with pytest.raises(DataError, match="few_shot needs 9 training exemplars, found 4"):
        build_task(math_cfg(train_files["jsonl"], prompt_format="few_shot", few_shot=9))
    with pytest.raises(ValueError, match="no chat template"):
        build_task(math_cfg(train_files["jsonl"], prompt_format="chat"), tokenizer=None)
    with pytest.raises(ValueError, match="task.prompt_format='nope'"):
        PromptFormatter("nope")


@pytest.mark.unit
def test_math_evaluation_only_never_loads_the_train_split(math500_rows):
    # the default train_path is a hub id: offline and not cached, training fails with the one-line error ...
    with pytest.raises(DataError, match=re.escape("task.train_path=DigitalLearningGmbH/MATH-lighteval: split 'train'")):
        build_task(math_cfg())
    # ... and evaluating never asks for it
    task = build_task(math_cfg(), need_train=False)
    try:
        assert task.train == []
        assert {k: len(v) for k, v in task.evals.items()} == {"math500": n_rows(MATH500),
                                                              "gsm8k": n_rows(GSM8K_TEST)}
    finally:
        task.close()


@pytest.mark.unit
def test_math_train_path_from_a_dataset_dir(tmp_path, monkeypatch, math500_rows):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    (tmp_path / "ds").mkdir()
    datasets.Dataset.from_list(fake_train_rows(math500_rows)).to_parquet(tmp_path / "ds" / "train.parquet")
    task = build_task(math_cfg(tmp_path / "ds", train_split="train"))
    try:
        assert [p.answer for p in task.train] == ["2", "6", "\\frac{1}{2}", "9"]
    finally:
        task.close()


@pytest.mark.unit
def test_gsm8k_task_trains_on_gsm8k_train(gsm8k_test_rows):
    train_rows = read_jsonl(GSM8K_TRAIN, GSM8K_FIELDS)
    task = build_task(TaskConfig(name="gsm8k", **local_sources()))
    try:
        assert len(task.train) == n_rows(GSM8K_TRAIN) and task.train[0].prompt == train_rows[0]["question"]
        assert task.train[0].answer == gsm8k_final(train_rows[0]["answer"])
        assert list(task.evals) == ["gsm8k", "math500"] and task.test is task.evals["gsm8k"]
        assert len(task.evals["gsm8k"]) == n_rows(GSM8K_TEST) and len(task.evals["math500"]) == n_rows(MATH500)
    finally:
        task.close()

    task = build_task(TaskConfig(name="gsm8k", **local_sources(prompt_format="few_shot", few_shot=4)))
    try:
        assert len(task.train) == n_rows(GSM8K_TRAIN) - 4
        prefix = "".join(f"Problem: {q}\nSolution: {s}\n\n" for q, _, s in map(gsm8k_problem, train_rows[:4]))
        assert task.train[0].prompt == f"{prefix}Problem: {train_rows[4]['question']}\nSolution:"
        assert task.evals["gsm8k"][0].prompt == f"{prefix}Problem: {gsm8k_test_rows[0]['question']}\nSolution:"
    finally:
        task.close()


@pytest.mark.unit
def test_few_shot_eval_without_training_rows():
    task = build_task(TaskConfig(name="gsm8k", **local_sources(prompt_format="few_shot")), need_train=False)
    task.close()
    assert task.evals["gsm8k"][0].prompt.startswith("Problem: ")


# ------------------------------------------------------------------ sources: the hub by default, local copies override
HUB = {"math500": "HuggingFaceH4/MATH-500", "gsm8k": "openai/gsm8k", "train_path": "DigitalLearningGmbH/MATH-lighteval"}


@pytest.mark.unit
def test_the_hub_datasets_are_the_default_sources(monkeypatch):
    monkeypatch.delenv("DASH_EXP_DATA")
    cfg = compose_config(["task=math"])
    assert {key: cfg.task[key] for key in HUB} == HUB and cfg.task.gsm8k_config == "main"
    assert {key: getattr(TaskConfig(name="math"), key) for key in HUB} == HUB  # the schema's defaults too
    assert compose_config(["task=gsm8k"]).task.gsm8k == HUB["gsm8k"]


@pytest.mark.unit
def test_dash_exp_data_points_each_source_that_it_holds_at_the_local_copy(monkeypatch, tmp_path):
    (tmp_path / "math500").mkdir()
    monkeypatch.setenv("DASH_EXP_DATA", str(tmp_path))
    task = compose_config(["task=math"]).task
    # math500/ is there, gsm8k/ and math/ are not: those stay on the hub
    assert (task.math500, task.gsm8k, task.train_path) == (str(tmp_path / "math500"), HUB["gsm8k"], HUB["train_path"])
    # an explicit source wins over both
    task = compose_config(["task=math", f"task.math500={MATH500}"]).task
    assert task.math500 == str(MATH500)


@pytest.fixture
def load_dataset_calls(monkeypatch) -> list[tuple[Any, ...]]:
    """Every `datasets.load_dataset` call (the real one still runs: offline here, from the cache or not at all)."""
    import datasets

    calls: list[tuple[Any, ...]] = []
    real = datasets.load_dataset

    def recording(path: str, name: str | None = None, **kw: Any) -> Any:
        calls.append((path, name, kw.get("split")))
        return real(path, name, **kw)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    return calls


@pytest.mark.unit
def test_the_datasets_call_receives_the_hub_id_config_and_split(monkeypatch, load_dataset_calls):
    monkeypatch.delenv("DASH_EXP_DATA")
    cfg = compose_config(["task=gsm8k", "task.prompt_format=raw"])
    try:
        task = build_task(cfg.task, need_train=False)
        task.close()  # a machine with MATH-500 and GSM8K in its datasets cache loads them
    except DataError as exc:  # offline with an empty cache: the one-line error names the dataset
        assert "\n" not in str(exc) and str(exc).startswith("task.math500=HuggingFaceH4/MATH-500: split 'test'")
    assert load_dataset_calls[0] == ("HuggingFaceH4/MATH-500", None, "test")
    assert load_dataset_calls[1:] in ([], [("openai/gsm8k", "main", "test")])


@pytest.mark.unit
def test_a_local_source_wins_over_the_hub(monkeypatch, load_dataset_calls, math500_rows):
    monkeypatch.delenv("DASH_EXP_DATA")
    cfg = compose_config(["task=math", f"task.math500={MATH500}", f"task.gsm8k={GSM8K_TEST.parent}",
                          f"task.train_path={MATH500.parent}", "task.train_split=test"])
    task = build_task(cfg.task)
    task.close()
    assert load_dataset_calls == []  # never the hub
    assert [p.prompt for p in task.evals["math500"]] == [r["problem"] for r in math500_rows]
    assert len(task.evals["gsm8k"]) == n_rows(GSM8K_TEST)
    assert task.train == []  # trained on MATH-500 itself: every problem is a MATH-500 duplicate, so all dropped


@pytest.mark.unit
def test_a_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"task.math500={tmp_path}/nope: no such file or directory")):
        build_task(TaskConfig(name="math", math500=f"{tmp_path}/nope"), need_train=False)


@pytest.mark.integration
def test_offline_without_a_cache_fails_in_one_line_naming_the_dataset_before_any_model_loads(tmp_path, cli_env):
    env = {k: v for k, v in cli_env.items() if k != "DASH_EXP_DATA"}
    # an empty HF cache and an empty model cache: the tiny model would be built first if the data came after it
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                "DASH_EXP_CACHE": str(tmp_path / "models")})
    proc = subprocess.run([sys.executable, "-m", "dash_exp.run", "task=math", "logger=none", "threads=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("data error: task.math500=HuggingFaceH4/MATH-500: split 'test' is not in the "
                               "datasets cache and the hub cannot be reached"), lines[0]
    assert "set task.math500 or $DASH_EXP_DATA to local files" in lines[0]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # no model was built
    assert os.environ.get("HF_HOME") != str(tmp_path / "hf")  # the suite's own environment is untouched
