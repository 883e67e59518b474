"""The Task protocol, the Problem record, and the seeded stream that feeds prompts to training."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dash_exp.reward import GradeResult


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt as the model sees it, the reference answer, a reference solution (and, for code,
    its hidden tests)."""

    prompt: str
    # the answer graded against (bare, as inside \boxed{})
    answer: str
    # a reference solution (SFT-H trains on prompt + solution; for code, the reference program)
    solution: str
    # the hidden tests of a code problem (tasks.code.CodeTests); None for math
    tests: Any = None
    # a step-by-step solution shown when the problem is a chat exemplar (task.chat_shots); "" = `solution`
    worked: str = ""


class Task(Protocol):
    """Prompts, references and scoring; nothing about models or backends."""

    name: str
    train: list[Problem]
    # held-out evaluation sets by dataset name (metrics: eval/<name>/...)
    evals: dict[str, list[Problem]]

    def score(self, responses: Sequence[str], problems: Sequence[Problem]) -> GradeResult: ...

    def close(self) -> None: ...


class GradedTask:
    """Splits and scoring shared by every task: by default the last \\boxed{} answer graded by math-verify with hard
    timeouts; a subclass scores with its own `grader` (tasks.code: programs run in the sandbox)."""

    def __init__(self, name: str, train: list[Problem], evals: dict[str, list[Problem]],
                 timeout_s: float = 5.0, grader: Any = None) -> None:
        from dash_exp.reward import Grader

        self.name, self.train, self.evals = name, train, evals
        self.grader = grader if grader is not None else Grader(timeout_s=timeout_s)

    @property
    def test(self) -> list[Problem]:
        """The first (main) evaluation set."""
        return next(iter(self.evals.values()))

    def score(self, responses: Sequence[str], problems: Sequence[Problem]) -> GradeResult:
        return self.grader.grade(responses, [p.answer for p in problems])

    def close(self) -> None:
        self.grader.close()


class ProblemStream:
    """Endless, seeded, epoch-wise shuffled stream over a fixed list; its position is checkpointable."""

    def __init__(self, items: Sequence[Any], seed: int) -> None:
        if not items:
            raise ValueError("ProblemStream: no items to stream (empty training split?)")
        self.items, self.seed = list(items), seed
        self.consumed = 0
        self._order: list[int] = []
        self._order_epoch = -1

    @property
    def epoch(self) -> float:
        """Passes over the items so far (fractional)."""
        return self.consumed / len(self.items)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        if epoch != self._order_epoch:
            self._order = list(range(len(self.items)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order[offset]

    def next(self, n: int) -> list[Any]:
        """The next n items (crossing epoch boundaries as needed)."""
        out = [self.items[self._index(self.consumed + i)] for i in range(n)]
        self.consumed += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
