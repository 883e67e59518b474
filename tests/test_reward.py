"""Answer extraction and math-verify grading (real worker processes, real math-verify)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from dash_exp.reward import MAX_ANSWER_CHARS, Grader, GradeResult, extract_boxed

# math-verify cannot settle this tower of powers (its verify times out)
HOSTILE = "\\boxed{9^{9^{9^{9}}}}"


def workers() -> set[multiprocessing.process.BaseProcess]:
    """Live grading workers started by this process."""
    return {p for p in multiprocessing.active_children() if p.name == "dash_exp-grader"}


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(timeout_s=2) as g:
        yield g


# --- extract_boxed ---------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{23}.", "23"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
        ("\\fbox{x^2+1}", "x^2+1"),
        ("\\boxed{1} then \\fbox{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{}", ""),
        ("the answer is 23", None),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed{1} and \\boxed{2", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.unit
def test_extract_boxed_deep_and_huge_inputs_are_fast() -> None:
    start = time.monotonic()
    deep = "{" * 10_000 + "x" + "}" * 10_000
    assert extract_boxed("\\boxed{" + deep + "}") == deep
    assert extract_boxed("\\boxed{" + "{" * 10_000) is None
    assert extract_boxed("a" * 1_000_000) is None
    assert extract_boxed("a" * 1_000_000 + "\\boxed{7}") == "7"
    assert extract_boxed("\\boxed{" * 150_000) is None
    assert extract_boxed("\\boxed{" + "{}" * 500_000 + "}") == "{}" * 500_000
    assert time.monotonic() - start < 5


# --- Grader: correctness ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("response", "reference", "reward"),
    [
        ("... so \\boxed{23}", "23", 1.0),
        ("\\boxed{24}", "23", 0.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{2}{4}}", "\\frac12", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
        ("\\boxed{-7}", "-7", 1.0),
        ("\\boxed{ -7 }", "-7", 1.0),
        ("\\boxed{-7}", "7", 0.0),
        ("\\boxed{7}", "-7", 0.0),
        ("\\boxed{(1,2)}", "(1, 2)", 1.0),
        ("\\boxed{1+x^2}", "x^2+1", 1.0),
        ("\\fbox{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{23} wait, no: \\boxed{24}", "23", 0.0),
        ("\\boxed{24} wait, no: \\boxed{23}", "23", 1.0),
    ],
)
def test_grade_single(grader: Grader, response: str, reference: str, reward: float) -> None:
    assert grader.grade([response], [reference]) == GradeResult(rewards=[reward], timeouts=0, unparsed=0)


@pytest.mark.unit
def test_unboxed_empty_and_oversized_answers_are_unparsed(grader: Grader) -> None:
    responses = [
        "the answer is 23",
        "\\boxed{}",
        "\\boxed{  }",
        "\\boxed{23",
        "\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}",
        "\\boxed{" + "9" * 1_000_000 + "}",
        "\\boxed{23}",
    ]
    result = grader.grade(responses, ["23"] * len(responses))
    assert result == GradeResult(rewards=[0.0] * 6 + [1.0], timeouts=0, unparsed=6)


@pytest.mark.unit
def test_batch_with_duplicates_and_non_string_inputs(grader: Grader) -> None:
    responses = ["\\boxed{0.5}", "\\boxed{0.5}", "\\boxed{3}", None, "\\boxed{12}", "\\boxed{0.5}"]
    references = ["\\frac12", "\\frac12", "\\frac12", "1", 12, "0.25"]
    result = grader.grade(responses, references)  # type: ignore[arg-type]
    assert result == GradeResult(rewards=[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], timeouts=0, unparsed=1)


@pytest.mark.unit
def test_empty_batch_and_length_mismatch(grader: Grader) -> None:
    assert grader.grade([], []) == GradeResult(rewards=[], timeouts=0, unparsed=0)
    with pytest.raises(ValueError):
        grader.grade(["\\boxed{1}"], [])


@pytest.mark.unit
def test_exact_matches_and_unparsed_never_start_a_worker() -> None:
    before = workers()
    with Grader() as g:
        result = g.grade(["\\boxed{ 23 }", "\\boxed{x^2}", "23"], ["23", " x^2 ", "23"])
        assert result == GradeResult(rewards=[1.0, 1.0, 0.0], timeouts=0, unparsed=1)
        assert workers() == before


# --- Grader: hostile inputs and timeouts -----------------------------------------------------------


@pytest.mark.integration
def test_hostile_answer_times_out_without_output(capfd: pytest.CaptureFixture[str]) -> None:
    with Grader(timeout_s=2) as g:  # a fresh worker, so that it writes to capfd's stderr
        g.grade(["\\boxed{0.5}"], ["\\frac12"])
        start = time.monotonic()
        result = g.grade([HOSTILE], ["1"])
        elapsed = time.monotonic() - start
    assert result.rewards == [0.0]
    assert elapsed < 30
    # a timeout takes at least timeout_s; a quick False would be fine too
    assert result.timeouts == int(elapsed >= 2)
    assert capfd.readouterr() == ("", "")


@pytest.mark.integration
def test_hostile_item_does_not_spoil_the_batch(grader: Grader) -> None:
    responses = ["\\boxed{23}", HOSTILE, "\\boxed{0.5}", "\\boxed{24}", HOSTILE, "\\boxed{\\frac{2}{4}}"]
    references = ["23", "1", "\\frac{1}{2}", "23", "1", "\\frac{1}{2}"]
    start = time.monotonic()
    result = grader.grade(responses, references)
    assert time.monotonic() - start < 30
    assert result.rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert result.timeouts in (0, 2)  # identical items share one grading
    assert result.unparsed == 0


@pytest.mark.integration
def test_overrun_kills_and_replaces_the_worker() -> None:
    # math-verify's own timeout is whole seconds (1 s here), so the parent's deadline (0.75 s) strikes first
    with Grader(timeout_s=0.25) as g:
        before = workers()
        g.grade(["\\boxed{0.5}"], ["\\frac12"])
        (first,) = workers() - before
        start = time.monotonic()
        result = g.grade([HOSTILE, "\\boxed{0.5}", "\\boxed{3}"], ["1", "\\frac{1}{2}", "4"])
        assert time.monotonic() - start < 30
        assert result == GradeResult(rewards=[0.0, 1.0, 0.0], timeouts=1, unparsed=0)
        assert not first.is_alive()
        assert first.exitcode is not None  # reaped
        (second,) = workers() - before
        assert second.pid != first.pid


@pytest.mark.integration
def test_dead_worker_is_replaced() -> None:
    before = workers()
    with Grader(timeout_s=2) as g:
        g.grade(["\\boxed{0.5}"], ["\\frac12"])
        (worker,) = workers() - before
        worker.kill()
        worker.join()
        assert g.grade(["\\boxed{0.5}", "\\boxed{2}"], ["\\frac12", "3"]).rewards == [1.0, 0.0]
        assert len(workers() - before) == 1


@pytest.mark.integration
def test_grading_from_a_non_main_thread(grader: Grader) -> None:
    responses = ["\\boxed{0.5}", HOSTILE, "\\boxed{-3}", "no box"]
    references = ["\\frac12", "1", "-3.0", "1"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: grader.grade(responses, references), range(2)))
    for result in results:
        assert result.rewards == [1.0, 0.0, 1.0, 0.0]
        assert result.unparsed == 1


# --- lifecycle -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_close_stops_the_worker_and_grading_restarts_it() -> None:
    before = workers()
    g = Grader(timeout_s=2)
    g.grade(["\\boxed{0.5}"], ["\\frac12"])
    (worker,) = workers() - before
    g.close()
    assert not worker.is_alive()
    assert worker.exitcode == 0  # left on request, not killed
    assert workers() == before
    g.close()  # idempotent
    with g:
        assert g.grade(["\\boxed{0.5}"], ["\\frac12"]).rewards == [1.0]
        assert len(workers() - before) == 1
    assert workers() == before


HOSTILE_BATCH = [
    "\\boxed{9^{9^{9^{9}}}}",  # a power tower sympy would try to evaluate
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # 10,000-deep braces
    "x" * 1_000_000 + "\\boxed{" + "7" * 1_000_000 + "}",  # 1 MB of text, 1 MB answer
    "\\boxed{\\int_0^{\\infty} e^{-x^{1000}} \\sin(x^{999})\\,dx}",  # integral sympy may chew on
    "\\boxed{\\frac{" * 500 + "1" + "}{2}" * 500 + "}",  # deep fractions
    "\\boxed{10^{10^{10^{10}}} - 10^{10^{10^{10}}}}",
]


@pytest.mark.integration
def test_hostile_batch_grades_zero_within_its_time_budget() -> None:
    """Every hostile answer gets reward 0, either unparsed (capped cheaply) or timed out; nothing hangs."""
    timeout_s = 2.0
    with Grader(timeout_s=timeout_s) as grader:
        start = time.monotonic()
        result = grader.grade(HOSTILE_BATCH + ["\\boxed{3}"], ["1"] * len(HOSTILE_BATCH) + ["3"])
        elapsed = time.monotonic() - start
    assert result.rewards == [0.0] * len(HOSTILE_BATCH) + [1.0]
    assert result.timeouts + result.unparsed <= len(HOSTILE_BATCH)
    # wall-clock guard: at most timeout + slack per item, plus worker restarts
    assert elapsed < len(HOSTILE_BATCH) * (timeout_s + 1.5) + 10, elapsed
