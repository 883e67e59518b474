"""The wall-clock budget of an equal-time comparison: the median training time of one arm's finished runs.

    python -m analysis.budget --runs multirun/smollm2_findings/main --label dash --kl off [--seed 0]

prints it in whole seconds (rounded up) for `time_budget_s=` of the arms that must stop at the same training time
(finding 2: PPO Multi and Mini against DASH of the same seed, `make reproduce-smollm2`); exits 1 with a one-line
reason when no run of the arm has finished. Training time is the run's `time_elapsed` (its steps, evaluations
excluded).
"""

from __future__ import annotations

import argparse
import math
import sys

from analysis.runs import load_runs


def budget(root: str, label: str, kl: str | None = None, seed: int | None = None) -> int:
    """Median training seconds of the finished runs of `label` (and `kl`, `seed`) under root, rounded up;
    ValueError when there is none."""
    runs, _ = load_runs(root)
    sel = runs[runs["label"] == label] if not runs.empty else runs
    if kl is not None and not sel.empty:
        sel = sel[sel["kl"] == kl]
    if seed is not None and not sel.empty:
        sel = sel[sel["seed"] == seed]
    if sel.empty:
        raise ValueError(f"{root}: no finished run of label={label}" + (f" kl={kl}" if kl else "")
                         + (f" seed={seed}" if seed is not None else "") + " to take the time budget from")
    return math.ceil(float(sel["time_elapsed"].median()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="directory searched recursively for run dirs")
    parser.add_argument("--label", required=True, help="the arm whose training time is the budget (algorithm.label)")
    parser.add_argument("--kl", default=None, help="only its runs with this kl (on | off)")
    parser.add_argument("--seed", type=int, default=None, help="only its run of this seed")
    args = parser.parse_args(argv)
    try:
        print(budget(args.runs, args.label, args.kl, args.seed))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
