"""Print the algorithm components' table; `--readme FILE` (repeatable: README.md, docs/algorithms.md) writes it
between each file's component markers."""

import argparse
from pathlib import Path

from dash_exp.algorithms import components_table

START, END = "<!-- components:start -->", "<!-- components:end -->"

parser = argparse.ArgumentParser(prog="python -m dash_exp.algorithms", description=__doc__)
parser.add_argument("--readme", type=Path, action="append", default=[],
                    help="replace the table between the markers in this file (repeatable)")
args = parser.parse_args()
if not args.readme:
    print(components_table())
for path in args.readme:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{components_table()}\n{END}{rest.split(END, 1)[1]}")
    print(f"{path}: component table written")
