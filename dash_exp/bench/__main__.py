"""python -m dash_exp.bench [all|train|backprop|rollout|profile|gpu|sandbox|generation] [options] [overrides]

`all` (the default, `make bench`) runs each benchmark in its own process (threads, RNG and engines do not
leak between them), writes out/<name>.json, then prints the Performance table and writes out/table.md.
The TRL comparison runs in its own environment (make bench-env): .venv-trl/bin/python -m dash_exp.bench.trl_grpo
`gpu` (not part of `all`) is the prepared check for one GPU (dash_exp/bench/gpu.py); `gpu --cpu` its test size.
`sandbox` (not part of `all`: it needs MBPP+) measures the execution sandbox (dash_exp/bench/sandbox.py).
`generation` (not part of `all`: it needs a real model) measures both backends' tokens/s at batch 16 and 128
against the FLOP floor (dash_exp/bench/generation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# the TRL environment `make bench-env` creates beside .venv, in the repository root
TRL_PYTHON = Path(__file__).resolve().parents[2] / ".venv-trl" / "bin" / "python"
BENCHES = ("all", "train", "backprop", "rollout", "profile", "gpu", "sandbox", "generation")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dash_exp.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=BENCHES, help="which benchmark (default: all)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="rollout: the engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (train: seeds; others: at least 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train: optimizer steps per run (default 60); profile: profiled steps (default 5); "
                             "gpu: steps per algorithm, the first a warm-up (default 3)")
    parser.add_argument("--cpu", action="store_true", help="gpu: the test-size flavour on the CPU (seconds)")
    parser.add_argument("--trl-steps", type=int, default=10, help="trl: timed optimizer steps (after 1 warm-up)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="results directory")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, applied to every benchmark")
    argv = sys.argv[1:] if argv is None else argv
    if not set(argv) & set(BENCHES):
        argv = ["all", *argv]
    return parser.parse_intermixed_args(argv)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark in this process."""
    repeats = max(args.repeats, 5)
    if args.bench == "train":
        from dash_exp.bench import train

        return train.run(args.overrides, args.repeats, args.steps or 60, args.out / "train_runs")
    if args.bench == "backprop":
        from dash_exp.bench import backprop

        return backprop.run(args.overrides, repeats)
    if args.bench == "rollout":
        from dash_exp.bench import rollout

        return rollout.run(args.overrides, args.backend, repeats)
    if args.bench == "profile":
        from dash_exp.bench import profile

        return profile.run(args.overrides, args.steps or 5, args.out)
    if args.bench == "gpu":
        from dash_exp.bench import gpu

        return gpu.run(args.overrides, args.steps or 3, args.cpu)
    if args.bench == "generation":
        from dash_exp.bench import generation

        return generation.run(args.overrides, args.repeats)
    if args.bench == "sandbox":
        from dash_exp.bench import sandbox

        return sandbox.run(args.overrides, args.repeats, args.steps or 10)
    raise ValueError(f"unknown benchmark {args.bench!r}")


def _subprocess(cmd: list[str], out: Path) -> dict[str, Any] | None:
    """Run one benchmark as a child process writing `out`; None (with the reason printed) when it fails."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0 or not out.exists():
        print(f"  -> failed (exit {result.returncode}); its row is left out of the table", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every benchmark, each in a child process; the results by name."""
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--repeats", str(args.repeats), "--out", str(args.out)]
    me = [sys.executable, "-m", "dash_exp.bench"]
    results: dict[str, Any] = {}
    jobs = [("backprop", [*me, "backprop", *common]), ("rollout_hf", [*me, "rollout", "--backend", "hf", *common])]
    if vllm_available():
        jobs.append(("rollout_vllm", [*me, "rollout", "--backend", "vllm", *common]))
    else:
        print("vLLM is not installed (make install-vllm): the vLLM rollout row is skipped")
    jobs.append(("train", [*me, "train", "--steps", str(args.steps or 60), *common]))
    if TRL_PYTHON.exists():
        for algorithm in ("grpo", "dash"):  # TRL with each algorithm's generation batch (the step batch for DASH)
            jobs.append((f"trl_{algorithm}", [str(TRL_PYTHON), "-m", "dash_exp.bench.trl_grpo", "--steps",
                                              str(args.trl_steps), "--warmup", "1", "--out",
                                              str(args.out / f"trl_{algorithm}.json"), f"algorithm={algorithm}"]))
    else:
        print(f"{TRL_PYTHON} is missing (make bench-env): the TRL rows are skipped")
    for name, cmd in jobs:
        out = args.out / f"{name}.json"
        out.unlink(missing_ok=True)
        results[name] = _subprocess([*cmd, *args.overrides], out)
    return results


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.bench == "all":
        from dash_exp.bench.table import performance_table

        table = performance_table(run_all(args))
        (args.out / "table.md").write_text(table + "\n")
        print(f"\n{table}\n\nresults: {args.out}/*.json, table: {args.out}/table.md")
        return
    result = run_one(args)
    args.out.mkdir(parents=True, exist_ok=True)
    names = {"rollout": f"rollout_{args.backend}", "profile": f"profile_{result.get('algorithm')}"}
    name = names.get(args.bench, args.bench)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if args.bench == "gpu":
        from dash_exp.bench.gpu import table

        print(f"{table(result)}\n\nresult: {args.out / f'{name}.json'}")
        return
    print(json.dumps({k: v for k, v in result.items() if "per_seed" not in k}, indent=1))


if __name__ == "__main__":
    main()
