"""The execution sandbox, with real processes, in every isolation mode this machine offers (as root: `root` and
`user`, the mode every user without root gets): hostile programs score 0 and harm nothing, forged verdicts and
forged reply frames fail, programs reach neither the trainer, its files, the server nor each other."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import descendants

from dash_exp.sandbox import (
    Call,
    CallFailed,
    Execution,
    Job,
    Opaque,
    Sandbox,
    _read_frame,
    available_isolation,
    available_isolations,
)
from dash_exp.tasks.base import Problem
from dash_exp.tasks.code import CodeGrader, CodeTests, extract_program

ISOLATION = available_isolation()
# the hostile suite runs in each mode this machine offers; "none" only where no namespace is available at all
MODES = available_isolations() or ["none"]
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

# a program that writes forged reply frames (the passing outputs of f for every id up to 300, in today's JSON
# framing, then a frame in the pickle framing of earlier versions whose pickle creates `canary` when unpickled) into
# every /proc/<pid>/fd/* of another process that it can open: the server's stdout is the channel back to the trainer
# (only preloaded modules: as `nobody` it may not import others)
FORGER = r"""
import json, os, struct

def frames():
    outputs = json.dumps({{'status': 'ok', 'outputs': [{{'v': v}} for v in [1, 3, 5, 15, -5]]}}).encode()
    for i in range(300):
        head = json.dumps({{'id': i, 'status': 'ok', 'seconds': 0.0, 'exit': 0}}).encode()
        yield struct.pack('>II', len(head), len(outputs)) + head + outputs
    yield struct.pack('>I', len({pickled!r})) + {pickled!r}

def forge():
    reached, me = [], str(os.getpid())
    try:
        pids = [p for p in os.listdir('/proc') if p.isdigit() and p != me]
    except OSError:
        pids = []
    for pid in pids:
        try:
            fds = os.listdir(f'/proc/{{pid}}/fd')
        except OSError:
            continue
        for fd in fds:
            try:
                out = os.open(f'/proc/{{pid}}/fd/{{fd}}', os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                for frame in frames():
                    os.write(out, frame)
                reached.append(f'{{pid}}/{{fd}}')
            except OSError:
                pass
            finally:
                os.close(out)
    return reached

REACHED = forge()

def f(x):
    return {body}
"""


class Canary:
    """Unpickled, it creates the file `path`: the earlier versions' client unpickled every reply frame."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def forger(canary: Path, body: str) -> str:
    frame = pickle.dumps({"id": 0, "status": "ok", "payload": Canary(canary), "seconds": 0.0, "exit": 0})
    return FORGER.format(pickled=frame, body=body)


@pytest.fixture(scope="module", params=MODES)
def grader(request):
    g = CodeGrader(Sandbox(workers=2, isolation=request.param))
    yield g
    g.close()


def run_once(program: str, isolation: str = "auto") -> Execution:
    """`f(0)` of one program in a server of its own (started now: it sees the environment as it is now)."""
    sandbox = Sandbox(workers=1, isolation=isolation)
    try:
        return sandbox.run([Job(program, "f", "inputs = [[0]]")])[0]
    finally:
        sandbox.close()


def confinement(grader: CodeGrader) -> dict:
    """What the grader's server confines its programs with (started if it was not)."""
    grader.sandbox.run([Job("x = 1\n", "x", "inputs = []")])
    return grader.sandbox.info


def needs(grader: CodeGrader, *what: str) -> None:
    """Skip where the server lacks any of `what` (program_ns, landlock, seccomp): without them these programs
    would reach this machine's own processes and files, which the test must not let them do."""
    missing = [w for w in what if not confinement(grader).get(w)]
    if missing:
        pytest.skip(f"this machine's {grader.sandbox.isolation} sandbox has no {', '.join(missing)}")


def grade(grader: CodeGrader, programs: list[str]):
    return grader.grade(programs, [PROBLEM] * len(programs))


def survivors(server: subprocess.Popen, before: list[int]) -> list[int]:
    """The processes below this sandbox's own server (never another sandbox's, nor another test run's on this
    machine) that were not there `before` and are still alive 10 s on (the kernel kills a program's PID namespace
    once its first process is gone, and the server reaps the orphans twice a second)."""
    deadline = time.monotonic() + 10
    while True:
        new = sorted(set(descendants(server.pid)) - set(before))
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_correct_program_passes_and_a_wrong_one_fails(grader):
    result = grade(grader, [CORRECT, "```python\ndef f(x):\n    return 2 * x\n```"])
    assert result.rewards == [1.0, 0.0]
    assert result.counts["wrong"] == 1


@pytest.mark.integration
@pytest.mark.sandbox
@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_or_forged_program_scores_zero_and_harms_nothing(grader, name):
    start = time.monotonic()
    result = grade(grader, [HOSTILE[name]])
    assert result.rewards == [0.0], name
    # nobody waits beyond the program's own limit (plus start-up)
    assert time.monotonic() - start < TESTS.timeout_s + 10
    # the trainer process and the sandbox are still fine: a correct program passes right after
    assert grade(grader, [CORRECT]).rewards == [1.0]


@pytest.mark.unit
@pytest.mark.sandbox
@pytest.mark.parametrize("honest", ["wrong", "right"])
def test_a_program_forging_reply_frames_scores_as_its_own_outputs_deserve_and_runs_nothing_here(grader, tmp_path,
                                                                                                honest):
    needs(grader, "program_ns")  # without its own /proc the forger would write into this user's processes
    canary = tmp_path / "canary"
    program = forger(canary, "0" if honest == "wrong" else "2 * x + 1")
    server = grader.sandbox._proc
    result = grade(grader, [program, CORRECT, "def f(x):\n    return 0\n"])  # no exception here
    assert result.rewards == [0.0 if honest == "wrong" else 1.0, 1.0, 0.0]
    assert not canary.exists(), "a forged frame ran code in the trainer"
    if server is not None:
        assert grader.sandbox._proc is server, "a forged frame reached the client (the server was restarted)"
    assert grade(grader, [CORRECT]).rewards == [1.0]


@pytest.mark.unit
@pytest.mark.sandbox
def test_the_forger_reaches_no_descriptor_of_the_server_or_the_trainer(grader, tmp_path):
    """What the forger above could open: no descriptor of another process (its namespace's /proc shows no other,
    and Landlock closes /proc where there is no namespace)."""
    needs(grader, "program_ns")
    run, = grader.sandbox.run([Job(forger(tmp_path / "canary", "REACHED"), "f", "inputs = [[0]]")])
    assert run.status == "ok", run
    assert run.outputs[0] == [], f"the program opened other processes' descriptors: {run.outputs[0]}"


@pytest.mark.unit
@pytest.mark.sandbox
def test_no_descriptor_of_the_server_survives_into_a_program(grader):
    """A program holds stdin (/dev/null), stdout and stderr (its capped file) and its result pipe: never the
    server's pipes to and from the trainer."""
    program = ("import os\ndef f(x):\n    links = {}\n    for fd in os.listdir('/proc/self/fd'):\n"
               "        try:\n            links[int(fd)] = os.readlink(f'/proc/self/fd/{fd}')\n"
               "        except OSError:\n            pass  # the listing's own descriptor, closed by now\n"
               "    return links\n")
    run, = grader.sandbox.run([Job(program, "f", "inputs = [[0]]")])
    assert run.status == "ok", run
    links = run.outputs[0]
    server = grader.sandbox._proc
    channel = {f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (server.stdin, server.stdout)}
    assert not channel & set(links.values()), links
    assert links[0] == "/dev/null" and links[1] == links[2] and links[1].endswith("/.output"), links
    assert len([v for v in links.values() if v.startswith("pipe:")]) == 1, links  # its own result pipe only


def reader(paths: list[Path]) -> str:
    """A program whose f returns each file's text, or the name of the error opening it."""
    return ("def f(x):\n    out = []\n"
            f"    for path in {[str(p) for p in paths]!r}:\n"
            "        try:\n            out.append(open(path).read())\n"
            "        except OSError as exc:\n            out.append(type(exc).__name__)\n    return out\n")


@pytest.fixture
def secrets(tmp_path):
    """Files a program must not read: a 0600 file of the trainer's user, a file under the trainer's $HOME and a
    metrics file in a run directory, each (but the first) readable by every user as far as permissions go."""
    run_dir = Path(tempfile.mkdtemp(prefix="dash_exp_run_"))
    run_dir.chmod(0o755)
    private = run_dir / "token"
    private.write_text("s3cret-0600")
    private.chmod(0o600)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("s3cret-run")
    metrics.chmod(0o644)
    home = Path.home() / f".dash_exp_sandbox_probe_{uuid.uuid4().hex}"
    home.write_text("s3cret-home")
    home.chmod(0o644)
    try:
        yield [private, home, metrics]
    finally:
        home.unlink()
        for p in (private, metrics):
            p.unlink()
        run_dir.rmdir()


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_program_reads_no_file_of_the_trainers_user(grader, secrets):
    needs(grader, "landlock")  # the run dir's files are world-readable: only Landlock keeps them closed
    program = reader(secrets)
    run, = grader.sandbox.run([Job(program, "f", "inputs = [[0]]")])
    assert run.status == "ok", run
    assert not any("s3cret" in v for v in run.outputs[0]), run.outputs
    assert grade(grader, [CORRECT]).rewards == [1.0]


@pytest.mark.unit
@pytest.mark.sandbox
def test_without_namespaces_landlock_still_keeps_the_trainers_files_closed(secrets):
    """isolation=none (no namespaces): where the kernel has Landlock, the same files stay out of reach."""
    from dash_exp.sandbox.confine import landlock_abi

    if not landlock_abi():
        pytest.skip("no Landlock on this kernel: isolation=none holds back nothing but the environment")
    program = reader(secrets)
    run = run_once(program, isolation="none")
    assert run.status == "ok" and run.outputs[0] == ["PermissionError"] * 3, run


@pytest.mark.unit
@pytest.mark.sandbox
def test_isolation_none_still_runs_with_its_warning_and_auto_never_picks_it_where_a_namespace_exists(caplog):
    with caplog.at_level(logging.WARNING, logger="dash_exp.sandbox"):
        run = run_once("def f(x):\n    return x + 1\n", isolation="none")
    assert run.status == "ok" and run.outputs == [1]
    assert "no namespaces available" in caplog.text
    sandbox = Sandbox(workers=1)
    try:
        assert sandbox.run([Job("def f(x):\n    return x\n", "f", "inputs = [[2]]")])[0].outputs == [2]
        assert sandbox.isolation == (available_isolations() or ["none"])[0]
        assert MODES == ["none"] or sandbox.isolation != "none"
    finally:
        sandbox.close()


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_program_cannot_connect_to_a_unix_socket_of_the_trainers_user(grader):
    """A session bus, an ssh agent or a docker socket is a Unix socket with a path: Landlock does not govern
    connecting to one, and in user mode the program has the trainer's uid. A listener anyone may connect to (the
    socket and its directory open to all) stays out of reach, and the program still gets other sockets."""
    import socket as sockets

    needs(grader, "seccomp")
    where = Path(tempfile.mkdtemp(prefix="dash_exp_sock_"))
    where.chmod(0o755)
    path = where / "bus"
    listener = sockets.socket(sockets.AF_UNIX)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen()
    program = ("import socket\ndef f(x):\n    try:\n        s = socket.socket(socket.AF_UNIX)\n"
               f"        s.connect({str(path)!r})\n        return 'connected'\n"
               "    except OSError as exc:\n        out = type(exc).__name__\n"
               "    socket.socket(socket.AF_INET).close()\n    return out\n")
    try:
        run, = grader.sandbox.run([Job(program, "f", "inputs = [[0]]")])
    finally:
        listener.close()
        path.unlink()
        where.rmdir()
    assert run.status == "ok" and run.outputs[0] == "PermissionError", run


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_program_that_signals_every_pid_it_sees_reaches_only_its_own(grader):
    needs(grader, "program_ns")  # without a PID namespace of its own it would signal this user's processes
    program = ("import os, signal\ndef f(x):\n    me = os.getpid()\n"
               "    try:\n        seen = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
               "    except OSError:\n        seen = []\n"
               "    for pid in seen + list(range(2, 400)):\n"
               "        if pid != me:\n            try:\n                os.kill(pid, signal.SIGKILL)\n"
               "            except OSError:\n                pass\n"
               "    return me, [p for p in seen if p != me]\n")
    server = grader.sandbox._proc
    run, = grader.sandbox.run([Job(program, "f", "inputs = [[0]]")])
    assert run.status == "ok", run
    assert run.outputs[0][1] == [], f"the program saw other processes: {run.outputs[0]}"
    assert server is None or server.poll() is None and grader.sandbox._proc is server, "the server was killed"
    assert grade(grader, [CORRECT]).rewards == [1.0]


@pytest.mark.integration
@pytest.mark.sandbox
def test_a_program_cannot_read_another_programs_working_directory_while_both_run(grader):
    secret = uuid.uuid4().hex
    writer = (f"import time\ndef f(x):\n    open('mine.txt', 'w').write({secret!r})\n"
              "    time.sleep(1.5)\n    return 'done'\n")
    reader = ("import os, time\ndef f(x):\n    time.sleep(0.5)\n    found = []\n"
              "    try:\n        pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
              "    except OSError:\n        pids = []\n"
              "    tops = ['/dev/shm', '/tmp', '/var/tmp', '..', '../..'] + [f'/proc/{p}/cwd' for p in pids]\n"
              "    tops += [f'/proc/{p}/root/dev/shm' for p in pids]\n"
              "    for top in tops:\n"
              "        for root, _, files in os.walk(top):\n"
              "            for name in files:\n"
              "                try:\n                    found.append(open(os.path.join(root, name)).read(100))\n"
              "                except (OSError, ValueError):\n                    pass\n"
              "    return found\n")
    a, b = grader.sandbox.run([Job(writer, "f", "inputs = [[0]]"), Job(reader, "f", "inputs = [[0]]")])
    assert a.status == "ok" and a.outputs == ["done"], a
    assert b.status == "ok" and secret not in str(b.outputs), b


@pytest.mark.integration
@pytest.mark.sandbox
def test_a_fork_bomb_leaves_no_process_behind(grader):
    grade(grader, [CORRECT])
    server = grader.sandbox._proc
    before = descendants(server.pid)
    grade(grader, [HOSTILE["fork bomb"]])
    assert grader.sandbox._proc is server, "the server was restarted: its processes cannot be counted"
    assert survivors(server, before) == []


@pytest.mark.integration
@pytest.mark.sandbox
def test_a_program_that_leaves_its_process_group_still_ends_at_its_limit(grader):
    """os.setsid() takes it out of the group the server kills on time: its namespace's end must still take it."""
    if not grader.sandbox.info.get("program_ns"):
        pytest.skip("needs a PID namespace per program: without one, a new session outlives its limit")
    grade(grader, [CORRECT])
    server = grader.sandbox._proc
    before = descendants(server.pid)
    run, = grader.sandbox.run([Job("import os, time\nos.setsid()\ndef f(x):\n    time.sleep(60)\n", "f",
                                   "inputs = [[0]]", 1.0)])
    assert run.status == "timeout"
    assert grader.sandbox._proc is server, "the server was restarted: its processes cannot be counted"
    assert survivors(server, before) == []


@pytest.mark.integration
@pytest.mark.sandbox
def test_a_mixed_batch_grades_the_correct_programs_correctly_in_order(grader):
    hostile = list(HOSTILE.values())
    programs = [p for h in hostile for p in (h, CORRECT)]
    result = grade(grader, programs)
    assert result.rewards == [0.0, 1.0] * len(hostile)


@pytest.mark.integration
@pytest.mark.sandbox
def test_outcomes_are_counted_by_kind(grader):
    result = grade(grader, [HOSTILE["infinite loop"], HOSTILE["a syntax error"], "def f(x):\n    return 1 / 0\n",
                            "def f(x):\n    return 0\n", CORRECT])
    assert result.rewards == [0, 0, 0, 0, 1]
    assert result.counts == {"no_code_block": 4, "syntax_error": 1, "timeout": 1, "runtime_error": 1, "wrong": 1}
    assert (result.timeouts, result.unparsed) == (1, 1)


@pytest.mark.unit
@pytest.mark.sandbox
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


@pytest.mark.unit
@pytest.mark.sandbox
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


@pytest.mark.unit
@pytest.mark.sandbox
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


@pytest.mark.unit
@pytest.mark.sandbox
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


@pytest.mark.unit
@pytest.mark.sandbox
def test_a_dead_server_is_restarted():
    sandbox = Sandbox(workers=1)
    try:
        assert sandbox.run([Job("def f(x):\n    return x\n", "f", "inputs = [[1]]")])[0].outputs == [1]
        os.killpg(sandbox._proc.pid, 9)
        sandbox._proc.wait()
        assert sandbox.run([Job("def f(x):\n    return x\n", "f", "inputs = [[2]]")])[0].outputs == [2]
    finally:
        sandbox.close()


# a stand-in for a server whose reply channel a program has reached: it answers the ready handshake, reads the
# batch's job frames, then writes what a forger could (given as Python source of one bytes expression, `ids` the
# batch's job ids, `canary` a pickle that creates the file argv[3] when unpickled) and waits for more input
_FORGED_SERVER = r"""
import json, pickle, struct, sys
class Canary:
    def __reduce__(self):
        return (open, (sys.argv[3], 'w'))
canary = pickle.dumps(Canary())
def frame(header, payload=b''):
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    return struct.pack('>II', len(head), len(payload)) + head + payload
out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(frame({'ready': True, 'program_ns': '', 'landlock': 0})); out.flush()
ids = []
for _ in range(int(sys.argv[1])):
    head, size = struct.unpack('>II', inp.read(8))
    ids.append(json.loads(inp.read(head))['id']); inp.read(size)
ok = json.dumps({'status': 'ok', 'outputs': [{'v': 1}]}).encode()
out.write(eval(sys.argv[2])); out.flush()
inp.read()
"""
FORGED_FRAMES = {
    "a header that is not JSON": "frame(b'{not json')",
    "a header that is a pickle that runs code": "frame(canary)",
    "a payload that is a pickle that runs code": "frame({'id': ids[0], 'status': 'ok', 'seconds': 0.0}, canary)",
    "a frame of the earlier pickle framing": "struct.pack('>I', len(canary)) + canary",
    "a header that is not an object": "frame([ids[0], 'ok'])",
    "an oversized header": "struct.pack('>II', 1 << 30, 0)",
    "an oversized payload": "struct.pack('>II', 2, 1 << 40) + b'{}'",
    "an unknown id": "frame({'id': ids[-1] + 7, 'status': 'ok', 'seconds': 0.0}, ok)",
    "a duplicate id": "frame({'id': ids[0], 'status': 'ok', 'seconds': 0.0}, ok) * 2",
    "an id that is not an int": "frame({'id': str(ids[0]), 'status': 'ok', 'seconds': 0.0}, ok)",
    "an unknown status": "frame({'id': ids[0], 'status': 'pass', 'seconds': 0.0}, ok)",
    "a truncated frame": "frame({'id': ids[0], 'status': 'ok', 'seconds': 0.0}, ok)[:-3]",
}


class ForgedChannelSandbox(Sandbox):
    """A Sandbox whose first `starts` servers are the forged stand-in; later ones are real."""

    reply_slack_s = 1.0  # a truncated frame is given up on after the batch's limit plus this

    def __init__(self, forged: str, batch: int, starts: int, canary: Path) -> None:
        super().__init__(workers=1)
        self.forged, self.batch, self.starts, self.canary = forged, batch, starts, canary

    def _start(self) -> subprocess.Popen:
        if self.starts == 0:
            return super()._start()
        self.starts -= 1
        proc = subprocess.Popen([sys.executable, "-c", _FORGED_SERVER, str(self.batch), self.forged, str(self.canary)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert _read_frame(proc.stdout, 0, 30.0)[0]["ready"]
        return proc


BATCH = [Job("def f(x):\n    return x\n", "f", "inputs = [[1]]", 1.0),
         Job("def f(x):\n    return 2 * x\n", "f", "inputs = [[3]]", 1.0)]


@pytest.mark.integration
@pytest.mark.sandbox
@pytest.mark.parametrize("forged", list(FORGED_FRAMES))
def test_a_forged_frame_costs_a_restart_and_the_batch_is_run_again(forged, tmp_path):
    sandbox = ForgedChannelSandbox(FORGED_FRAMES[forged], len(BATCH), starts=1, canary=tmp_path / "canary")
    try:
        runs = sandbox.run(BATCH)  # never raises
    finally:
        sandbox.close()
    assert not (tmp_path / "canary").exists(), "a forged frame ran code in the trainer"
    assert [(r.status, r.outputs) for r in runs] == [("ok", [1]), ("ok", [6])]


@pytest.mark.integration
@pytest.mark.sandbox
@pytest.mark.parametrize("forged", list(FORGED_FRAMES))
def test_a_channel_forged_again_after_the_restart_costs_the_batch_a_crashed_verdict_and_nothing_more(forged,
                                                                                                       tmp_path):
    sandbox = ForgedChannelSandbox(FORGED_FRAMES[forged], len(BATCH), starts=2, canary=tmp_path / "canary")
    try:
        runs = sandbox.run(BATCH)  # never raises, never trusts a forged reply
        assert [r.status for r in runs] == ["crashed", "crashed"]
        after = sandbox.run(BATCH)  # the next batch gets a fresh (here: real) server
    finally:
        sandbox.close()
    assert not (tmp_path / "canary").exists(), "a forged frame ran code in the trainer"
    assert [(r.status, r.outputs) for r in after] == [("ok", [1]), ("ok", [6])]


@pytest.mark.unit
@pytest.mark.parametrize(("response", "program", "fenced"), [
    ("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```\n", "b = 2\n", True),
    ("```\nc = 3\n```", "c = 3\n", True),
    ("```python\nd = 4\n```\n```\ne = 5\n```", "d = 4\n", True),
    ("def f(x):\n    return x", "def f(x):\n    return x", False),
])
def test_the_program_is_the_last_python_block_else_the_last_block_else_the_text(response, program, fenced):
    assert extract_program(response) == (program, fenced)
