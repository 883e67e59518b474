"""Every figure (PNG + PDF) and table (Markdown) of the findings whose sweep has runs, plus an index.

    python -m analysis.make_figures --runs multirun --out figures
    python -m analysis.make_figures --wandb-project entity/project --out figures

Runs are found recursively under --runs (one directory per run: config.yaml, metrics.jsonl, summary.json);
failed or unfinished runs are skipped with a note. For each sweep with completed runs it writes that
finding's figures and tables into --out, and `<out>/README.md` lists them all (figures embedded, tables
inlined) after a "Findings" section: each of the paper's four findings, whether our runs reproduce it, with
numbers (`analysis.findings`). `--latest` keeps only the newest multirun directory of each sweep.

Exit status: 0 when anything was written; 1 when there is no completed run at all (it then prints which
sweeps to run, e.g. `make sweep SWEEP=kl` or `make reproduce`) or the W&B API cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import pandas as pd

from analysis import figures as F
from analysis import tables as T
from analysis.findings import findings_section, interval_frame, results_section, verdicts
from analysis.runs import as_finding_sweeps, latest_sweeps, load_runs, load_wandb, sweep_frames
from dash_exp.markdown import replace_block


@dataclass(frozen=True)
class Finding:
    sweep: str
    title: str
    figures: tuple[str, ...]
    tables: tuple[str, ...]


FINDINGS = (
    Finding("sft_vs_rl", "Finding 1: on-policy RL beats SFT on human (SFT-H) and model (SFT-M) traces (Table 1)",
            ("fig_sft_vs_rl",), ("table1",)),
    Finding("algorithms", "Finding 4: DASH (preemptive sampling + gradient filtering) vs GRPO (Table 3, Figs 1, 3)",
            ("fig1_right", "fig3", "fig_time_to_accuracy"), ("table3", "table3_time_to_accuracy")),
    Finding("pg_vs_ppo", "Finding 2: PPO-style off-policy updates can raise accuracy over policy gradient at equal "
            "runtime, but are less stable (Table 5, Fig 4)", ("fig4",), ("table5",)),
    Finding("kl", "Finding 3: no KL penalty: shorter generations, higher accuracy (Table 6, Figs 5, 6)",
            ("fig5", "fig6"), ("table6",)),
    Finding("code", "Findings 1 and 4 on code: RL vs SFT-H, and DASH vs GRPO vs No-GF, in pass@1 / pass@8 "
            "(Tables 2, 4)", (), ("table2", "table4")),
    Finding("batch_sizes", "The bottleneck: generation scales with the batch, backprop saturates",
            ("fig_batch_sizes",), ("table_batch_sizes",)),
)
BY_SWEEP = {f.sweep: f for f in FINDINGS}


@dataclass
class Result:
    """What one finding produced: figure data (name -> DataFrame), tables (name -> Markdown), files, notes."""

    finding: Finding
    runs: int = 0
    figures: dict[str, pd.DataFrame] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_finding(runs: pd.DataFrame, steps: pd.DataFrame, sweep: str, out_dir: str | Path) -> Result:
    """The figures and tables of one sweep's finding into out_dir; what could not be made goes to notes."""
    finding = BY_SWEEP[sweep]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = Result(finding, runs=len(sweep_frames(runs, steps, sweep)[0]))
    for name in finding.figures:
        try:
            result.figures[name] = F.FIGURE_FUNCS[name](runs, steps, out)
            result.written += [out / f"{name}.png", out / f"{name}.pdf"]
        except F.NoDataError as exc:
            result.notes.append(str(exc))
    for name in finding.tables:
        try:
            md = T.TABLE_FUNCS[name](runs, steps)
        except F.NoDataError as exc:
            result.notes.append(str(exc))
            continue
        result.tables[name] = md
        (out / f"{name}.md").write_text(md + "\n")
        result.written.append(out / f"{name}.md")
    return result


def write_index(results: list[Result], out_dir: Path, source: str, missing: list[str], skipped: list,
                findings: str = "") -> Path:
    """<out_dir>/README.md: the Findings section (verdicts), then each finding's figures and tables."""
    lines = ["# Figures and tables", "",
             f"Made by `python -m analysis.make_figures` from `{source}`. Each section is one finding of Huang et al. "
             "2025 (arXiv 2505.17218) and the sweep that tests it (`sweeps/<sweep>.yaml`).", ""]
    if findings:
        lines += [findings, ""]
    for r in results:
        lines += [f"## {r.finding.title}", "", f"Sweep `{r.finding.sweep}`: {r.runs} completed runs.", ""]
        lines += [f"![{name}]({name}.png) ([PDF]({name}.pdf))\n" for name in r.figures]
        for md in r.tables.values():
            lines += [md.replace("\n## ", "\n### ").replace("## ", "### ", 1), ""]
        lines += [f"- not made: {n}" for n in r.notes] + ([""] if r.notes else [])
    if missing:
        lines += ["## Sweeps without runs", ""]
        lines += [f"- `{s}` ({BY_SWEEP[s].title}): `make sweep SWEEP={s}`" for s in missing] + [""]
    if skipped:
        lines += ["## Skipped run directories", ""] + [f"- `{d}`: {why}" for d, why in skipped] + [""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def markers(block: str) -> tuple[str, str, str, str]:
    """(begin, end, short begin, short end) of a results block: `<!-- reproduce:begin -->` ... for block
    "reproduce"; the short form (provenance and the verdict table, without each finding's paragraph) between
    `<!-- reproduce-table:begin -->` and its end is the project README's."""
    return (f"<!-- {block}:begin -->", f"<!-- {block}:end -->", f"<!-- {block}-table:begin -->",
            f"<!-- {block}-table:end -->")


BEGIN, END, SHORT_BEGIN, SHORT_END = markers("reproduce")


def write_results(path: Path, runs, steps, found, block: str = "reproduce", command: str = "") -> None:
    """The results block of a Markdown file: the whole one between its begin and end markers, the short one (no
    paragraphs) between its -table markers, whichever the file has (ValueError if neither)."""
    begin, end, short_begin, short_end = markers(block)
    kw = {"command": command} if command else {}
    if short_begin in path.read_text():
        replace_block(path, short_begin, short_end, results_section(runs, steps, found, paragraphs=False, **kw))
    else:
        replace_block(path, begin, end, results_section(runs, steps, found, **kw))


def no_runs_message(source: str) -> str:
    sweeps = "\n".join(f"  make sweep SWEEP={f.sweep:<12} # {f.title}" for f in FINDINGS)
    return (f"no completed runs under {source}: nothing to plot. Run the sweeps first, e.g.\n{sweeps}\n"
            "or all of them, then the figures: make reproduce")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="multirun", help="directory searched recursively for run dirs")
    parser.add_argument("--out", default="figures", help="output directory for figures, tables and README.md")
    parser.add_argument("--wandb-project", default=None, help="read runs from this W&B project (entity/project) "
                        "instead of --runs")
    parser.add_argument("--latest", action="store_true", help="only the newest multirun directory of each sweep")
    parser.add_argument("--views", action="store_true",
                        help="the runs are ONE sweep holding every finding's arms (sweeps/smollm2_findings.yaml): "
                        "read it as the four findings' sweeps (analysis.runs.as_finding_sweeps)")
    parser.add_argument("--block", default="reproduce",
                        help="the name in the --readme files' markers: <!-- NAME:begin --> (default reproduce; the "
                        "real model's block: reproduce-smollm2)")
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help=f"also replace the block between {BEGIN} and {END} (or the verdict table alone between "
                        f"{SHORT_BEGIN} and {SHORT_END}) in this Markdown file with what the runs found; repeatable "
                        "(README.md and docs/reproducing.md)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # headless: files only

    if args.wandb_project:
        source = f"W&B project {args.wandb_project}"
        try:
            runs, steps = load_wandb(args.wandb_project)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        source = str(args.runs)
        runs, steps = load_runs(args.runs)
    skipped = runs.attrs.get("skipped", [])
    for run_dir, why in skipped:
        print(f"note: skipped {run_dir}: {why}")
    if args.latest:
        runs, steps = latest_sweeps(runs, steps)
    if args.views:
        try:
            runs, steps = as_finding_sweeps(runs, steps)
        except ValueError as exc:
            print(f"error: --views: {exc}", file=sys.stderr)
            return 1
    if runs.empty:
        print(no_runs_message(source))
        return 1
    out = Path(args.out)
    present = set(runs["sweep"].dropna().astype(str))
    other = runs[~runs["sweep"].isin([f.sweep for f in FINDINGS])]
    if len(other):
        print(f"note: {len(other)} run(s) belong to no known sweep (sweep_name {sorted(map(str, set(other['sweep'])))})"
              "; they are not plotted")
    results, missing = [], []
    for finding in FINDINGS:
        if finding.sweep not in present:
            missing.append(finding.sweep)
            continue
        result = make_finding(runs, steps, finding.sweep, out)
        results.append(result)
        for note in result.notes:
            print(f"note: {note}")
    if not results:
        print(no_runs_message(source))
        return 1
    found = verdicts(runs, steps)
    try:
        F.fig_verdicts(interval_frame(found), out)
        figure = "fig_verdicts"
    except F.NoDataError:
        figure = ""
    index = write_index(results, out, source, missing, skipped, findings_section(runs, steps, found, figure))
    command = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    for path in args.readme:
        write_results(path, runs, steps, found, args.block, command)
        print(f"updated the reproduction results in {path}")
    print(f"wrote {sum(len(r.written) for r in results) + 1} files to {out}/:")
    for r in results:
        print(f"  {r.finding.sweep} ({r.runs} runs): " + ", ".join(p.name for p in r.written))
    print(f"  index: {index}")
    for sweep in missing:
        print(f"no runs for sweep {sweep}: make sweep SWEEP={sweep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
