"""SFT-M traces: sample any model on the task's training prompts and keep correct responses.

    python -m dash_exp.traces --out traces.jsonl --samples 4 model=qwen2.5-1.5b
    python -m dash_exp.run algorithm=sft algorithm.sft_source=traces algorithm.traces_path=traces.jsonl

Writes one JSON object per line: {"prompt", "response", "answer"}. The prompt is the one the teacher saw, unless
`--student OVERRIDE` (repeated) says how the student's config differs (another model, fewer chat exemplars: the teacher
made stronger by its prompt): each trace then carries the student's prompt of the same problem, so that SFT-M
trains the student on what it will be asked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def make_traces(cfg: Any, out: Path, samples: int, per_prompt: int, max_prompts: int | None,
                student: Any = None) -> dict[str, float]:
    """Rejection sampling over the training split; returns counts (`solved`: the prompts with a correct trace). With
    a `student` config, each trace's prompt is the student's prompt of the same problem (`student_prompts`)."""
    import torch

    from dash_exp.batching import TokenCache
    from dash_exp.config import resolved_inference_batch, resolved_threads
    from dash_exp.evaluation import generate_in_chunks
    from dash_exp.models import load_policy, load_tokenizer, resolve_model_path
    from dash_exp.rollout.base import SamplingParams, mix32
    from dash_exp.rollout.registry import build_sampler
    from dash_exp.tasks.registry import build_task

    torch.set_num_threads(resolved_threads(cfg))
    path = resolve_model_path(cfg.model, cfg.task)
    tokenizer = load_tokenizer(path)
    task = build_task(cfg.task, tokenizer)
    tokens = TokenCache(tokenizer)
    sampler = build_sampler(cfg, load_policy(path), tokens, path)
    problems = task.train[:max_prompts] if max_prompts else task.train
    prompts = [p.prompt for p in problems] if student is None else student_prompts(student, problems)
    params = SamplingParams.from_config(cfg, samples)
    seeds = [mix32(cfg.seed, -2, i) for i in range(len(problems))]
    rollouts = generate_in_chunks(sampler, [tokens(p.prompt) for p in problems], params, seeds,
                                  resolved_inference_batch(cfg))
    sampler.close()
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    graded = task.score(texts, [p for p in problems for _ in range(samples)])
    task.close()
    written = solved = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, problem in enumerate(problems):
            group = range(i * samples, (i + 1) * samples)
            correct = dict.fromkeys(texts[j] for j in group if graded.rewards[j] > 0 and not rollouts[j].truncated)
            solved += bool(correct)
            for text in list(correct)[:per_prompt]:
                if prompts[i] is not None:
                    f.write(json.dumps({"prompt": prompts[i], "response": text, "answer": problem.answer}) + "\n")
                    written += 1
    return {"prompts": len(problems), "samples": len(texts), "accepted": sum(graded.rewards), "solved": solved,
            "written": written}


def student_prompts(student: Any, problems: list[Any]) -> list[str | None]:
    """The student config's prompt of each of the teacher's `problems` (the same problem: its answer and reference
    solution), or None for one the student does not train on (a chat exemplar of the student's prompts); an error
    when the two training splits hold different problems."""
    from dash_exp.models import load_tokenizer, resolve_model_path
    from dash_exp.tasks.registry import build_task

    task = build_task(student.task, load_tokenizer(resolve_model_path(student.model, student.task)))
    by_problem: dict[tuple[str, str], list[str]] = {}
    for p in task.train:
        by_problem.setdefault((p.answer, p.solution), []).append(p.prompt)
    task.close()
    exemplars = {(p.answer, p.solution) for p in problems} - set(by_problem)
    if len(exemplars) > student.task.chat_shots:
        raise ValueError(f"--student: {len(exemplars)} of the teacher's training problems are not in the student's "
                         f"training split (task.{student.task.name}: the student's overrides must keep its data)")
    return [by_problem[key].pop(0) if by_problem.get(key) else None for key in ((p.answer, p.solution)
                                                                                  for p in problems)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="traces JSONL to write")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--per-prompt", type=int, default=1, help="most distinct correct traces kept per prompt")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N training prompts")
    parser.add_argument("--student", action="append", default=None, metavar="OVERRIDE",
                        help="an override (on top of the teacher's; repeat for several) that makes the student's "
                             "config, whose prompts the traces carry, e.g. --student task.chat_shots=3")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=qwen2.5-1.5b task=arith")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --student
    from dash_exp.config import compose_config

    cfg = compose_config(args.overrides)
    student = compose_config([*args.overrides, *args.student]) if args.student else None
    counts = make_traces(cfg, args.out, args.samples, args.per_prompt, args.max_prompts, student)
    print(f"wrote {counts['written']} traces to {args.out} "
          f"({counts['accepted']:.0f}/{counts['samples']} samples correct, {counts['solved']} of "
          f"{counts['prompts']} prompts solved)")


if __name__ == "__main__":
    main()
