"""MBPP+ (Austin et al. 2021 with EvalPlus's extra tests, Liu et al. 2023) as the paper's authors used it.

Source: the hub dataset `evalplus/mbppplus` (split test, 378 problems) by default, or a local directory holding
train.jsonl and test.jsonl (`$DASH_EXP_DATA/mbppplus`, or `task.mbpp`). The split is the authors' (their
`data/MBPPPlus/dataset_generation.py`: the 378 rows shuffled with seed 42, 70/30), carried as task ids in
`mbpp_split.json`, since the hub order cannot reproduce their shuffle: 264 train, 114 test.
Prompt (the authors'): the problem and its first assert inside triple quotes, raw, no chat template. Tests: the three
`test_list` asserts and the MBPP+ `test` program, rewritten so that the sandbox only calls the entry point and
the grader compares (tasks.code).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from dash_exp.tasks.base import Problem
from dash_exp.tasks.code import CodeGrader, CodeTask, CodeTests, reference_seconds
from dash_exp.tasks.humaneval import load_humaneval
from dash_exp.tasks.math import DataError, load_rows

SPLIT_FILE = Path(__file__).with_name("mbpp_split.json")
FIELDS = ("prompt", "code", "test")


def mbpp_prompt(row: dict[str, Any]) -> str:
    return f'"""\n{row["prompt"]}\n{row["test_list"][0]}\n"""\n'


class _EntryCalls(ast.NodeTransformer):
    """Replaces each call of the entry point by `_outs[<index>]` and records the call's arguments."""

    def __init__(self, entry: str, index: Any) -> None:
        self.entry, self.index, self.args = entry, index, []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == self.entry:
            if node.keywords:
                raise DataError(f"MBPP+ test calls {self.entry} with keywords: {ast.unparse(node)[:80]}")
            self.args.append(node.args)
            index = self.index(len(self.args) - 1) if callable(self.index) else self.index
            return ast.Subscript(ast.Name("_outs", ast.Load()), index, ast.Load())
        return self.generic_visit(node)


def mbpp_tests(row: dict[str, Any], timeout_s: float) -> CodeTests:
    """The row's `test_list` and `test` as sandbox inputs plus a trusted `check`."""
    where = f"MBPP+ task {row.get('task_id')}"
    try:
        *preamble, loop = ast.parse(row["test"]).body
    except SyntaxError as exc:
        raise DataError(f"{where}: its test does not parse ({exc.msg})") from exc
    if not isinstance(loop, ast.For):
        raise DataError(f"{where}: expected the test to end in a loop over the inputs")
    calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and any(isinstance(a, ast.Starred) for a in n.args) and n.func.id != "ref_func"]
    if len(calls) != 1:
        raise DataError(f"{where}: expected one call of the entry point in the test loop")
    entry = calls[0].func.id
    extra = len(row["test_list"])
    asserts, extra_args = [], []
    for k, src in enumerate(row["test_list"]):
        calls_k = _EntryCalls(entry, ast.Constant(k - extra))
        asserts.append(calls_k.visit(ast.parse(src).body[0]))
        if len(calls_k.args) != 1:
            raise DataError(f"{where}: expected one call of {entry} in {src[:80]!r}")
        extra_args.append(ast.List(calls_k.args[0], ast.Load()))
    loop = _EntryCalls(entry, ast.Name("i", ast.Load())).visit(loop)
    imports = "\n".join(["import math", "import sys", *row.get("test_imports", [])])
    import_nodes = [ast.unparse(n) for n in preamble if isinstance(n, (ast.Import, ast.ImportFrom))]
    inputs_node = next((n for n in preamble if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "inputs"),
                       None)
    if inputs_node is None:
        raise DataError(f"{where}: its test assigns no `inputs`")
    inputs = "\n".join([imports, *import_nodes, ast.unparse(inputs_node),
                        f"inputs = list(inputs) + {ast.unparse(ast.List(extra_args, ast.Load()))}"])
    body = [ast.parse(f"assert len(_outs) == len(inputs) + {extra}").body[0], *asserts, loop]
    check = ast.Module([*preamble, ast.FunctionDef("check", ast.arguments([], [ast.arg("_outs")], None, [], [], None,
                                                                            []), body, [], None, None)], [])
    return CodeTests(entry, inputs, imports + "\n" + ast.unparse(ast.fix_missing_locations(check)), timeout_s)


def mbpp_problem(row: dict[str, Any], timeout_s: float = 3.0) -> Problem:
    return Problem(prompt=mbpp_prompt(row), answer="", solution=row["code"], tests=mbpp_tests(row, timeout_s))


def load_mbpp(source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, test rows) in the authors' split, from a local directory of the two files or the hub."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "train.jsonl").is_file():
        train, test = ([_row(r) for r in load_rows(str(path / f"{s}.jsonl"), FIELDS, s, "task.mbpp")]
                       for s in ("train", "test"))
        return train, test
    rows = {int(r["task_id"]): _row(r) for r in load_rows(source, FIELDS, "test", "task.mbpp")}
    split = json.loads(SPLIT_FILE.read_text())
    missing = [i for s in split.values() for i in s if i not in rows]
    if missing:
        raise DataError(f"task.mbpp={source}: {len(missing)} task ids of the authors' split are missing "
                        f"(first: {missing[:5]}); expected the 378 MBPP+ problems (evalplus/mbppplus, split test)")
    return [rows[i] for i in split["train"]], [rows[i] for i in split["test"]]


def _row(row: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(row.get("test_list"), list) or not row["test_list"]:
        raise DataError(f"MBPP+ task {row.get('task_id')}: field 'test_list' must be a non-empty list of asserts")
    return dict(row, test_list=list(row["test_list"]), test_imports=list(row.get("test_imports") or []))


def time_limits(reference_s: list[float], floor_s: float, factor: float | None) -> list[float]:
    """Per-problem wall-clock limits: max(floor, factor x the reference's own time), as EvalPlus calibrates;
    the floor alone where factor is None or the reference failed."""
    if factor is None:
        return [floor_s] * len(reference_s)
    return [max(floor_s, factor * s) if math.isfinite(s) else floor_s for s in reference_s]


def make_mbpp_task(cfg: Any, need_train: bool) -> CodeTask:
    """task=mbpp: the authors' 264 / 114 split, evaluated on the MBPP+ test split and (task.humaneval) on HumanEval;
    each problem's time limit calibrated from its reference solution (measured once per machine, cached in
    task.cache_dir)."""
    train_rows, test_rows = load_mbpp(cfg.mbpp)
    sets = {"train": [mbpp_problem(r, cfg.time_limit_s) for r in train_rows] if need_train else [],
            "mbpp": [mbpp_problem(r, cfg.time_limit_s) for r in test_rows]}
    if cfg.humaneval:
        sets["humaneval"] = load_humaneval(cfg.humaneval, cfg.time_limit_s)
    grader = CodeGrader()
    if cfg.time_limit_factor is not None:
        cache = Path(cfg.cache_dir).expanduser() / "mbpp-reference-seconds.json" if cfg.cache_dir else None
        problems = [p for s in sets.values() for p in s]
        limits = iter(time_limits(reference_seconds(problems, grader, cache), cfg.time_limit_s, cfg.time_limit_factor))
        sets = {name: [replace(p, tests=replace(p.tests, timeout_s=next(limits))) for p in s]
                for name, s in sets.items()}
    train = sets.pop("train")
    return CodeTask("mbpp", train, sets, grader)
