"""Writes the thin per-finding notebooks in analysis/notebooks/ (no outputs; commit-ready).

    python -m analysis.write_notebooks [--out analysis/notebooks]

Each notebook reads the runs dir from env DASH_EXP_RUNS (default ../../multirun, i.e. the repository's
multirun/ seen from analysis/notebooks/), makes its finding's figures and tables with the library into env
DASH_EXP_FIGURES (default: a temporary dir) and shows them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from analysis.make_figures import BY_SWEEP

NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"

PATH = '''import sys
from pathlib import Path

# the repository root (it holds analysis/) on the import path, wherever the notebook is run from
ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "analysis" / "runs.py").exists()), Path.cwd())
sys.path.insert(0, str(ROOT))'''

LOAD = '''import os
import tempfile

from IPython.display import Image, Markdown, display

from analysis.make_figures import make_finding
from analysis.runs import load_runs

RUNS = Path(os.environ.get("DASH_EXP_RUNS", "../../multirun"))
OUT = Path(os.environ.get("DASH_EXP_FIGURES") or tempfile.mkdtemp(prefix="dash_exp_figures_"))
runs, steps = load_runs(RUNS)
print(f"{len(runs)} completed runs under {RUNS} ({len(runs.attrs['skipped'])} run dirs skipped)")
print(f"figures and tables go to {OUT}")'''

SHOW = '''SWEEP = "{sweep}"
result = None
if runs.empty or SWEEP not in set(runs["sweep"].astype(str)):
    display(Markdown(f"No completed runs of sweep `{{SWEEP}}` under `{{RUNS}}`: run `make sweep SWEEP={{SWEEP}}`."))
else:
    result = make_finding(runs, steps, SWEEP, OUT)
    for name in result.figures:
        display(Image(filename=str(OUT / f"{{name}}.png")))
    for table in result.tables.values():
        display(Markdown(table))
    for note in result.notes:
        print("not made:", note)'''

DATA = '''# the data behind each figure (one row per plotted point)
if result is not None:
    for name, data in result.figures.items():
        print(name)
        display(data.head(12))'''

INTRO = {
    "sft_vs_rl": "Base model vs SFT on terse human-style solutions (SFT-H) vs SFT on the model's own correct "
                 "samples (SFT-M) vs on-policy RL (DASH). The paper: RL improves on the base model, SFT-H hurts, "
                 "SFT-M helps less than RL.",
    "algorithms": "GRPO (sampling in micro-batch chunks, no filtering) vs DASH without gradient filtering (No-GF: "
                  "preemptive sampling only) vs DASH, on the same samples. The paper: DASH trains about 6x faster at "
                  "nearly the same accuracy; Fig 3 shows filtering cutting update time as |advantage| shrinks. The "
                  "time-to-accuracy table and figure show when each method first reaches a held-out accuracy.",
    "pg_vs_ppo": "Plain policy gradient (DASH) vs PPO-style off-policy updates (Multi: 3 passes; Mini: 32 "
                 "mini-batch steps) at the same training wall-clock. The paper: PPO can raise accuracy a little (0.5B) "
                 "but is less stable (Mini collapses at 1.5B).",
    "kl": "DASH with and without the KL penalty (k3, beta 0.04). The paper: without KL, generations are shorter, "
          "training is faster and accuracy (and pass@k) higher.",
    "code": "The paper's code results on the embedded code task: base model vs SFT-H vs DASH (Table 2), and GRPO vs "
            "No-GF vs DASH on the same samples (Table 4), in pass@1 and pass@8 from 8 samples per held-out problem. "
            "The paper (MBPP+): DASH beats SFT-H and the base model; DASH trains 2.1x faster than GRPO at the same "
            "pass@1.",
    "batch_sizes": "Why DASH samples preemptively: generation throughput keeps rising with the inference batch far "
                   "beyond the micro-batch where backprop throughput saturates.",
}


def notebook(sweep: str) -> nbformat.NotebookNode:
    finding = BY_SWEEP[sweep]
    intro = (f"# {finding.title}\n\n{INTRO[sweep]}\n\nRuns: sweep `{sweep}` (`sweeps/{sweep}.yaml`), made with "
             f"`make sweep SWEEP={sweep}` (or `make reproduce`). Set `DASH_EXP_RUNS` to read runs from another "
             "directory, `DASH_EXP_FIGURES` to keep the figures. The same files come from `make figures`.")
    nb = new_notebook(cells=[new_markdown_cell(intro), new_code_cell(PATH), new_code_cell(LOAD),
                             new_code_cell(SHOW.format(sweep=sweep)),
                             new_code_cell(DATA)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"{sweep}-{i}"
    return nb


def write_all(out_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sweep in BY_SWEEP:
        nb = notebook(sweep)
        nbformat.validate(nb)
        path = out_dir / f"{sweep}.ipynb"
        path.write_text(nbformat.writes(nb) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=NOTEBOOK_DIR)
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
