"""Where two reproductions of the paper's findings agree: every compared pair of every finding on two (or more)
sets of runs side by side, each with its difference, 95% interval and verdict, and whether the verdicts match.

    python -m analysis.agreement --runs "tiny model=results/tiny" --runs "SmolLM2-135M=results/smollm2_findings" \
        --readme README.md

Each --runs is NAME=DIR, read as `analysis.make_figures` reads it: the findings' own sweeps (`make reproduce`), or
one all-findings sweep (`sweeps/smollm2_findings.yaml`) read as their views. The table replaces the block between
`<!-- agreement:begin -->` and `<!-- agreement:end -->` of each --readme file. A verdict that differs between two
models is a result (the toy and the real model disagree there), not an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.findings import interval_frame, verdicts
from analysis.runs import FINDING_VIEWS, as_finding_sweeps, load_runs
from analysis.stats import interval_text
from dash_exp.markdown import replace_block

BEGIN, END = "<!-- agreement:begin -->", "<!-- agreement:end -->"


def findings_frame(root: str | Path) -> pd.DataFrame:
    """`findings.interval_frame` of the runs under root: one row per compared pair (finding, part, diff, low, high,
    unit, threshold, verdict); an all-findings sweep is read as the findings' views."""
    runs, steps = load_runs(root)
    if not runs.empty and not set(runs["sweep"]) & set(FINDING_VIEWS):
        runs, steps = as_finding_sweeps(runs, steps)
    return interval_frame(verdicts(runs, steps))


def agreement(verdicts: list[str]) -> str:
    """How the verdicts of one compared pair on several models relate: `same`, `opposite` (a yes and a no: the
    models disagree), or `undecided on one` (decided on some, inconclusive on another: more seeds would tell)."""
    if len(set(verdicts)) == 1:
        return "same"
    return "opposite" if {"yes", "no"} <= set(verdicts) else "undecided on one"


def agreement_table(frames: dict[str, pd.DataFrame]) -> str:
    """Markdown: one row per compared pair found in any of the frames (in the first frame's order), a column per
    frame ('difference [95% CI] unit: verdict', or 'not run') and `verdicts` (`agreement`; '–' where a frame lacks
    the pair); then a line counting the pairs by how their verdicts relate and naming those that are not the same."""
    names = list(frames)
    keyed = {name: {(str(r.finding), r.part): r for r in f.itertuples()} for name, f in frames.items()}
    order = list(dict.fromkeys(key for name in names for key in keyed[name]))
    rows = ["| finding | compared | " + " | ".join(names) + " | verdicts |",
            "|---|---|" + "---|" * len(names) + "---|"]
    kinds: dict[str, list[str]] = {"same": [], "opposite": [], "undecided on one": []}
    for key in order:
        cells, found = [], []
        for name in names:
            r = keyed[name].get(key)
            if r is None:
                cells.append("not run")
                continue
            found.append(r.verdict)
            cells.append(f"{interval_text(r.diff, r.low, r.high, 2)} {r.unit}: **{r.verdict}**")
        kind = agreement(found) if len(found) == len(names) else "–"
        if kind in kinds:
            kinds[kind].append(f"{key[0]} {key[1]}")
        rows.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {kind} |")
    compared = sum(map(len, kinds.values()))
    summary = f"Of the {compared} pairs that every model ran: the same verdict on {len(kinds['same'])}"
    summary += "".join(f"; {kind} on {len(pairs)} ({', '.join(pairs)})" for kind, pairs in kinds.items()
                       if kind != "same" and pairs) + "."
    return "\n".join(rows) + "\n\n" + summary


def parse_runs(items: list[str]) -> dict[str, Path]:
    """{name: dir} of `NAME=DIR` arguments (ValueError naming the bad one)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--runs {item!r}: expected NAME=DIR, e.g. 'tiny model=results/tiny'")
        if not Path(path).is_dir():
            raise ValueError(f"--runs {item!r}: {path} is not a directory")
        out[name] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", action="append", required=True, help="NAME=DIR; at least two")
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help=f"replace the block between {BEGIN} and {END} of this Markdown file; repeatable")
    args = parser.parse_args(argv)
    try:
        roots = parse_runs(args.runs)
        if len(roots) < 2:
            raise ValueError("--runs: give at least two NAME=DIR to compare")
        frames = {name: findings_frame(root) for name, root in roots.items()}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    empty = [name for name, frame in frames.items() if frame.empty]
    if empty:
        print(f"error: no finished runs of any finding for {', '.join(empty)}", file=sys.stderr)
        return 1
    command = "python -m analysis.agreement" + "".join(f" --runs '{n}={p}'" for n, p in roots.items())
    table = (f"Generated by `{command}`: each compared pair of the paper's findings, the first method minus the "
             "second with its 95% bootstrap interval over seeds and its verdict, on each model.\n\n"
             + agreement_table(frames))
    for path in args.readme:
        replace_block(path, BEGIN, END, table)
        print(f"updated the agreement table in {path}")
    if not args.readme:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
