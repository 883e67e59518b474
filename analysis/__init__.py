"""Figures and tables of the paper's findings from our runs (local run dirs or a W&B project).

    make figures RUNS=multirun                                       # = the line below
    python -m analysis.make_figures --runs multirun --out figures [--wandb-project entity/project] [--latest]

- `analysis.runs`: `load_runs(root)` / `load_wandb(project)` -> (runs, steps) pandas frames.
- `analysis.figures`: one function per figure (Fig 1 right, 3, 4, 5, 6, batch sizes, Table 1 as bars, accuracy vs
  training time).
- `analysis.tables`: Tables 1, 3, 5, 6 with the paper's numbers beside ours, and time to accuracy (Markdown).
- `analysis.findings`: the paper's four findings, a verdict for each computed from the runs (the Findings section).
- `analysis.make_figures`: the CLI; `make_finding(runs, steps, sweep, out)` makes one finding's files.
- `analysis/notebooks/<sweep>.ipynb`: one thin notebook per finding (runs dir from env DASH_EXP_RUNS),
  written by `python -m analysis.write_notebooks`.
"""
