"""The execution sandbox for model-written programs: every code task runs its candidates here, never in-process.

`Sandbox.run(jobs)` sends each job (a program, the name of its entry point, the source of its test inputs, a time
limit) to a fork server (`sandbox/server.py`) that runs in its own interpreter with a scrubbed environment and,
where the OS allows, in new network, mount and PID namespaces (`unshare`). Each program gets its own forked
process, working directory, resource limits and (as root) the uid `nobody`; outputs come back as plain data, in
job order. What the sandbox guarantees and what it does not: README, "The code task".
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
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


def _execution(reply: dict) -> Execution:
    seconds = float(reply.get("seconds", 0.0))
    if reply["status"] != "ok":
        return Execution(reply["status"], seconds=seconds)
    try:
        result = json.loads(reply["payload"])
        status = result["status"]
        if status != "ok":
            return Execution(status, seconds=seconds, detail=str(result.get("detail", "")))
        outputs = [_output(o) for o in result["outputs"]]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, MemoryError):
        return Execution("crashed", seconds=seconds, detail="malformed result")
    return Execution("ok", outputs, seconds)


def available_isolation() -> str:
    """The strongest isolation this machine allows: root (namespaces as root, programs as `nobody`), user (an
    unprivileged user namespace), or none."""
    if not shutil.which("unshare"):
        return "none"
    for name in ("root", "user") if os.geteuid() == 0 else ("user",):
        try:
            probe = subprocess.run([*ISOLATIONS[name], "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return name
    return "none"


class Sandbox:
    """Runs untrusted programs in the fork server; `run` never raises on what a program does and never hangs
    beyond each program's limit (plus a restart of the server if it dies). Thread-safe."""

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
        env = dict(CLEAN_ENV, SANDBOX_PID_NS="1" if self.isolation != "none" else "0")
        if self.isolation != "none":
            env["TMPDIR"] = _PRIVATE_ROOT
        cmd = [*ISOLATIONS[self.isolation], sys.executable, "-E", "-s", str(SERVER), str(self.workers),
               str(self.max_output)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env, cwd="/", start_new_session=True)
        info = _read_frame(proc.stdout)
        if not info or not info.get("ready"):
            proc.kill()
            raise RuntimeError(f"the sandbox server did not start ({' '.join(cmd[:3])} ...)")
        if not self.info:
            self._announce(info)
        self.info = info
        return proc

    def _announce(self, info: dict) -> None:
        if self.isolation == "none":
            log.warning("sandbox: no isolation available (no unshare or namespaces refused): programs run with "
                        "network access and can write wherever this user can; use a container or VM")
            return
        parts = ["network, mount and PID namespaces" + (" (unprivileged user namespace)"
                                                         if self.isolation == "user" else ""),
                 "private /dev/shm, read-only /tmp", "uid nobody" if info.get("nobody") else "same uid as the trainer",
                 "a PID namespace per program" if info.get("pid_ns") else "process-group kill"]
        log.info("sandbox isolation: %s", ", ".join(parts))

    def run(self, jobs: Sequence[Job]) -> list[Execution]:
        """Every job's execution, in job order."""
        if not jobs:
            return []
        with self._lock:
            try:
                return self._run(jobs)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error, RuntimeError):
                self.close()  # a dead server: restart once, then report what is missing as crashed
                try:
                    return self._run(jobs)
                except (OSError, EOFError, pickle.UnpicklingError, struct.error, RuntimeError):
                    self.close()
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
        while len(results) < len(jobs):
            reply = _read_frame(proc.stdout)
            if reply is None:
                raise EOFError("the sandbox server exited")
            results[reply["id"] - base] = _execution(reply)
        writer.join()
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        self.close()


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack(">I", len(data)) + data


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_frame(stream: IO[bytes]) -> dict | None:
    head = _read_exact(stream, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    body = _read_exact(stream, size)
    return None if body is None else pickle.loads(body)
