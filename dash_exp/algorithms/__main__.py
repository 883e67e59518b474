"""Print the algorithm components' table; `--readme README.md` writes it between the file's component markers."""

import argparse
import re
from pathlib import Path

from dash_exp.algorithms import components_table

START, END = "<!-- components:start -->", "<!-- components:end -->"

parser = argparse.ArgumentParser(prog="python -m dash_exp.algorithms", description=__doc__)
parser.add_argument("--readme", type=Path, default=None, help="replace the table between the markers in this file")
args = parser.parse_args()
if args.readme is None:
    print(components_table())
else:
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme}: no {START} ... {END} block to replace")
    block = f"{START}\n{components_table()}\n{END}"
    args.readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    print(f"{args.readme}: component table written")
