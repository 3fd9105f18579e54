"""Run untrusted Python (model-written code) in a contained child process; score many in parallel.

Key design choice: the boundaries are the kernel's, installed by a trusted prelude inside a fresh
interpreter (`python -I -S this_file`, empty environment, new session, fresh temporary directory)
before the untrusted code runs in that same process, and irreversible from inside it:
- rlimits: CPU time, address space, file size (its output too), open files, no core dumps.
- a new user + network namespace where the kernel allows it: no network, not even 127.0.0.1.
- Landlock: the file system is an allowlist, read-only the standard library and system libraries,
  read-write its directory, nothing else (not the run directory, /proc, the parent's files); also
  no TCP (ABI ≥ 4) and no signals to processes outside (ABI ≥ 6).
- seccomp-bpf: no new processes (a fork bomb is one failed fork), no execve, sockets AF_UNIX only,
  no ptrace, namespaces, mounts, bpf, io_uring, and signals only to itself.
- an audit hook, best effort only (ctypes or interpreter internals get around it).
Landlock and seccomp are required by default: without them SandboxUnavailable is raised and nothing
runs. The parent kills the whole process group at the wall-clock limit; PR_SET_PDEATHSIG ends the
child with the thread that started it. Passing needs a marker the prelude prints after the whole
program ran: sys.exit(0) or os._exit(0) before the tests is a failure. Not protected against: a
kernel exploit, use of CPU and memory up to the limits, side channels, and a program that games its
own test in-process (monkey-patching it, or reading the prelude's memory to forge the marker).
docs/sandbox.md has the details and what was verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from icepop.rewards import sandbox_child
from icepop.rewards.sandbox_child import SETUP_FAILED

LAYERS = ("rlimits", "netns", "landlock", "seccomp", "audit_hook")
SYSTEM_LIBRARIES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache", "/etc/localtime")
"""Readable besides the standard library: what extension modules (hashlib's libcrypto…) load."""
_TAIL_BYTES = 4096


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up (a required layer is missing): nothing was run."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sample may use. The wall-clock limit must stay below the reward pool's per-sample
    timeout, so that the sandbox kills its child cleanly before the pool kills the worker."""

    timeout_seconds: float = 5.0
    """Wall-clock limit; past it the process group is killed and the sample scores "timeout"."""
    cpu_seconds: float = 5.0
    """CPU-time limit (RLIMIT_CPU, rounded up to whole seconds)."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS): past it allocations raise MemoryError."""
    file_size_mb: int = 16
    """Largest file it may write, its stdout/stderr included (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    processes: int = 16
    """Tasks (threads) of its uid in its user namespace (RLIMIT_NPROC; not enforced for uid 0)."""
    require: tuple[str, ...] = ("landlock", "seccomp")
    """Layers that must be installed, else SandboxUnavailable; a subset of LAYERS."""
    audit_hook: bool = True
    """Also install the best-effort audit hook (tests switch it off to check the kernel layers alone)."""

    def __post_init__(self) -> None:
        # The interpreter itself needs 64 MiB and 16 files to start.
        minimum = {"timeout_seconds": 0, "cpu_seconds": 0, "memory_mb": 63, "file_size_mb": 0}
        for name, low in (minimum | {"open_files": 15, "processes": 0}).items():
            if not getattr(self, name) > low:
                raise ValueError(f"SandboxLimits.{name}={getattr(self, name)} must be more than {low}")
        unknown = set(self.require) - set(LAYERS)
        if unknown:
            raise ValueError(f"SandboxLimits.require has unknown layers {sorted(unknown)}; known: {LAYERS}")


@dataclass
class SandboxResult:
    """How one program ended."""

    passed: bool
    """It ran to the end without an exception (its tests passed)."""
    reason: str
    """"passed", "failed" (an exception, SystemExit included, or no pass marker), "timeout" (wall
    clock), "cpu_time" (RLIMIT_CPU), "memory" (MemoryError) or "killed" (another signal)."""
    returncode: int
    duration_seconds: float
    layers: tuple[str, ...]
    """The isolation layers that were in place."""
    pid: int
    """The child's pid, also its process-group and session id."""
    stdout_tail: str
    stderr_tail: str


def stdlib_paths() -> tuple[str, ...]:
    """The standard library of the running interpreter (what `python -I -S` can import)."""
    import sysconfig

    pure = os.path.dirname(os.__file__)  # extension modules: lib-dynload, or platstdlib on some distributions
    platstdlib = sysconfig.get_path("platstdlib", vars={"platbase": sys.base_exec_prefix})
    paths = (pure, os.path.join(pure, "lib-dynload"), platstdlib)
    return tuple(dict.fromkeys(p for p in paths if os.path.exists(p)))


def run_python(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` contained; its result says whether it ran to the end. SandboxUnavailable when a
    required layer cannot be installed here."""
    limits = limits or SandboxLimits()
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="icepop-sandbox-")
    readable = [*stdlib_paths(), *(p for p in SYSTEM_LIBRARIES if os.path.exists(p))]
    request = dict(program=program, token=token, workdir=workdir, readable=readable, parent=os.getpid())
    request["limits"] = asdict(limits)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            argv = [sys.executable, "-I", "-S", "-B", sandbox_child.__file__]  # -I: no PYTHON* variables
            child = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,
            )
            try:
                with contextlib.suppress(BrokenPipeError), child.stdin:  # if it died, its exit code says why
                    child.stdin.write(json.dumps(request).encode())
                timed_out = _wait_then_kill_group(child.pid, started + limits.timeout_seconds)
            except BaseException:  # e.g. Ctrl-C: the child must not outlive this call
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise
            returncode = child.wait()
            duration = time.monotonic() - started
            head, stdout_tail, stderr_tail = _read(out, head=True), _read(out), _read(err)
    finally:
        shutil.rmtree(workdir, onerror=_force_remove)
    if returncode == SETUP_FAILED and f"icepop-sandbox-setup {token}" in stderr_tail:
        raise SandboxUnavailable(stderr_tail.rsplit(f"icepop-sandbox-setup {token}: ", 1)[-1].strip())
    ready = next((line for line in head.splitlines() if line.startswith(f"{token} ready")), None)
    if ready is None and not timed_out:
        raise SandboxUnavailable(
            f"the sandboxed interpreter did not start (exit code {returncode}):\n{stderr_tail}"
        )
    layers = tuple(ready.split()[2].split(",")) if ready is not None and len(ready.split()) > 2 else ()
    passed = not timed_out and returncode == 0 and f"{token} passed" in stdout_tail.splitlines()[-2:]
    stdout_tail = "\n".join(line for line in stdout_tail.splitlines() if token not in line)
    reason = _reason(passed, timed_out, returncode, stderr_tail)
    return SandboxResult(passed, reason, returncode, duration, layers, child.pid, stdout_tail, stderr_tail)


SANDBOX_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 1)
"""Programs `run_sandboxed` runs at once in one process: the multi-turn environments step in parallel
threads, and 128 interpreters started at once on 2 cores thrash (load average 30 measured here)."""


def run_sandboxed(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """`run_python` from any number of threads, at most one program per CPU at a time."""
    with SANDBOX_SLOTS:
        return run_python(program, limits)


def run_many(
    programs: Sequence[str], limits: SandboxLimits | None = None, max_parallel: int | None = None
) -> list[SandboxResult]:
    """Results of `programs`, in order, at most `max_parallel` (default: CPU count) running at once."""
    from concurrent.futures import ThreadPoolExecutor

    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be at least 1")
    # Threads suffice: each only waits on its child process; subprocess launches without preexec_fn
    # are thread-safe, and PR_SET_PDEATHSIG follows the thread that is alive for the whole run.
    with ThreadPoolExecutor(max_parallel or os.cpu_count() or 1, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda program: run_python(program, limits), programs))


def _wait_then_kill_group(pid: int, deadline: float) -> bool:
    """Wait (without reaping, so the group id cannot be reused meanwhile) until the child exits or
    the deadline passes, then SIGKILL its whole process group; True when the deadline passed."""
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            break
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
    timed_out = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # also anything it started, were it able to start anything
    return timed_out


def _read(file: Any, head: bool = False) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(0 if head else max(0, size - _TAIL_BYTES))
    return file.read(512 if head else _TAIL_BYTES).decode("utf-8", "replace")


def _reason(passed: bool, timed_out: bool, returncode: int, stderr_tail: str) -> str:
    if passed:
        return "passed"
    if timed_out:
        return "timeout"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # RLIMIT_CPU: SIGXCPU at soft, SIGKILL at hard
        return "cpu_time"
    if returncode < 0:
        return "killed"
    return "memory" if "MemoryError" in stderr_tail else "failed"


def _force_remove(function: object, path: str, _: object) -> None:
    """rmtree's error handler: the program may have made its files unwritable; undo that, retry."""
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
