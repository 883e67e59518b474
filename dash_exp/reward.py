"""Answer extraction and math-verify grading with hard timeouts.

`Grader` grades in one persistent worker process (spawned, never forked: the trainer holds torch threads).
The worker runs math-verify on its own main thread, so math-verify's signal-based timeouts work there;
the parent adds a hard wall-clock deadline per item and kills and restarts a worker that overruns it or
dies (C-level work such as huge integer powers ignores signals). Spawning re-imports the caller's
`__main__` module in the worker, so entry points must keep their work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import re
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

# Longer extracted answers are not graded (reward 0, counted as unparsed): no real answer is this long,
# and math-verify would spend seconds on megabyte strings.
MAX_ANSWER_CHARS = 1000
# Slack of the parent's per-item deadline over timeout_s (pipe latency, scheduling).
_GRACE_S = 0.5
_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 1.0
_READY = "ready"
# (correct, timed_out) for one (answer, reference) pair
_Outcome = tuple[bool, bool]
_TIMED_OUT: _Outcome = (False, True)

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
# an escaped character (so \{ and \} do not count) or a brace
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} or \\fbox{...} in text (brace-balanced, nested braces ok), or None.

    One linear scan without recursion; None if that last box is never closed.
    """
    starts = [i + len(opener) for opener in _BOX_OPENERS if (i := text.rfind(opener)) >= 0]
    if not starts:
        return None
    start = max(starts)
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, start):
        if token[0] == "{":
            depth += 1
        elif token[0] == "}":
            depth -= 1
            if depth == 0:
                return text[start : token.start()]
    return None


@dataclass
class GradeResult:
    """Per-response rewards and why some are 0."""

    # 1.0 correct, 0.0 otherwise, one per response
    rewards: list[float]
    # items whose grading hit the time limit or crashed the worker (reward 0)
    timeouts: int
    # items with no usable \boxed{} answer: none, unbalanced, empty or over MAX_ANSWER_CHARS (reward 0); for
    # code, programs that do not compile
    unparsed: int
    # outcome counts beyond these (code: no_code_block, syntax_error, timeout, runtime_error, wrong), logged as
    # reward/<kind> in training and eval/<set>/<kind>_frac in evaluation
    counts: dict[str, int] = field(default_factory=dict)


def merge_graded(parts: Sequence[GradeResult]) -> GradeResult:
    """Several GradeResults as one, in order (rewards concatenated, counts summed)."""
    kinds = {k: None for part in parts for k in part.counts}
    return GradeResult([r for part in parts for r in part.rewards], sum(part.timeouts for part in parts),
                       sum(part.unparsed for part in parts),
                       {k: sum(part.counts.get(k, 0) for part in parts) for k in kinds})


class Grader:
    """Grades responses against reference answers with math-verify; never hangs, never raises on bad input.

    Each item takes at most about timeout_s plus a small constant (plus a worker restart after an overrun).
    Thread-safe; the worker starts on first use and again after `close()` if grading continues.
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def grade(self, responses: Sequence[str], references: Sequence[str]) -> GradeResult:
        """Reward 1.0 iff the last boxed answer of a response is equivalent to its reference.

        Raises ValueError on a length mismatch, RuntimeError only if the worker process cannot start.
        """
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        rewards = [0.0] * len(responses)
        unparsed = timeouts = 0
        # distinct (answer, reference) pairs left for math-verify -> indices of their responses
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
            boxed = extract_boxed(response) if isinstance(response, str) else None
            answer = boxed.strip() if boxed is not None else ""
            if not answer or len(answer) > MAX_ANSWER_CHARS:
                unparsed += 1
                continue
            target = str(reference).strip()
            if answer == target:
                rewards[i] = 1.0
            else:
                pending.setdefault((answer, target), []).append(i)
        with self._lock:
            outcomes = self._verify(list(pending))
        for (correct, timed_out), indices in zip(outcomes, pending.values(), strict=True):
            for i in indices:
                rewards[i] = float(correct)
            timeouts += timed_out * len(indices)
        return GradeResult(rewards=rewards, timeouts=timeouts, unparsed=unparsed)

    def _verify(self, items: list[tuple[str, str]]) -> list[_Outcome]:
        """One outcome per (answer, reference); an item the worker overruns or dies on counts as timed out."""
        outcomes: list[_Outcome] = []
        while len(outcomes) < len(items):
            if self._worker is None or not self._worker.alive:
                self._worker = _Worker(max(1, math.ceil(self.timeout_s)))
            rest = items[len(outcomes) :]
            done = self._worker.grade(rest, self.timeout_s + _GRACE_S)
            outcomes += done
            if len(done) < len(rest):
                outcomes.append(_TIMED_OUT)
        return outcomes

    def close(self) -> None:
        """Stop the worker process (graceful, then killed after a second)."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Worker:
    """One spawned grading process and its pipe; stopped on close, garbage collection or interpreter exit."""

    def __init__(self, timeout_s: int) -> None:
        if multiprocessing.get_start_method(allow_none=True) not in (None, *multiprocessing.get_all_start_methods()):
            # a joblib (loky) worker, e.g. a job of hydra/launcher=local_parallel: the spawned child would be told
            # to use "loky", which it does not know, and die at start-up
            multiprocessing.set_start_method("spawn", force=True)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_worker_main, args=(child_conn, timeout_s), name="dash_exp-grader", daemon=True
        )
        self._process.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)
        try:
            ready = self._conn.poll(_STARTUP_TIMEOUT_S) and self._conn.recv() == _READY
        except (OSError, EOFError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError("math-verify grading worker failed to start")

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and self._process.is_alive()

    def grade(self, items: list[tuple[str, str]], deadline_s: float) -> list[_Outcome]:
        """Outcomes of a prefix of items: all of them, or those before the item that overran deadline_s
        or killed the worker (which is then killed)."""
        outcomes: list[_Outcome] = []
        try:
            self._conn.send(items)
            for _ in items:
                if not self._conn.poll(deadline_s):
                    break
                outcomes.append(self._conn.recv())
        except (OSError, EOFError):
            pass
        finally:
            if len(outcomes) < len(items):
                self.kill()  # hung, dead, or interrupted here: its pipe may still owe stale answers
        return outcomes

    def kill(self) -> None:
        self._process.kill()
        self._finalizer()

    def close(self) -> None:
        self._finalizer()


def _stop(process: BaseProcess, conn: Connection) -> None:
    """Ask the worker to exit, kill it if it has not within a second, and reap it."""
    with contextlib.suppress(OSError):  # already dead
        conn.send(None)
    process.join(_STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _worker_main(conn: Connection, timeout_s: int) -> None:
    """Worker process: answer each batch of (answer, reference) pairs with one outcome per pair, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout
    warnings.simplefilter("ignore")
    # imported here: the parent never needs math-verify (nor sympy)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = (LatexExtractionConfig(), ExprExtractionConfig())
    golds: dict[str, list] = {}  # parsed references of the current batch

    def parse_math(text: str) -> list:
        return parse(f"${text}$", extraction_config=config, parsing_timeout=timeout_s)

    def check(answer: str, reference: str) -> _Outcome:
        start = time.monotonic()
        try:
            if reference not in golds:
                golds[reference] = parse_math(reference)
            correct = verify(golds[reference], parse_math(answer), timeout_seconds=timeout_s)
        except Exception:
            correct = False
        # math-verify returns False when its own timeouts fire, which takes at least timeout_s
        return correct, not correct and time.monotonic() - start >= timeout_s

    check("1", "1")  # warm up the parsers so the first real item is not slow
    try:
        conn.send(_READY)
        while (batch := conn.recv()) is not None:
            golds.clear()
            for answer, reference in batch:
                conn.send(check(answer, reference))
    except (OSError, EOFError):
        pass  # the parent is gone
