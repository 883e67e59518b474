"""The execution sandbox, with real processes: hostile programs score 0 and harm nothing, forged verdicts fail,
isolation holds where the OS allows it."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from dash_exp.sandbox import Call, CallFailed, Execution, Job, Opaque, Sandbox, available_isolation
from dash_exp.tasks.base import Problem
from dash_exp.tasks.code import CodeGrader, CodeTests, extract_program

ISOLATION = available_isolation()
# f(x) = 2x + 1, tested at 5 points; the expected outputs live only in `check`, on the grader's side
TESTS = CodeTests("f", "inputs = [[0], [1], [2], [7], [-3]]",
                  "def helper(out, exp):\n    assert out == exp\n\n"
                  "def check(_outs):\n    assert len(_outs) == 5\n"
                  "    for o, e in zip(_outs, [1, 3, 5, 15, -5]):\n        helper(o, e)\n", timeout_s=2.0)
PROBLEM = Problem(prompt="", answer="", solution="def f(x):\n    return 2 * x + 1\n", tests=TESTS)
CORRECT = "```python\ndef f(x):\n    return 2 * x + 1\n```"

HOSTILE = {
    "infinite loop": "def f(x):\n    while True:\n        pass\n",
    "fork bomb": "import os\ndef f(x):\n    while True:\n        os.fork()\n",
    "10 GB": "def f(x):\n    b = bytearray(10 * 1024**3)\n    return 2 * x + 1\n",
    "1 GB of output": "import sys\ndef f(x):\n    for _ in range(1024):\n        sys.stdout.write('x' * 2**20)\n"
                      "    return 2 * x + 1\n",
    "deep recursion": "import sys\nsys.setrecursionlimit(10**9)\ndef f(x):\n    return f(x + 1)\n",
    "exit(0)": "exit(0)\ndef f(x):\n    return 0\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SystemExit before the tests": "def f(x):\n    raise SystemExit(0)\n",
    "a fake success marker": "print('PASSED: all tests')\nimport sys\nsys.stdout.flush()\ndef f(x):\n    return 0\n",
    "patched test helpers": "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
                            "def helper(out, exp):\n    pass\ndef check(_outs):\n    pass\ndef f(x):\n    return 0\n",
    "an always-equal object": "class Eq:\n    def __eq__(self, other):\n        return True\n"
                              "    def __ne__(self, other):\n        return False\n"
                              "def f(x):\n    return Eq()\n",
    "an int subclass that equals everything": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                              "def f(x):\n    return I(0)\n",
    "a syntax error": "def f(x) return x\n",
}


@pytest.fixture(scope="module")
def grader():
    g = CodeGrader(Sandbox(workers=2))
    yield g
    g.close()


def run_once(program: str) -> Execution:
    """`f(0)` of one program in a server of its own (started now: it sees the environment as it is now)."""
    sandbox = Sandbox(workers=1)
    try:
        return sandbox.run([Job(program, "f", "inputs = [[0]]")])[0]
    finally:
        sandbox.close()


def grade(grader: CodeGrader, programs: list[str]):
    return grader.grade(programs, [PROBLEM] * len(programs))


def test_a_correct_program_passes_and_a_wrong_one_fails(grader):
    result = grade(grader, [CORRECT, "```python\ndef f(x):\n    return 2 * x\n```"])
    assert result.rewards == [1.0, 0.0]
    assert result.counts["wrong"] == 1


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_or_forged_program_scores_zero_and_harms_nothing(grader, name):
    start = time.monotonic()
    result = grade(grader, [HOSTILE[name]])
    assert result.rewards == [0.0], name
    # nobody waits beyond the program's own limit (plus start-up)
    assert time.monotonic() - start < TESTS.timeout_s + 10
    # the trainer process and the sandbox are still fine: a correct program passes right after
    assert grade(grader, [CORRECT]).rewards == [1.0]


def test_a_fork_bomb_leaves_no_process_behind(grader):
    if not grader.sandbox.info.get("pid_ns"):
        grade(grader, [CORRECT])
    if not (grader.sandbox.info.get("nobody") and grader.sandbox.info.get("pid_ns")):
        pytest.skip("needs programs to run as nobody in PID namespaces of their own")
    grade(grader, [HOSTILE["fork bomb"]])
    deadline = time.monotonic() + 10  # the kernel kills the namespace's processes once its first one is gone
    while time.monotonic() < deadline:
        left = subprocess.run(["ps", "-u", "nobody", "-o", "pid="], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert left == [], subprocess.run(["ps", "-u", "nobody", "-o", "pid,stat,cmd"], capture_output=True,
                                      text=True).stdout


def test_a_mixed_batch_grades_the_correct_programs_correctly_in_order(grader):
    hostile = list(HOSTILE.values())
    programs = [p for h in hostile for p in (h, CORRECT)]
    result = grade(grader, programs)
    assert result.rewards == [0.0, 1.0] * len(hostile)


def test_outcomes_are_counted_by_kind(grader):
    result = grade(grader, [HOSTILE["infinite loop"], HOSTILE["a syntax error"], "def f(x):\n    return 1 / 0\n",
                            "def f(x):\n    return 0\n", CORRECT])
    assert result.rewards == [0, 0, 0, 0, 1]
    assert result.counts == {"no_code_block": 4, "syntax_error": 1, "timeout": 1, "runtime_error": 1, "wrong": 1}
    assert (result.timeouts, result.unparsed) == (1, 1)


def test_values_come_back_as_plain_data_and_objects_as_opaque():
    sandbox = Sandbox(workers=1)
    try:
        program = ("import numpy as np, re\n"
                   "def f(x):\n    return [(x, 1.5), {1, 2}, {'k': frozenset([3])}, 2**200, float('inf'), 1j,\n"
                   "            b'ab', np.arange(3) * x, np.float64(0.5), re.match('a', 'a'), None]\n"
                   "def g(x):\n    raise ValueError(x)\n")
        ok, = sandbox.run([Job(program, "f", "inputs = [[2]]")])
        raised, = sandbox.run([Job(program, "g", "inputs = [[2]]")])
    finally:
        sandbox.close()
    value = ok.outputs[0]
    assert value[:7] == [(2, 1.5), {1, 2}, {"k": frozenset([3])}, 2**200, float("inf"), 1j, b"ab"]
    assert value[7].tolist() == [0, 2, 4] and value[8] == 0.5
    assert isinstance(value[9], Opaque) and value[9] != value[9].__class__("Match") and value[10] is None
    assert isinstance(raised.outputs[0], CallFailed) and raised.outputs[0].reason == "ValueError"


def test_a_driver_calls_the_candidate_and_each_call_is_recorded_with_its_arguments_before_the_call():
    """drive(candidate): inputs that depend on earlier results; arguments are captured before the candidate can
    mutate them; the driver's own failed assert ends the recording (the grader's replay then runs short)."""
    program = "def f(xs):\n    xs.append(len(xs))\n    return list(xs)\n"
    driver = "def drive(candidate):\n    out = candidate([])\n    out = candidate(out)\n    assert out == 'x'\n" \
             "    candidate(out)\n"
    sandbox = Sandbox(workers=1)
    try:
        run, = sandbox.run([Job(program, "f", driver)])
        raised, = sandbox.run([Job("def f(xs):\n    raise KeyError(xs)\n", "f", driver)])
    finally:
        sandbox.close()
    assert run.status == "ok" and run.outputs == [Call(([],), [0]), Call(([0],), [0, 1])]
    assert len(raised.outputs) == 1 and raised.outputs[0].args == ([],)
    assert isinstance(raised.outputs[0].value, CallFailed) and raised.outputs[0].value.reason == "KeyError"


def test_the_program_cannot_write_outside_its_directory_nor_read_the_parents_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("DASH_EXP_TEST_SECRET", "s3cret")
    target = tmp_path / "escaped.txt"
    program = (f"import os\ndef f(x):\n    try:\n        open({str(target)!r}, 'w').write('x')\n"
               "        wrote = 'wrote'\n    except OSError as exc:\n        wrote = type(exc).__name__\n"
               "    open('inside.txt', 'w').write('ok')\n"
               "    return wrote, os.environ.get('DASH_EXP_TEST_SECRET'), open('inside.txt').read()\n")
    wrote, secret, inside = run_once(program).outputs[0]
    assert secret is None, "the parent's environment reached the program"
    assert inside == "ok", "the program can use its own working directory"
    if ISOLATION == "none":
        pytest.skip("no isolation on this machine: writes outside the working directory are not prevented")
    assert wrote != "wrote" and not target.exists()


def test_the_program_cannot_open_a_network_connection():
    """Under the isolation this machine allows (printed): a listener on the host's loopback is unreachable."""
    print(f"sandbox isolation on this machine: {ISOLATION}")
    if ISOLATION == "none":
        pytest.skip("no network namespace available on this machine")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    program = ("import socket\ndef f(x):\n    s = socket.socket()\n    s.settimeout(2)\n    try:\n"
               f"        s.connect(('127.0.0.1', {port}))\n        return 'connected'\n"
               "    except OSError as exc:\n        return type(exc).__name__\n")
    try:
        run = run_once(program)
    finally:
        listener.close()
    assert run.status == "ok" and run.outputs[0] != "connected", run


def test_a_dead_server_is_restarted():
    sandbox = Sandbox(workers=1)
    try:
        assert sandbox.run([Job("def f(x):\n    return x\n", "f", "inputs = [[1]]")])[0].outputs == [1]
        os.killpg(sandbox._proc.pid, 9)
        sandbox._proc.wait()
        assert sandbox.run([Job("def f(x):\n    return x\n", "f", "inputs = [[2]]")])[0].outputs == [2]
    finally:
        sandbox.close()


@pytest.mark.parametrize(("response", "program", "fenced"), [
    ("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```\n", "b = 2\n", True),
    ("```\nc = 3\n```", "c = 3\n", True),
    ("```python\nd = 4\n```\n```\ne = 5\n```", "d = 4\n", True),
    ("def f(x):\n    return x", "def f(x):\n    return x", False),
])
def test_the_program_is_the_last_python_block_else_the_last_block_else_the_text(response, program, fenced):
    assert extract_program(response) == (program, fenced)
