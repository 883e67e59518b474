"""Generated blocks inside hand-written Markdown (README.md, docs/): the text between two marker comments."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the `begin` and `end` markers of `path` with `text` (ValueError without them)."""
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise ValueError(f"{path}: no {begin} ... {end} block to replace")
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
