"""The sandbox's fork server: a standalone script (standard library and its sibling `confine.py` only, never
imports dash_exp or torch).

`dash_exp.sandbox.Sandbox` starts it as its own interpreter with a scrubbed environment, inside new network,
mount and PID namespaces where the OS allows. It makes itself non-dumpable, imports the modules tests commonly
need once, then serves jobs read from stdin: one fork per program, at most `workers` at a time, results written
to stdout as they finish (the client puts them back in order).

One program's life: fork -> a new session -> its confinement (`confine.Confinement`: PID, mount and IPC
namespaces of its own with its own /proc and a private tmpfs as working directory, a user namespace of its own
where the server is not root, Landlock, no capabilities, as root the uid `nobody`) -> stdin on /dev/null, stdout
and stderr capped, resource limits -> exec the candidate's source -> evaluate the test inputs (trusted source) ->
call the entry point on each (or let the test's `drive` call it, each call recorded) -> send back the outputs
as tagged JSON of plain data only. The expected outputs never enter this process: the client compares. A
program that exits early, dies, forges output or overruns simply yields no valid result.

Frames in both directions (`frame`): two 4-byte big-endian lengths, a JSON header, then raw bytes (a reply's
payload: the child's JSON, unparsed here). Nothing on either channel is ever unpickled or evaluated: a program
that could write into it would forge at most data, which the client checks field by field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

from confine import NOBODY, Confinement, harden_server  # a sibling script: the server runs as one

# modules imported once here, so that each fork finds them loaded (the MBPP+ tests import numpy and math; every
# module MBPP+'s solutions import is here). A program running as `nobody` imports others only where the
# interpreter's files are world-readable (not under /root, say).
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "operator",
           "statistics", "fractions", "decimal", "copy", "random", "cmath", "array", "typing", "json", "numpy",
           "datetime", "calendar", "textwrap", "unicodedata", "hashlib", "struct", "time", "socket", "dataclasses",
           "enum", "abc", "numbers", "contextlib")
# nesting depth of a returned value that is still encoded
MAX_DEPTH = 100
# the largest job header the server accepts
MAX_JOB = 64 << 20


def frame(header: dict, payload: bytes = b"") -> bytes:
    """One frame: lengths of the JSON header and of the payload, the header, the payload."""
    head = json.dumps(header).encode()
    return struct.pack(">II", len(head), len(payload)) + head + payload


class Unencodable(Exception):
    """A returned value that is not plain data (or nests too deep)."""


def encode(x: object, depth: int = 0) -> object:
    """Plain data as JSON with tags: exact built-in types, numpy arrays and scalars as their values; anything
    else (a subclass too, e.g. one whose __eq__ always holds) as an opaque marker of its type name."""
    if depth > MAX_DEPTH:
        raise Unencodable("nested too deep")
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return {"F": repr(x)} if not math.isfinite(x) else x
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t is tuple:
        return {"t": [encode(v, depth + 1) for v in x]}
    if t in (set, frozenset):
        return {"s" if t is set else "f": [encode(v, depth + 1) for v in x]}
    if t.__module__ == "collections" and t.__name__ in ("OrderedDict", "defaultdict", "Counter") or t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(x)]}
    if t is complex:
        return {"c": [encode(x.real), encode(x.imag)]}
    if t is bytes:
        return {"b": x.hex()}
    np = sys.modules.get("numpy")
    if np is not None and t is np.ndarray and x.dtype.kind in "biufc":
        return {"a": [x.dtype.str, list(x.shape), encode(x.ravel().tolist(), depth + 1)]}
    if np is not None and isinstance(x, np.generic) and t.__module__ == "numpy" and x.dtype.kind in "biufc":
        return {"n": [x.dtype.str, encode(x.item(), depth + 1)]}
    return {"o": t.__name__}  # any other object: opaque (not None, equal only to itself), never its own __eq__


def _limits(job: dict) -> None:
    cpu = int(math.ceil(job["timeout"])) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(job["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    size = int(job["file_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (job["processes"], job["processes"]))


def run_program(job: dict) -> dict:
    """The candidate's source, then the entry point called on every input; what happened, as plain data."""
    scope: dict = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        code = compile(job["program"], "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # ValueError: null bytes
        return {"status": "syntax_error", "detail": type(exc).__name__}
    try:
        exec(code, scope)
    except BaseException as exc:  # SystemExit included: an early exit passes nothing
        return {"status": "error", "detail": f"{type(exc).__name__} at top level"}
    fn = scope.get(job["entry"])
    if not callable(fn):
        return {"status": "no_entry", "detail": job["entry"]}
    try:
        inputs_scope: dict = {"__builtins__": __builtins__}
        exec(job["inputs"], inputs_scope)
        if "inputs" not in inputs_scope and callable(inputs_scope.get("drive")):
            return {"status": "ok", "outputs": _driven(fn, inputs_scope["drive"])}
        inputs = inputs_scope["inputs"]
    except BaseException as exc:
        return {"status": "error", "detail": f"{type(exc).__name__} in the inputs"}
    outputs = []
    for args in inputs:
        try:
            outputs.append({"v": encode(fn(*args))})
        except Unencodable as exc:
            outputs.append({"x": f"returned a value {exc}"})
        except BaseException as exc:
            outputs.append({"x": type(exc).__name__})
    return {"status": "ok", "outputs": outputs}


def _driven(fn: object, drive: object) -> list:
    """Tests whose inputs depend on earlier outputs or on randomness: their own driver calls a recording candidate
    (each call's arguments encoded before the call, then its result). The driver's verdict here counts for
    nothing: the client replays the recorded calls through the trusted test."""
    calls: list = []

    def candidate(*args: object) -> object:
        try:
            seen = encode(args)
        except Unencodable:
            seen = {"o": "arguments"}
        try:
            out = fn(*args)
        except BaseException as exc:
            calls.append({"a": seen, "x": type(exc).__name__})
            raise
        try:
            calls.append({"a": seen, "v": encode(out)})
        except Unencodable as exc:
            calls.append({"a": seen, "x": f"returned a value {exc}"})
        return out

    with contextlib.suppress(BaseException):
        drive(candidate)
    return calls


def _child(job: dict, wfd: int, workdir: str, confinement: Confinement) -> None:
    """In the forked child: never returns."""
    status = 1
    try:
        os.setsid()
        workdir = confinement.enter(4 * int(job["file_mb"])) or workdir  # may fork: returns in the program's process
        os.chdir(workdir)
        os.environ["TMPDIR"] = tempfile.tempdir = workdir
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        # stdout and stderr go to a file in the working directory, capped with every other file at file_mb
        # (RLIMIT_FSIZE): a program that writes more is killed by SIGXFSZ
        out = os.open(".output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd in (1, 2):
            os.dup2(out, fd)
        confinement.restrict(workdir)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, 1 << 16)
        _limits(job)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        result = run_program(job)
        data = json.dumps(result).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]
        status = 0
    finally:
        os._exit(status)


class Server:
    """Runs jobs from stdin, `workers` at a time, each under its deadline."""

    def __init__(self, workers: int, root: str, confinement: Confinement, max_output: int) -> None:
        self.workers, self.root, self.confinement = workers, root, confinement
        self.max_output = max_output
        self.pending: list[dict] = []
        # result fd -> [pid, job, deadline, start, chunks, size, workdir]
        self.running: dict[int, list] = {}
        self.inbuf = b""
        # exit statuses of running programs' processes reaped early by `reap`
        self.exited: dict[int, int] = {}

    def reap(self) -> None:
        """Collect every exited child: this server is PID 1 of its namespace, so each program's orphans (its PID
        namespace's first process, once the program's own process is killed) end up as its children."""
        tracked = {r[0] for r in self.running.values()}
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in tracked:
                self.exited[pid] = code

    def start(self, job: dict) -> None:
        # a program in namespaces of its own works in a tmpfs of its own; otherwise in a directory made here
        workdir = "" if self.confinement.mode else tempfile.mkdtemp(prefix="p", dir=self.root)
        if workdir and self.confinement.as_nobody:
            os.chown(workdir, NOBODY, NOBODY)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(job, wfd, workdir, self.confinement)
        os.close(wfd)
        now = time.monotonic()
        self.running[rfd] = [pid, job, now + job["timeout"], now, [], 0, workdir]

    def finish(self, rfd: int, status: str | None) -> None:
        pid, job, _, start, chunks, _, workdir = self.running.pop(rfd)
        os.close(rfd)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # whatever it left running in its session
        code = self.exited.pop(pid) if pid in self.exited else os.waitpid(pid, 0)[1]
        seconds = time.monotonic() - start
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        payload = b"".join(chunks)
        if status is None:  # what it wrote decides (the client parses it), not how its process ended
            status = "ok" if payload else "crashed"
        reply = {"id": job["id"], "status": status, "seconds": seconds, "exit": code}
        sys.stdout.buffer.write(frame(reply, payload if status == "ok" else b""))
        sys.stdout.buffer.flush()

    def read_jobs(self) -> bool:
        data = os.read(0, 1 << 20)
        if not data:
            return False
        self.inbuf += data
        while len(self.inbuf) >= 8:
            head, size = struct.unpack(">II", self.inbuf[:8])
            if head + size > MAX_JOB:
                raise ValueError(f"a job frame of {head + size} bytes")
            if len(self.inbuf) < 8 + head + size:
                break
            self.pending.append(json.loads(self.inbuf[8: 8 + head]))
            self.inbuf = self.inbuf[8 + head + size:]
        return True

    def serve(self) -> None:
        open_input = True
        while open_input or self.pending or self.running:
            while self.pending and len(self.running) < self.workers:
                self.start(self.pending.pop(0))
            now = time.monotonic()
            # wake at least twice a second to reap orphans
            wait = min([r[2] for r in self.running.values()] + [now + 0.5]) - now
            fds = list(self.running) + ([0] if open_input else [])
            ready, _, _ = select.select(fds, [], [], max(0.0, wait))
            for fd in ready:
                if fd == 0:
                    open_input = self.read_jobs()
                    continue
                chunk = os.read(fd, 1 << 20)
                entry = self.running[fd]
                if not chunk:
                    self.finish(fd, None)
                elif entry[5] + len(chunk) > self.max_output:
                    self.finish(fd, "output_too_large")
                else:
                    entry[4].append(chunk)
                    entry[5] += len(chunk)
            now = time.monotonic()
            for fd in [fd for fd, r in self.running.items() if r[2] <= now]:
                self.finish(fd, "timeout")
            self.reap()


def main() -> None:
    workers, max_output = int(sys.argv[1]), int(sys.argv[2])
    harden_server()
    sys.set_int_max_str_digits(0)  # a correct program may return a huge int
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    root = tempfile.mkdtemp(prefix="dash_exp_sandbox_")
    os.chmod(root, 0o711)
    confinement = Confinement(os.geteuid() == 0 and _can_setuid(), os.environ.get("SANDBOX_NAMESPACES") == "1")
    confinement.probe()
    info = {"ready": True, "nobody": confinement.as_nobody, **confinement.info(), "pid": os.getpid()}
    sys.stdout.buffer.write(frame(info))
    sys.stdout.buffer.flush()
    try:
        Server(workers, root, confinement, max_output).serve()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _can_setuid() -> bool:
    """Whether a child can become `nobody` (not inside a user namespace that maps only one uid)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os._exit(0)
        except OSError:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


if __name__ == "__main__":
    main()
