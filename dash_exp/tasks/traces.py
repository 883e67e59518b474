"""SFT-M traces on disk (written by `python -m dash_exp.traces`): one JSON object per line, {"prompt", "response",
"answer"}, read back as Problems whose solution is the response."""

from __future__ import annotations

from pathlib import Path

from dash_exp.tasks.base import Problem


def load_traces(path: Path) -> list[Problem]:
    """Traces JSONL -> Problems (solution = response); errors name path:line and what was expected."""
    from dash_exp.tasks.math import read_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: traces file not found (make one with python -m dash_exp.traces)")
    rows = read_jsonl(path, ("prompt", "response"))
    return [Problem(prompt=r["prompt"], answer=str(r.get("answer", "")), solution=r["response"]) for r in rows]
