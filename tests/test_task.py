"""The arithmetic task (fixed splits, true answers, CoT traces, grading) and the checkpointable problem stream."""

import random
import re

import pytest

from dash_exp.config import ConfigError, TaskConfig
from dash_exp.tasks.arithmetic import chain_value, cot_trace, make_problem, make_splits, prompt_of
from dash_exp.tasks.base import ProblemStream
from dash_exp.tasks.registry import build_task

pytestmark = pytest.mark.unit

# a noisy slip can push later running values below 0, so a and the result may be negative
STEP = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Numbers and operators of a prompt like ``37+25-18=?\\n`` (independent of the generator's code)."""
    assert prompt.endswith("=?\n"), prompt
    tokens = re.findall(r"\d+|[+-]", prompt[: -len("=?\n")])
    assert "".join(tokens) == prompt[: -len("=?\n")], prompt
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def true_value(prompt: str) -> int:
    numbers, ops = parse_prompt(prompt)
    value = numbers[0]
    for op, b in zip(ops, numbers[1:], strict=True):
        value = value + b if op == "+" else value - b
    return value


def parse_trace(trace: str) -> tuple[list[tuple[int, str, int, int]], str]:
    """(a, op, b, claimed result) per step line, and the final ``\\boxed{...}`` content."""
    *lines, last = trace.split("\n")
    steps = []
    for line in lines:
        m = STEP.fullmatch(line)
        assert m, f"malformed step line {line!r} in {trace!r}"
        steps.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    m = re.fullmatch(r"\\boxed\{(-?\d+)\}", last)
    assert m, f"trace does not end with \\boxed{{int}}: {trace!r}"
    return steps, m[1]


def check_chain(steps, numbers, ops) -> list[bool]:
    """Assert the trace walks the prompt's chain (each step starts from the previous claimed result);
    return per step whether its claimed result is arithmetically right."""
    assert len(steps) == len(ops)
    value = numbers[0]
    right = []
    for (a, op, b, c), want_op, want_b in zip(steps, ops, numbers[1:], strict=True):
        assert (a, op, b) == (value, want_op, want_b)
        right.append(c == (a + b if op == "+" else a - b))
        value = c
    return right


def cfg(**kw) -> TaskConfig:
    return TaskConfig(name="arith", **{"n_train": 300, "n_test": 60, "min_terms": 2, "max_terms": 5, **kw})


# ------------------------------------------------------------------ splits and problems
def test_splits_are_fixed_by_seed_sized_and_disjoint():
    train, test = make_splits(cfg())
    again_train, again_test = make_splits(cfg())
    assert (train, test) == (again_train, again_test)
    assert len(train) == 300 and len(test) == 60
    train_prompts, test_prompts = {p.prompt for p in train}, {p.prompt for p in test}
    assert len(train_prompts) == 300 and len(test_prompts) == 60  # no duplicate prompts within a split
    assert not train_prompts & test_prompts
    other_train, other_test = make_splits(cfg(seed=1))
    assert other_train != train and other_test != test
    assert len(other_train) == 300 and len(other_test) == 60
    # sizes follow the config, including an empty test split
    small_train, small_test = make_splits(cfg(n_train=5, n_test=0))
    assert len(small_train) == 5 and small_test == []


def test_splits_larger_than_the_chain_space_raise_a_clear_error():
    # 2-term chains of numbers up to 3: 16 sums and 10 differences, 26 distinct prompts
    train, test = make_splits(cfg(min_terms=2, max_terms=2, max_value=3, n_train=20, n_test=6))
    assert len({p.prompt for p in train + test}) == 26
    with pytest.raises(ConfigError, match=r"task.n_train \+ task.n_test = 27: only 26 distinct chains of 2-2 numbers"):
        make_splits(cfg(min_terms=2, max_terms=2, max_value=3, n_train=21, n_test=6))


def test_problems_answer_the_prompt_chain_within_config_bounds():
    train, test = make_splits(cfg(max_value=20))
    for p in train + test:
        numbers, ops = parse_prompt(p.prompt)
        assert 2 <= len(numbers) <= 5
        assert all(0 <= n <= 20 for n in numbers)
        assert p.answer == str(true_value(p.prompt))
        assert p.solution == f"\\boxed{{{p.answer}}}"
        assert p.worked == cot_trace(numbers, ops)  # the worked solution a chat exemplar shows
        # the running value never goes negative
        value = numbers[0]
        for op, b in zip(ops, numbers[1:], strict=True):
            value = value + b if op == "+" else value - b
            assert value >= 0, p.prompt
        assert prompt_of(numbers, ops) == p.prompt and chain_value(numbers, ops) == int(p.answer)
    lengths = {len(parse_prompt(p.prompt)[0]) for p in train}
    assert lengths == {2, 3, 4, 5}  # min_terms..max_terms all occur


def test_noiseless_cot_trace_is_correct_step_by_step():
    train, test = make_splits(cfg())
    rng = random.Random(0)
    for p in train + test:
        numbers, ops = parse_prompt(p.prompt)
        for trace in (cot_trace(numbers, ops), cot_trace(numbers, ops, rng, noise=0.0)):
            steps, boxed = parse_trace(trace)
            assert all(check_chain(steps, numbers, ops)), trace
            assert boxed == p.answer
            assert trace.endswith(f"\\boxed{{{p.answer}}}")


def test_fully_noisy_cot_trace_has_one_slip_that_propagates():
    """noise=1.0 puts the slip in exactly one step; later steps are right from the slipped value, so the boxed
    answer is wrong. The slip is clamped at 0, so it vanishes iff the slipped step's true result is 0 and the
    drawn delta is negative: then the trace is fully correct."""
    rng = random.Random(7)
    problem_rng = random.Random(11)
    wrong = vanished = 0
    for _ in range(2000):
        problem, numbers, ops = make_problem(problem_rng, cfg())
        steps, boxed = parse_trace(cot_trace(numbers, ops, rng, noise=1.0))
        right = check_chain(steps, numbers, ops)
        if all(right):
            vanished += 1
            assert boxed == problem.answer
            # only possible when some step's true result is 0 (clamped slip)
            partial = [chain_value(numbers[: i + 2], ops[: i + 1]) for i in range(len(ops))]
            assert 0 in partial
        else:
            wrong += 1
            assert right.count(False) == 1
            slipped = right.index(False)
            a, op, b, c = steps[slipped]
            true = a + b if op == "+" else a - b
            assert c >= 0 and c - true in (-10, -2, -1, 1, 2, 10) or (c == 0 and true < 10)
            assert boxed != problem.answer
            assert int(boxed) - int(problem.answer) == c - true  # the slip propagates unchanged
    assert wrong > 0.9 * 2000, (wrong, vanished)


def test_noise_is_probabilistic():
    rng = random.Random(3)
    problem_rng = random.Random(4)
    slipped = 0
    for _ in range(1000):
        problem, numbers, ops = make_problem(problem_rng, cfg())
        _, boxed = parse_trace(cot_trace(numbers, ops, rng, noise=0.3))
        slipped += boxed != problem.answer
    assert 240 < slipped < 360  # ~30% minus the rare vanished slips


# ------------------------------------------------------------------ grading through the real task
@pytest.fixture(scope="module")
def task():
    t = build_task(TaskConfig(name="arith"))
    yield t
    t.close()


def test_build_task_uses_the_fixed_splits(task):
    train, test = make_splits(TaskConfig(name="arith"))
    assert task.name == "arith" and task.train == train and task.test == test
    with pytest.raises(ValueError, match="task.name"):
        build_task(TaskConfig(name="nope"))


def test_noiseless_traces_and_reference_solutions_score_one(task):
    traces = [cot_trace(*parse_prompt(p.prompt)) for p in task.test]
    graded = task.score(traces, task.test)
    assert graded.rewards == [1.0] * len(task.test)
    assert graded.unparsed == 0 and graded.timeouts == 0
    graded = task.score([p.solution for p in task.test], task.test)
    assert graded.rewards == [1.0] * len(task.test)
    assert graded.unparsed == 0 and graded.timeouts == 0


def test_wrong_and_unboxed_answers_score_zero(task):
    problems = task.test[:4]
    wrong = [f"\\boxed{{{int(p.answer) + 1}}}" for p in problems[:2]]
    # a trace whose last step is wrong, and a response with the right number but no \boxed{}
    numbers, ops = parse_prompt(problems[2].prompt)
    bad_trace = cot_trace(numbers, ops).rsplit("\\boxed", 1)[0] + f"\\boxed{{{int(problems[2].answer) + 10}}}"
    unboxed = f"the answer is {problems[3].answer}"
    graded = task.score([*wrong, bad_trace, unboxed], problems)
    assert graded.rewards == [0.0, 0.0, 0.0, 0.0]
    assert graded.unparsed == 1 and graded.timeouts == 0
    # mixed batch: the right one still scores 1, the unparsed count covers only the unboxed ones
    graded = task.score([problems[0].solution, "no answer", "\\boxed{}", wrong[1]], problems)
    assert graded.rewards == [1.0, 0.0, 0.0, 0.0]
    assert graded.unparsed == 2


# ------------------------------------------------------------------ ProblemStream
def test_each_epoch_is_a_permutation_and_epochs_differ():
    items = list(range(23))
    stream = ProblemStream(items, seed=5)
    epochs = [stream.next(23) for _ in range(4)]
    for e in epochs:
        assert sorted(e) == items
    assert len({tuple(e) for e in epochs}) == 4
    assert epochs[0] != items  # shuffled
    # crossing epoch boundaries with odd batch sizes gives the same sequence
    other = ProblemStream(items, seed=5)
    flat = []
    while len(flat) < 4 * 23:
        flat += other.next(min(7, 4 * 23 - len(flat)))
    assert flat == [x for e in epochs for x in e]
    # another seed, another order
    assert ProblemStream(items, seed=6).next(23) != epochs[0]


def test_epoch_is_fractional_consumption():
    stream = ProblemStream(list("abcdefghij"), seed=0)
    assert stream.epoch == 0.0
    stream.next(4)
    assert stream.epoch == pytest.approx(0.4)
    stream.next(11)
    assert stream.epoch == pytest.approx(1.5)
    assert stream.state_dict() == {"consumed": 15}


@pytest.mark.parametrize("cut", [0, 3, 10, 17, 40])
def test_state_dict_resumes_the_exact_continuation(cut):
    items = [f"p{i}" for i in range(10)]
    uninterrupted = ProblemStream(items, seed=9)
    head = uninterrupted.next(cut)
    tail = uninterrupted.next(25)
    first = ProblemStream(items, seed=9)
    assert first.next(cut) == head
    state = first.state_dict()
    resumed = ProblemStream(items, seed=9)
    resumed.next(3)  # a fresh stream that has already moved on (or read its order) is overridden by the state
    resumed.load_state_dict(state)
    assert resumed.epoch == pytest.approx(cut / 10)
    assert resumed.next(25) == tail


def test_empty_items_raise():
    with pytest.raises(ValueError, match="no items"):
        ProblemStream([], seed=0)


# ------------------------------------------------------------------ restated steps (response length can move)
def test_restated_steps_repeat_their_line_and_keep_the_chain():
    """restate=1 writes every step twice in a row, a slip included; without the repeats the trace walks the
    prompt's chain as before, so restating changes the length and nothing else."""
    rng, problem_rng = random.Random(6), random.Random(5)
    for noise in (0.0, 1.0):
        for _ in range(300):
            problem, numbers, ops = make_problem(problem_rng, cfg())
            *lines, boxed = cot_trace(numbers, ops, rng, noise=noise, restate=1.0).split("\n")
            assert len(lines) == 2 * len(ops) and lines[0::2] == lines[1::2]
            steps, answer = parse_trace("\n".join([*lines[0::2], boxed]))
            right = check_chain(steps, numbers, ops)
            assert answer == str(steps[-1][3])
            if noise == 0.0:
                assert all(right) and answer == problem.answer


def test_warmup_traces_of_one_problem_differ_in_length_at_the_configured_rate():
    from dash_exp.tasks.arithmetic import warmup_examples

    examples = warmup_examples(cfg(min_terms=3, max_terms=3), 2000, noise=0.0, seed=0, restate=0.3)
    repeats = [sum(a == b for a, b in zip(r.split("\n"), r.split("\n")[1:], strict=False)) for _, r in examples]
    assert abs(sum(repeats) / (2 * len(examples)) - 0.3) < 0.02  # 2 steps per 3-term chain, each restated at 0.3
    assert {0, 1, 2} <= set(repeats)
    rng = random.Random(1)
    lengths = {len(cot_trace([5, 7, 3], ["+", "-"], rng, restate=0.5)) for _ in range(50)}
    assert len(lengths) == 3  # no, one or two restated steps
    assert warmup_examples(cfg(), 50, 0.2, 3) == warmup_examples(cfg(), 50, 0.2, 3, restate=0.0)
