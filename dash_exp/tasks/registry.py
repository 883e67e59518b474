"""The task registry: `build_task` makes the task a config names (the protocol in tasks.base never imports its
implementations)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dash_exp.tasks.base import GradedTask, Problem
from dash_exp.tasks.code import CodeTask
from dash_exp.tasks.math import INSTRUCTION

# the answer-format instruction a chat prompt carries in its user turn: the format each task's grader reads
CODE_INSTRUCTION = "Write the complete Python function in a ```python code block."
INSTRUCTIONS = {"arith": INSTRUCTION, "math": INSTRUCTION, "gsm8k": INSTRUCTION, "pycode": CODE_INSTRUCTION,
                "mbpp": CODE_INSTRUCTION}


def build_task(cfg: Any, tokenizer: Any = None, need_train: bool = True) -> GradedTask:
    """The task named by cfg.name (the `task` config group), its prompts in task.prompt_format (chat: through
    `tokenizer`'s chat template)."""
    task = _build(cfg, need_train or cfg.prompt_format == "chat" and cfg.chat_shots > 0)
    if cfg.prompt_format == "chat":
        # the exemplars come from the training split, which then no longer holds them
        shots, task.train = task.train[: cfg.chat_shots], task.train[cfg.chat_shots:] if need_train else []
        if len(shots) < cfg.chat_shots:
            raise ValueError(f"task.chat_shots={cfg.chat_shots}: the training split holds only {len(shots)} problems")
        chat = ChatPrompts(tokenizer, INSTRUCTIONS[cfg.name], shots)
        task.train = [chat(p) for p in task.train]
        task.evals = {name: [chat(p) for p in problems] for name, problems in task.evals.items()}
    return task


class ChatPrompts:
    """A problem's prompt as the last user turn of the model's chat template, followed by the task's answer-format
    instruction (an instruct model given the bare question answers in prose the grader cannot read); solved
    `exemplars` come first as earlier user / assistant turns, with their worked solutions where the task has them (a
    small model then writes the answer format)."""

    def __init__(self, tokenizer: Any, instruction: str, exemplars: list[Problem] | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("task.prompt_format=chat: the model's tokenizer has no chat template")
        self.tokenizer, self.instruction = tokenizer, instruction
        self.shots = [turn for e in exemplars or [] for turn in (self._user(e), {"role": "assistant",
                                                                                "content": e.worked or e.solution})]

    def _user(self, problem: Problem) -> dict[str, str]:
        return {"role": "user", "content": f"{problem.prompt.rstrip()}\n\n{self.instruction}"}

    def __call__(self, problem: Problem) -> Problem:
        turns = [*self.shots, self._user(problem)]
        return replace(problem, prompt=self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                                          add_generation_prompt=True))


def _build(cfg: Any, need_train: bool) -> GradedTask:
    if cfg.name == "arith":
        from dash_exp.tasks.arithmetic import make_splits

        train, test = make_splits(cfg)
        return GradedTask("arith", train, {"arith": test})
    if cfg.name in ("math", "gsm8k"):
        from dash_exp.tasks.math import make_math_task

        train, evals = make_math_task(cfg, need_train)
        return GradedTask(cfg.name, train, evals)
    if cfg.name == "pycode":
        from dash_exp.tasks.pycode import make_splits as code_splits

        train, test = code_splits(cfg)
        return CodeTask("pycode", train, {"pycode": test})
    if cfg.name == "mbpp":
        from dash_exp.tasks.mbpp import make_mbpp_task

        return make_mbpp_task(cfg, need_train)
    raise ValueError(f"task.name={cfg.name!r}: expected one of arith, math, gsm8k, pycode, mbpp")
