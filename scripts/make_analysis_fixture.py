"""Remake tests/data/analysis_runs/: real, tiny run outputs of every paper sweep for the analysis/ tests.

    .venv/bin/python scripts/make_analysis_fixture.py            # ~4 min on 2 cores (once the tiny bases are cached)
    .venv/bin/python scripts/make_analysis_fixture.py --keep-tmp  # and leave the full multirun (checkpoints...) in /tmp

What it does (what tests/test_analysis.py's fixture used to do on every test session): the SFT-M traces of the tiny
model (`python -m dash_exp.traces`, 16 prompts), then every sweep of sweeps/ that analysis/ makes figures of
(SWEEP_ARGS below: sft_vs_rl, algorithms, kl, pg_vs_ppo, batch_sizes, code) with the real CLI
(`python -m dash_exp.run +sweep=NAME`) at the test sizes (tests/conftest.py TEST_OVERRIDES, 2 seeds, 2-3 steps).
Of each run it keeps only what analysis/runs.py load_runs reads, byte for byte: config.yaml, summary.json and
metrics.jsonl (no checkpoints, no run.log, no .hydra/, no wandb/: logger=none, and load_wandb is tested on these
same files through a fake W&B API). The machine's absolute paths are rewritten, nothing else: run dirs become
relative to the fixture (`kl/0_dash_kl-on_seed0`), the traces file `traces.jsonl`, the home directory `~`. The
result replaces tests/data/analysis_runs/ whole (~0.4 MB), with a README.md naming the commit it came from.

When to remake it (then commit the new folder):
- tests/test_analysis.py::test_committed_runs_still_fit_todays_config fails: a config key was renamed, removed or
  retyped, or a value is no longer valid (dash_exp/config.py Config / validate);
- the trainer writes new or renamed metrics or summary keys that analysis/ should read;
- a sweep of sweeps/ changes its arms (algorithms, labels, kl on/off) or a new finding's sweep is added (add it to
  SWEEP_ARGS, FINDINGS in analysis/make_figures.py, and the row counts in tests/test_analysis.py).
The numbers in it are tiny-model noise: tests assert structure (rows, labels, figures, tables), never values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import TEST_OVERRIDES  # noqa: E402  (the suite's test sizes: one source of truth)

OUT = REPO / "tests" / "data" / "analysis_runs"
SMALL = [o for o in TEST_OVERRIDES if not o.startswith("run_dir=")]
SEEDS = "seed=0,1"
# per sweep: overrides after the small sizes (the sweep's own knobs cut down to them)
SWEEP_ARGS = {
    "sft_vs_rl": ["steps=2", SEEDS],
    "algorithms": ["steps=2", "eval_every=1", SEEDS],
    "kl": ["steps=2", SEEDS],
    # ppo_mini needs a step batch divisible by its 32 mini-batches; the time budget is not reached in 3 steps
    "pg_vs_ppo": ["steps=3", "time_budget_s=60", "prompts_per_step=8", SEEDS],
    "batch_sizes": ["steps=3", "inference_batch=8,16", "train_microbatch=1,4"],
    # the code task's base at a short warm-up (its own cache key: about a minute to build)
    "code": ["steps=2", SEEDS, "model.tiny.warmup_steps=50", "max_new_tokens=64"],
}
KEEP = ("config.yaml", "summary.json", "metrics.jsonl")


def cli(args: list[str], env: dict, timeout: int) -> None:
    print("+ python -m", " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def train(root: Path) -> Path:
    """Every sweep into root/<sweep>/<job>; returns the traces file."""
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env.update({"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"})
    traces = root.parent / "traces.jsonl"
    # the first command may build the tiny base model (about 4 min on 2 idle cores, an empty model cache)
    cli(["dash_exp.traces", "--out", str(traces), "--samples", "4", "--max-prompts", "16", *SMALL,
         f"run_dir={root.parent}/unused"], env, timeout=1200)
    for sweep, extra in SWEEP_ARGS.items():
        more = [f"algorithm.traces_path={traces}"] if sweep == "sft_vs_rl" else []
        cli(["dash_exp.run", f"+sweep={sweep}", f"hydra.sweep.dir={root / sweep}", *SMALL, *extra, *more], env,
            timeout=900)
    return traces


def copy_compact(root: Path, traces: Path, out: Path) -> int:
    """config.yaml, summary.json, metrics.jsonl of every run under root into out (same relative dirs), absolute
    paths rewritten; returns the number of runs."""
    renames = [(str(traces), "traces.jsonl"), (f"{root}/", ""), (str(Path.home()), "~")]
    n = 0
    for config in sorted(root.rglob("config.yaml")):
        run = config.parent
        if {".hydra", "checkpoints", "wandb"} & set(run.relative_to(root).parts):
            continue
        dest = out / run.relative_to(root)
        dest.mkdir(parents=True)
        for name in KEEP:
            text = (run / name).read_text()
            for old, new in renames:
                text = text.replace(old, new)
            for leak in (str(root.parent), str(REPO), str(Path.home()), tempfile.gettempdir() + "/"):
                assert leak not in text, f"{run / name}: still names {leak}"
            (dest / name).write_text(text)
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep-tmp", action="store_true", help="leave the full multirun in the temp dir")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="analysis_fixture_"))
    start = time.monotonic()
    try:
        root = tmp / "multirun"
        traces = train(root)
        staged = tmp / "out"
        n = copy_compact(root, traces, staged)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dash_exp", "conf", "sweeps"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        sweeps = "\n".join(f"- `{s}`: `+sweep={s} {' '.join(a)}`" for s, a in SWEEP_ARGS.items())
        (staged / "README.md").write_text(
            "# analysis_runs\n\n"
            f"Real outputs of {n} tiny runs (config.yaml, summary.json, metrics.jsonl only) of the paper's sweeps, "
            "read by tests/test_analysis.py.\nMade by `python scripts/make_analysis_fixture.py` at commit "
            f"{commit}{' (with uncommitted changes to dash_exp/conf/sweeps)' if dirty else ''}; its docstring says "
            "when to remake it.\n\n"
            f"Test sizes: `{' '.join(SMALL)}`, then per sweep:\n\n{sweeps}\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staged, args.out)
    finally:
        if args.keep_tmp:
            print(f"full multirun kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{n} runs -> {args.out} ({size / 1e3:.0f} kB) in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
