"""A sweep's compact results for the repository: each finished run's config.yaml, summary.json and metrics.jsonl
(no checkpoints, logs or W&B files), from which `make figures` rebuilds the figures and the README's generated
block without training.

    python -m analysis.collect --runs multirun/smollm2_findings/main --out results/smollm2_findings

A run dir is copied under its own name; an unfinished or failed one is left out (and named); what --out held
before is replaced, so it holds exactly the sweep's finished runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from analysis.runs import find_run_dirs, finished_at

# what a finished run leaves that the analysis reads
FILES = ("config.yaml", "summary.json", "metrics.jsonl")


def collect(runs: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """(copied, left out) run dirs of `runs` into a fresh `out` (ValueError when two runs share a name)."""
    finished, left = [], []
    for run_dir in find_run_dirs(runs):
        (finished if all((run_dir / f).is_file() for f in FILES) else left).append(run_dir)
    names = [d.name for d in finished]
    if len(set(names)) != len(names):
        raise ValueError(f"{runs}: two finished runs share a directory name; collect one sweep directory at a time")
    shutil.rmtree(out, ignore_errors=True)
    for run_dir in finished:
        (out / run_dir.name).mkdir(parents=True)
        for f in FILES:
            shutil.copy2(run_dir / f, out / run_dir.name / f)
        # the finish time goes into the copy's summary (git keeps no file times): the results' provenance stands
        summary = json.loads((run_dir / "summary.json").read_text())
        if "finished_at" not in summary:
            summary["finished_at"] = finished_at(summary, run_dir / "summary.json")
            (out / run_dir.name / "summary.json").write_text(json.dumps(summary, indent=1))
    return finished, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="the sweep directory")
    parser.add_argument("--out", type=Path, required=True, help="the results directory to (re)write")
    args = parser.parse_args(argv)
    try:
        copied, left = collect(args.runs, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) if copied else 0
    print(f"{len(copied)} finished runs ({size / 1e6:.1f} MB) -> {args.out}")
    for run_dir in left:
        print(f"left out (not finished): {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
