"""Confinement of one sandboxed program (standard library only; the fork server imports it as a sibling script).

What a program's process goes through after the server forks it, in this order (`confine`):
1. namespaces of its own: PID (with its own `/proc`, so it sees only its own processes), mount (a private tmpfs
   on `/dev/shm` is its working directory, so it never sees another program's files) and IPC; where the server
   is not real root, also a user namespace of its own (`userns` mode), so that whatever capabilities it holds
   there own nothing of the server's namespaces;
2. Landlock (Linux >= 5.13, unprivileged): reads only under the interpreter's prefixes and the system
   directories, writes only in its own directory, no TCP bind or connect, and (ABI >= 6) no signal or abstract
   Unix socket outside its own domain;
3. no privileges: an empty capability bounding set, no capabilities, `no_new_privs`, and as root the uid
   `nobody`.

The server itself is made non-dumpable (`harden_server`), so its `/proc/<pid>/fd`, `/proc/<pid>/mem` and ptrace
are closed to processes of the same uid that lack CAP_SYS_PTRACE over it, and the programs hold no capability.

Sources: unshare(2), user_namespaces(7) (uid_map rules), pid_namespaces(7), landlock(7) and
Documentation/userspace-api/landlock.rst (ABI versions and access rights), capabilities(7).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
NOBODY = 65534
# where each program works: its own tmpfs (namespaced modes), mounted over the server's private /dev/shm
PRIVATE_ROOT = "/dev/shm"

# Landlock (same syscall numbers on every architecture: the generic table)
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
READ_ONLY = EXECUTE | READ_FILE | READ_DIR
# rights that a rule on a regular or device file may carry (the others concern directories)
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1

# seccomp (seccomp(2), linux/filter.h): a classic-BPF filter over struct seccomp_data (nr at 0, arch at 4, args at 16)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EACCES, AF_UNIX = 13, 1
# (audit arch, socket(2), io_uring_setup(2)) by machine; x86_64's x32 numbers (>= 0x40000000) are refused too
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}

# what a program may read besides the interpreter: shared libraries, the system's data, a few files of /etc
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
# devices a program may read and write
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def harden_server() -> None:
    """The server's own process: non-dumpable (closed to same-uid `/proc/<pid>/fd`, `mem` and ptrace)."""
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    try:
        abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except (AttributeError, OSError):
        return 0
    return max(int(abi), 0)


def _handled_fs(abi: int) -> int:
    """Every filesystem access right the kernel's ABI knows: all of them are denied unless a rule allows them."""
    top = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)  # REFER from ABI 2, TRUNCATE from 3, IOCTL_DEV from 5
    return (1 << top) - 1


def readable_paths() -> list[str]:
    """Directories a program may read (and execute from): the system's and the interpreter's prefixes and its
    site-packages, never an editable install's source tree (the project folder) nor anything else of $HOME."""
    paths = {*SYSTEM_DIRS, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


class Confinement:
    """How this server confines each program: decided once (`probe`), applied in each forked child (`apply`)."""

    def __init__(self, as_nobody: bool, namespaces: bool) -> None:
        self.as_nobody = as_nobody
        # "nobody" (real root: new namespaces, then uid nobody), "userns" (a user namespace per program) or ""
        self.mode = ""
        if namespaces:
            self.mode = "nobody" if as_nobody else "userns"
        self.landlock = landlock_abi()
        self.seccomp = os.uname().machine in SECCOMP_ARCH
        self.cap_last = _cap_last()
        # O_PATH descriptors of what a program may read, opened once here (closed in the program after use)
        self.read_fds = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in readable_paths()]
        self.read_files = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in SYSTEM_FILES if os.path.isfile(p)]
        self.devices = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in DEVICES if os.path.exists(p)]

    def probe(self) -> None:
        """Try the whole confinement in a throwaway child; what fails is turned off (and reported)."""
        if self.mode and not _in_child(lambda: self._namespaces(64)):
            self.mode = ""
        if self.landlock and not _in_child(lambda: no_new_privs() or self._landlock(os.open(".", os.O_PATH))):
            self.landlock = 0
        if self.seccomp and not _in_child(_no_unix_sockets_probe):
            self.seccomp = False

    def info(self) -> dict:
        return {"program_ns": self.mode, "landlock": self.landlock, "seccomp": self.seccomp}

    def enter(self, tmpfs_mb: int) -> str:
        """In the forked child, before anything else: the namespaces (the calling process stays outside as the
        waiting parent; the function returns in the program's process). The working directory it should use."""
        if self.mode:
            self._namespaces(tmpfs_mb)
            return PRIVATE_ROOT
        return ""

    def _namespaces(self, tmpfs_mb: int) -> None:
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
        uid, gid = os.getuid(), os.getgid()
        if self.mode == "userns":
            flags |= CLONE_NEWUSER
        _check(_libc.unshare(flags), "unshare")
        if self.mode == "userns":
            # this server's uid appears as `nobody` inside: not root there, so an exec gains no capability
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{NOBODY} {uid} 1")
            _write("/proc/self/gid_map", f"{NOBODY} {gid} 1")
        pid = os.fork()
        if pid:  # the waiting parent: PID 1 of the new namespace is its child
            os.closerange(0, 1 << 16)
            _, code = os.waitpid(pid, 0)
            os._exit(0 if code == 0 else 1)
        _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        _check(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
        owner = f",uid={NOBODY},gid={NOBODY}" if self.mode == "nobody" else ""
        options = f"size={tmpfs_mb}m,mode=0700{owner}".encode()
        _check(_libc.mount(b"tmpfs", PRIVATE_ROOT.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
               "mount tmpfs")

    def restrict(self, workdir: str) -> None:
        """In the program's process, after `enter` and with its working directory current: Landlock, then no
        privileges. Closes the descriptors it was given."""
        no_new_privs()
        if self.seccomp:
            no_unix_sockets()
        if self.landlock:
            self._landlock(os.open(workdir, os.O_PATH))
        for fd in (*self.read_fds, *self.read_files, *self.devices):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._drop_privileges()

    def _landlock(self, workdir_fd: int) -> None:
        abi = self.landlock
        handled = _handled_fs(abi)
        attr = struct.pack("=QQQ", handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                           SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        buf = ctypes.create_string_buffer(attr, len(attr))
        ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(size), ctypes.c_uint32(0)),
                         "landlock_create_ruleset")
        rules = [(fd, READ_ONLY) for fd in self.read_fds] + [(fd, READ_FILE) for fd in self.read_files]
        rules += [(fd, READ_FILE | WRITE_FILE | (IOCTL_DEV if abi >= 5 else 0)) for fd in self.devices]
        rules.append((workdir_fd, handled))
        if self.mode:  # its own /proc (the host's, with other processes of this uid, stays closed)
            rules.append((os.open("/proc", os.O_PATH), READ_FILE | READ_DIR))
        for fd, access in rules:
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd), 12)
            _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                                 rule, ctypes.c_uint32(0)), "landlock_add_rule")
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
        os.close(ruleset)
        os.close(workdir_fd)

    def _drop_privileges(self) -> None:
        for cap in range(self.cap_last + 1):  # needs CAP_SETPCAP: held as root and in a user namespace of its own
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if self.as_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        # capset: version 3 header, two empty data words (effective, permitted, inheritable all zero)
        header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
        data = ctypes.create_string_buffer(bytes(24), 24)
        _check(_libc.capset(header, data), "capset")
        if self.mode:  # a change of uid clears the parent-death signal: armed again, so that a program that
            # leaves its process group still dies with its waiting parent (and with it its PID namespace)
            _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def no_unix_sockets() -> None:
    """Refuse (EACCES) socket(AF_UNIX, ...) and io_uring_setup (whose requests can create and connect sockets
    outside seccomp's view), and any syscall of another ABI (x32, a 32-bit int 0x80). Landlock (up to ABI 7) does
    not govern connect() to a Unix socket with a path, and a program with the trainer's uid could otherwise reach
    every socket of that user: the session's D-Bus and systemd (which start processes outside every namespace), an
    ssh agent, a docker socket. Socket pairs (socketpair) stay allowed. Needs no_new_privs."""
    arch, socket_nr, io_uring_nr = SECCOMP_ARCH[os.uname().machine]
    deny, allow = SECCOMP_RET_ERRNO | EACCES, SECCOMP_RET_ALLOW
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),             # 0: the arch
        (BPF_JEQ_K, 0, 8, arch),             # 1: another ABI -> 10 (deny)
        (BPF_LD_W_ABS, 0, 0, 0),             # 2: the syscall number
        (BPF_JGE_K, 6, 0, 0x40000000),       # 3: x32 -> 10 (deny)
        (BPF_JEQ_K, 5, 0, io_uring_nr),      # 4: io_uring_setup -> 10 (deny)
        (BPF_JEQ_K, 0, 3, socket_nr),        # 5: not socket -> 9 (allow)
        (BPF_LD_W_ABS, 0, 0, 16),            # 6: its domain (args[0], low 32 bits)
        (BPF_JEQ_K, 2, 0, AF_UNIX),          # 7: AF_UNIX -> 10 (deny)
        (BPF_RET_K, 0, 0, allow),            # 8
        (BPF_RET_K, 0, 0, allow),            # 9
        (BPF_RET_K, 0, 0, deny),             # 10
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in program), 8 * len(program))
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(filters))
    prog = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog, 0, 0), "prctl(PR_SET_SECCOMP)")


def no_new_privs() -> None:
    """No exec gains privileges from here on (what Landlock and seccomp need of an unprivileged caller)."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _no_unix_sockets_probe() -> None:
    no_new_privs()
    no_unix_sockets()
    import socket

    try:
        socket.socket(socket.AF_UNIX)
    except PermissionError:
        socket.socket(socket.AF_INET).close()  # other families still work
        return
    raise OSError("the filter let an AF_UNIX socket through")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _in_child(fn) -> bool:
    """Whether `fn` runs without raising in a forked child (whose own children, if any, exit at once)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure means: not available
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
