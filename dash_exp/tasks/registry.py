"""The task registry: `build_task` makes the task a config names (the protocol in tasks.base never imports its
implementations)."""

from __future__ import annotations

from typing import Any

from dash_exp.tasks.base import GradedTask
from dash_exp.tasks.code import CodeTask


def build_task(cfg: Any, tokenizer: Any = None, need_train: bool = True) -> GradedTask:
    """The task named by cfg.name (the `task` config group); `tokenizer` serves prompt_format=chat."""
    if cfg.name == "arith":
        from dash_exp.tasks.arithmetic import make_splits

        train, test = make_splits(cfg)
        return GradedTask("arith", train, {"arith": test})
    if cfg.name in ("math", "gsm8k"):
        from dash_exp.tasks.math import make_math_task

        train, evals = make_math_task(cfg, tokenizer, need_train)
        return GradedTask(cfg.name, train, evals)
    if cfg.name == "pycode":
        from dash_exp.tasks.pycode import make_splits as code_splits

        train, test = code_splits(cfg)
        return CodeTask("pycode", train, {"pycode": test})
    if cfg.name == "mbpp":
        from dash_exp.tasks.mbpp import make_mbpp_task

        return make_mbpp_task(cfg, need_train)
    raise ValueError(f"task.name={cfg.name!r}: expected one of arith, math, gsm8k, pycode, mbpp")
