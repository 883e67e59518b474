"""The execution sandbox for model-written programs: every code task runs its candidates here, never in-process.

`Sandbox.run(jobs)` sends each job (a program, the name of its entry point, the source of its test inputs, a time
limit) to a fork server (`sandbox/server.py`) that runs in its own interpreter with a scrubbed environment and,
where the OS allows, in new network, mount and PID namespaces (`unshare`). Each program gets its own forked
process, namespaces, working directory, Landlock rules, resource limits and (as root) the uid `nobody`
(`confine.py`); outputs come back as plain data, in job order, over a channel that carries only checked JSON.
What the sandbox guarantees in each mode and what it does not: docs/sandbox.md.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SERVER = Path(__file__).with_name("server.py")
# the child's environment: nothing of the parent's (no API keys, tokens, W&B or HF credentials)
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
# inside the namespaces: a private /dev/shm holds the programs' working directories (it vanishes with the server),
# and the world-writable directories of the host (/tmp, /var/tmp, /run/lock) are read-only, so that a program can
# write only in its own directory; the host's files under them (an interpreter installed in /tmp, say) stay readable
_PRIVATE_TMP = ('mount -t tmpfs -o mode=1777 tmpfs /dev/shm && for d in /tmp /var/tmp /run/lock; do '
                'if [ -d "$d" ]; then mount --bind "$d" "$d" && mount -o remount,bind,ro "$d"; fi; done && exec "$@"')
# where the server makes the working directories inside the namespaces
_PRIVATE_ROOT = "/dev/shm"
_NAMESPACES = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
ISOLATIONS = {
    "root": ["unshare", *_NAMESPACES, "sh", "-c", _PRIVATE_TMP, "sh"],
    "user": ["unshare", "--user", "--map-root-user", *_NAMESPACES, "sh", "-c", _PRIVATE_TMP, "sh"],
    "none": [],
}
_STARTUP_TIMEOUT_S = 60.0
# what a reply may say of a program's run (its own result is inside the payload)
_REPLY_STATUSES = frozenset({"ok", "timeout", "crashed", "output_too_large"})
# the largest reply header the client reads (a real one is under 100 bytes)
_MAX_HEADER = 1 << 16


class ProtocolError(Exception):
    """A frame from the server that is not a well-formed reply to a job still waiting for one."""


class CallFailed:
    """An output that is not a value: the call raised (or returned something nested too deep to send)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"CallFailed({self.reason!r})"


class Opaque:
    """A returned object that is not plain data (a regex match, an instance of the program's own class): not
    None and truthy, equal only to itself."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"Opaque({self.type_name})"


@dataclass(frozen=True)
class Call:
    """One call a test's driver made: the arguments the candidate received (as they were before the call) and what
    it returned (or CallFailed)."""

    args: tuple
    value: Any


@dataclass(frozen=True)
class Job:
    """One program to run: call `entry` on each argument list of `inputs` (source that assigns `inputs`), or, where
    that source defines `drive(candidate)` instead, let the driver call it; each output is then a `Call`."""

    program: str
    entry: str
    inputs: str
    # wall-clock seconds for the whole program (CPU time is capped one second above it)
    timeout_s: float = 3.0


@dataclass
class Execution:
    """What a program did: `status` is ok (it ran; `outputs` hold one value or CallFailed per input, or one Call
    per call a driver made), timeout, syntax_error, error (it raised at top level or in the inputs), no_entry,
    crashed (it died, exited early or wrote a malformed result) or output_too_large."""

    status: str
    outputs: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def decode(x: Any) -> Any:
    """The tagged JSON of `server.encode` back to plain values (tuples, sets, dicts, complex, bytes, numpy)."""
    if isinstance(x, list):
        return [decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    (tag, v), = x.items()
    if tag == "t":
        return tuple(decode(e) for e in v)
    if tag in ("s", "f"):
        return (set if tag == "s" else frozenset)(decode(e) for e in v)
    if tag == "d":
        return {decode(k): decode(e) for k, e in v}
    if tag == "F":
        return float(v)
    if tag == "c":
        return complex(v[0], v[1])
    if tag == "b":
        return bytes.fromhex(v)
    if tag == "o":
        return Opaque(str(v))
    import numpy as np

    if tag == "a":
        return np.array(decode(v[2]), dtype=np.dtype(v[0])).reshape(v[1])
    if tag == "n":
        return np.dtype(v[0]).type(decode(v[1]))
    raise ValueError(f"unknown tag {tag!r}")


def _output(o: dict) -> Any:
    value = decode(o["v"]) if "v" in o else CallFailed(str(o["x"]))
    return Call(decode(o["a"]), value) if "a" in o else value


def _execution(reply: dict, payload: bytes) -> Execution:
    """A checked reply's execution: the program's own result (its payload) is parsed here, as data only."""
    seconds = float(reply["seconds"])
    if reply["status"] != "ok":
        return Execution(reply["status"], seconds=seconds)
    try:
        result = json.loads(payload)
        status = result["status"]
        if status != "ok":
            return Execution(status, seconds=seconds, detail=str(result.get("detail", "")))
        outputs = [_output(o) for o in result["outputs"]]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, MemoryError):
        return Execution("crashed", seconds=seconds, detail="malformed result")
    return Execution("ok", outputs, seconds)


def available_isolations() -> list[str]:
    """Every namespace isolation this machine allows, strongest first: root (namespaces as root, programs as
    `nobody`; only when running as root) and user (an unprivileged user namespace)."""
    if not shutil.which("unshare"):
        return []
    found = []
    for name in ("root", "user") if os.geteuid() == 0 else ("user",):
        try:
            probe = subprocess.run([*ISOLATIONS[name], "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            found.append(name)
    return found


def available_isolation() -> str:
    """The strongest isolation this machine allows (`available_isolations`), else none."""
    return next(iter(available_isolations()), "none")


class Sandbox:
    """Runs untrusted programs in the fork server; `run` never raises on what a program does and never hangs
    beyond each program's limit (plus a restart of the server if it dies). Thread-safe."""

    # seconds a reply may come after the longest limit of the batch's programs (the server's kill and clean-up)
    reply_slack_s = 30.0

    def __init__(self, workers: int | None = None, memory_mb: int = 2048, processes: int = 64, file_mb: int = 16,
                 max_output_mb: int = 64, isolation: str = "auto") -> None:
        if isolation not in ("auto", *ISOLATIONS):
            raise ValueError(f"sandbox isolation={isolation!r}: expected auto, {', '.join(ISOLATIONS)}")
        self.workers = workers or len(os.sched_getaffinity(0))
        self.limits = {"memory_mb": memory_mb, "processes": processes, "file_mb": file_mb}
        self.max_output = max_output_mb << 20
        self.requested = isolation
        self.isolation = ""
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._next_id = 0

    def _start(self) -> subprocess.Popen:
        if not self.isolation:
            self.isolation = available_isolation() if self.requested == "auto" else self.requested
        env = dict(CLEAN_ENV, SANDBOX_NAMESPACES="1" if self.isolation != "none" else "0")
        if self.isolation != "none":
            env["TMPDIR"] = _PRIVATE_ROOT
        cmd = [*ISOLATIONS[self.isolation], sys.executable, "-E", "-s", str(SERVER), str(self.workers),
               str(self.max_output)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env, cwd="/", start_new_session=True)
        try:
            info, _ = _read_frame(proc.stdout, 0, _STARTUP_TIMEOUT_S)
        except (ProtocolError, EOFError, TimeoutError, struct.error):
            info = None
        if not isinstance(info, dict) or info.get("ready") is not True:
            proc.kill()
            raise RuntimeError(f"the sandbox server did not start ({' '.join(cmd[:3])} ...)")
        if not self.info:
            self._announce(info)
        self.info = info
        return proc

    def _announce(self, info: dict) -> None:
        if self.isolation == "none":
            log.warning("sandbox: no namespaces available (no unshare, or user namespaces refused): programs share "
                        "the trainer's process space and network; use a container or VM")
        user = " (unprivileged user namespace)" if self.isolation == "user" else ""
        parts = [] if self.isolation == "none" else [f"network, mount and PID namespaces{user}"]
        parts.append({"nobody": "per program: PID namespace with its own /proc, private tmpfs, uid nobody",
                      "userns": "per program: user namespace (no capability over the server), PID namespace with "
                                "its own /proc, private tmpfs, same uid outside as the trainer"}.get(
                                    info.get("program_ns"), "per program: process-group kill only"))
        if info.get("seccomp"):
            parts.append("seccomp: no Unix-domain socket (Landlock does not govern connecting to one)")
        else:
            log.warning("sandbox: seccomp unavailable on this machine: a program can connect to Unix sockets that "
                        "its uid may write to (a session bus, an ssh agent)")
        if info.get("landlock"):
            parts.append(f"Landlock ABI {info['landlock']}: reads only the interpreter and system directories, "
                         "writes only its own directory")
        else:
            parts.append("no Landlock: programs can read every file this user can read")
            log.warning("sandbox: Landlock unavailable (Linux >= 5.13 with it enabled): programs can read every file "
                        "the trainer's user can read")
        log.info("sandbox isolation: %s", "; ".join(parts))

    def run(self, jobs: Sequence[Job]) -> list[Execution]:
        """Every job's execution, in job order. Never raises on what a program or the server does: a dead server
        is restarted and the batch run again once; a server that dies again, or that sends anything but a
        well-formed reply to a waiting job (a sign that a program reached its channel), is killed and the batch's
        jobs are `crashed`."""
        if not jobs:
            return []
        with self._lock:
            for attempt in range(2):
                try:
                    return self._run(jobs)
                except (OSError, EOFError, ProtocolError, struct.error, RuntimeError) as exc:
                    self.close()
                    log.warning("sandbox: %s (%s)", "restarting the server" if attempt == 0 else "giving up on the "
                                f"batch of {len(jobs)}", exc)
            return [Execution("crashed", detail="sandbox server failed") for _ in jobs]

    def _run(self, jobs: Sequence[Job]) -> list[Execution]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        base = self._next_id
        self._next_id += len(jobs)
        frames = [_frame({"id": base + i, "program": j.program, "entry": j.entry, "inputs": j.inputs,
                          "timeout": float(j.timeout_s), **self.limits}) for i, j in enumerate(jobs)]
        failed: list[BaseException] = []

        def send() -> None:
            try:
                for f in frames:
                    proc.stdin.write(f)
                proc.stdin.flush()
            except OSError as exc:
                failed.append(exc)

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        results: dict[int, Execution] = {}
        # while any job runs, one ends (or is killed) within the longest limit: a server silent for longer is stuck
        patience = max(j.timeout_s for j in jobs) + self.reply_slack_s
        while len(results) < len(jobs):
            header, payload = _read_frame(proc.stdout, self.max_output, patience)
            index = _reply_index(header, base, len(jobs), results)
            results[index] = _execution(header, payload)
        writer.join()
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        self.close()


def _frame(header: dict, payload: bytes = b"") -> bytes:
    """The server's frame (`server.frame`): two big-endian lengths, the JSON header, the payload."""
    head = json.dumps(header).encode()
    return struct.pack(">II", len(head), len(payload)) + head + payload


def _read_exact(stream: IO[bytes], n: int, deadline: float) -> bytes:
    """`n` bytes straight from the stream's descriptor (never its buffer), or EOFError / TimeoutError."""
    fd, data = stream.fileno(), b""
    while len(data) < n:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise TimeoutError("the sandbox server sent nothing in time")
        chunk = os.read(fd, min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the sandbox server exited")
        data += chunk
    return data


def _read_frame(stream: IO[bytes], max_payload: int, timeout_s: float) -> tuple[dict, bytes]:
    """One frame's JSON header (an object) and raw payload, whole within `timeout_s`; sizes are checked before
    anything more is read."""
    deadline = time.monotonic() + timeout_s
    head, size = struct.unpack(">II", _read_exact(stream, 8, deadline))
    if head > _MAX_HEADER or size > max_payload:
        raise ProtocolError(f"a frame of {head} + {size} bytes")
    try:
        header = json.loads(_read_exact(stream, head, deadline))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("a header that is not JSON") from exc
    if not isinstance(header, dict):
        raise ProtocolError("a header that is not an object")
    return header, _read_exact(stream, size, deadline)


def _reply_index(header: dict, base: int, n: int, done: dict[int, Execution]) -> int:
    """Which job of the batch a reply answers; anything but a first reply to one of them is a ProtocolError."""
    job_id, status, seconds = header.get("id"), header.get("status"), header.get("seconds")
    if type(job_id) is not int or not base <= job_id < base + n or job_id - base in done:
        raise ProtocolError(f"a reply to no waiting job (id {job_id!r})")
    if status not in _REPLY_STATUSES or type(seconds) not in (int, float):
        raise ProtocolError(f"a malformed reply to job {job_id}")
    return job_id - base
