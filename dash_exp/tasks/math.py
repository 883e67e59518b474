"""MATH, MATH-500 and GSM8K: loaders with file:line errors, prompt formats, reference answers.

Splits (as the paper): train on the MATH training split (7,500 problems), with every problem that also appears in
MATH-500 removed (matched on the problem text); evaluate on MATH-500 (in distribution) and the GSM8K test split
(out of distribution). `task=gsm8k` trains on the GSM8K train split and evaluates on its test split.
Each source (`task.math500`, `task.gsm8k`, `task.train_path`) is a hub dataset id by default, loaded through
`datasets` and its cache, or a local file / directory that overrides it (see `local_data_source`).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dash_exp.reward import extract_boxed
from dash_exp.tasks.base import Problem

PROMPT_FORMATS = ("raw", "instruct", "chat", "few_shot")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_CALCULATOR = re.compile(r"<<[^>]*>>")


class DataError(ValueError):
    """Bad data: the message names the file (and line) and what was expected."""


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every line of a JSONL file (gzipped if it ends in .gz) as a dict with string `fields`; errors name
    path:line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            _check_row(row, fields, f"{path}:{lineno}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    return rows


def _check_row(row: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
    for name in fields:
        if not isinstance(row.get(name), str):
            got = "missing" if name not in row else type(row[name]).__name__
            raise DataError(f"{where}: field {name!r} must be a string (got {got})")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return pd.read_parquet(path).to_dict("records")


def _looks_like_path(source: str) -> bool:
    """A local path (hub ids are `owner/name`: never absolute, never ~, ./ or ../)."""
    return source.startswith(("/", "~", "./", "../")) or Path(source).suffix in (".jsonl", ".parquet")


def load_rows(source: str, fields: tuple[str, ...], split: str = "train", key: str = "task",
              hub_config: str | None = None) -> list[dict[str, Any]]:
    """Rows of one split, from a local file, a local directory or a hub dataset id (via `datasets`).

    A .jsonl (or .jsonl.gz) / .parquet file is read as is; a directory holding `<split>.jsonl` (or .parquet)
    reads that file; any other directory or hub id goes through `datasets.load_dataset` (its usual cache). `key`
    names the config field in errors, which are one line and say what was expected.
    """
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" or path.suffixes[-2:] == [".jsonl", ".gz"]:
        return read_jsonl(path, fields)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        return read_jsonl(path / f"{split}.jsonl", fields)
    if path.suffix == ".parquet" or (path.is_dir() and (path / f"{split}.parquet").is_file()):
        file = path if path.suffix == ".parquet" else path / f"{split}.parquet"
        where, records = str(file), _read_parquet(file)
    elif _looks_like_path(source) and not path.exists():
        raise DataError(f"{key}={source}: no such file or directory (expected a .jsonl/.parquet file, a directory "
                        f"with {split}.jsonl, or a hub dataset id such as owner/name)")
    else:
        where, records = source, _load_dataset(source, split, key, hub_config)
    for i, row in enumerate(records):
        _check_row(row, fields, f"{where}: row {i}")
    if not records:
        raise DataError(f"{where}: no rows")
    return records


def _load_dataset(source: str, split: str, key: str, hub_config: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(source, hub_config, split=split))
    except ConnectionError as exc:  # offline (HF_DATASETS_OFFLINE=1) or unreachable, and not in the cache
        reason = " ".join(str(exc).split())
        raise DataError(f"{key}={source}: split {split!r} is not in the datasets cache and the hub cannot be reached "
                        f"({reason}); download it once where there is network (docs/getting-started.md, Data), or "
                        f"set {key} or $DASH_EXP_DATA to local files") from exc
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(f"{key}={source}: cannot load split {split!r} as a dataset ({reason})") from exc


def gsm8k_final(answer: str) -> str:
    """The number after '#### ' in a GSM8K answer, without thousands separators."""
    if "####" not in answer:
        raise DataError(f"GSM8K answer without '#### N': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def math_problem(row: dict[str, Any]) -> tuple[str, str, str]:
    """(question, answer, solution) of a MATH row; the answer is `answer` or the solution's last \\boxed{}."""
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():  # absent, None, or NaN from a parquet gap
        answer = extract_boxed(row["solution"])
    if not answer:
        raise DataError(f"MATH row without an answer and without \\boxed{{}} in its solution: {row['problem'][:80]!r}")
    return row["problem"], answer, row["solution"]


def gsm8k_problem(row: dict[str, Any]) -> tuple[str, str, str]:
    """(question, answer, solution); the solution drops calculator annotations and ends in \\boxed{N}."""
    answer = gsm8k_final(row["answer"])
    reasoning = _CALCULATOR.sub("", row["answer"].rsplit("####", 1)[0]).strip()
    return row["question"], answer, f"{reasoning}\nThe answer is \\boxed{{{answer}}}."


class PromptFormatter:
    """Turns a question into the prompt string: raw (the paper), instruct, few_shot; chat prompts are the raw
    question here, put into the chat template by `tasks.registry.build_task`."""

    def __init__(self, fmt: str, exemplars: list[tuple[str, str]] | None = None) -> None:
        if fmt not in PROMPT_FORMATS:
            raise ValueError(f"task.prompt_format={fmt!r}: expected one of {', '.join(PROMPT_FORMATS)}")
        self.fmt = fmt
        self.prefix = "".join(f"Problem: {q}\nSolution: {s}\n\n" for q, s in exemplars or [])

    def __call__(self, question: str) -> str:
        if self.fmt == "instruct":
            return f"{question}\n{INSTRUCTION}\n"
        if self.fmt == "few_shot":
            return f"{self.prefix}Problem: {question}\nSolution:"
        return question


def to_problems(rows: list[dict[str, Any]], parse: Callable[[dict[str, Any]], tuple[str, str, str]],
                prompt: PromptFormatter) -> list[Problem]:
    out = []
    for row in rows:
        question, answer, solution = parse(row)
        out.append(Problem(prompt=prompt(question), answer=answer, solution=solution))
    return out


MATH_FIELDS = ("problem", "solution")
GSM8K_FIELDS = ("question", "answer")


def make_math_task(cfg: Any, need_train: bool) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """(train, eval sets) of task=math or task=gsm8k, each split from its source (hub id or local path)."""
    math500_rows = load_rows(cfg.math500, MATH_FIELDS, "test", "task.math500")
    gsm8k_test_rows = load_rows(cfg.gsm8k, GSM8K_FIELDS, "test", "task.gsm8k", cfg.gsm8k_config)
    # few-shot prompts take their exemplars from the training split, even when only evaluating
    load_train = need_train or cfg.prompt_format == "few_shot"
    if cfg.name == "math":
        train_rows = _math_train_rows(cfg, {r["problem"].strip() for r in math500_rows}) if load_train else []
        parse = math_problem
    else:
        train_rows = load_rows(cfg.gsm8k, GSM8K_FIELDS, "train", "task.gsm8k", cfg.gsm8k_config) if load_train else []
        parse = gsm8k_problem
    exemplars = [(q, s) for q, _, s in (parse(r) for r in train_rows[: cfg.few_shot])]
    if cfg.prompt_format == "few_shot" and len(exemplars) < cfg.few_shot:
        raise DataError(f"task.prompt_format=few_shot needs {cfg.few_shot} training exemplars, found {len(exemplars)}")
    prompt = PromptFormatter(cfg.prompt_format, exemplars)
    evals = {"math500": to_problems(math500_rows, math_problem, prompt),
             "gsm8k": to_problems(gsm8k_test_rows, gsm8k_problem, prompt)}
    if cfg.name == "gsm8k":
        evals = {"gsm8k": evals["gsm8k"], "math500": evals["math500"]}
    return to_problems(train_rows[cfg.few_shot if cfg.prompt_format == "few_shot" else 0:], parse, prompt), evals


def _math_train_rows(cfg: Any, math500: set[str]) -> list[dict[str, Any]]:
    rows = load_rows(cfg.train_path, MATH_FIELDS, cfg.train_split, "task.train_path", cfg.train_config)
    return [r for r in rows if r["problem"].strip() not in math500]
