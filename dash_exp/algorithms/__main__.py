"""Print the algorithm components' table; `--readme FILE` (repeatable: README.md, docs/algorithms.md) writes it
between each file's component markers."""

import argparse
from pathlib import Path

from dash_exp.algorithms import components_table
from dash_exp.markdown import replace_block

START, END = "<!-- components:start -->", "<!-- components:end -->"

parser = argparse.ArgumentParser(prog="python -m dash_exp.algorithms", description=__doc__)
parser.add_argument("--readme", type=Path, action="append", default=[],
                    help="replace the table between the markers in this file (repeatable)")
args = parser.parse_args()
if not args.readme:
    print(components_table())
for path in args.readme:
    try:
        replace_block(path, START, END, components_table())
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(f"{path}: component table written")
