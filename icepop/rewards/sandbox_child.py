"""The sandbox's trusted prelude, run as a script inside the contained child: `python -I -S -B
sandbox_child.py` reads its request (the program, limits, paths) from stdin, installs every isolation
layer it can (rlimits, user + network namespace, Landlock, seccomp, audit hook; icepop.rewards.sandbox
explains each), refuses to go on if a required one is missing, then runs the untrusted program in
this same process and prints a pass marker only if it ran to the end.

Only the standard library, and nothing of icepop's: the interpreter runs isolated (-I -S), and every
import here happens before the untrusted code can interfere with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

SETUP_FAILED = 70
"""The exit code when a required layer could not be installed (then nothing ran)."""


# name: (x86_64, aarch64) numbers; aarch64 has no fork/vfork.
_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "tkill": (200, 130), "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224),
    "swapoff": (168, 225), "syslog": (103, 116), "pidfd_send_signal": (424, 424),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "pidfd_getfd": (438, 438), "mount_setattr": (442, 442),
    # Allowed or refused by their first argument:
    "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198), "socketpair": (53, 199),
    "kill": (62, 129), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "prctl": (157, 167),
}  # fmt: skip
_CONDITIONAL = ("clone", "clone3", "socket", "socketpair", "kill", "tgkill", "rt_sigqueueinfo")
_CONDITIONAL += ("rt_tgsigqueueinfo", "prctl")
_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # AUDIT_ARCH_*, column above
# CLONE_THREAD; CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_CLONE_THREAD, _CLONE_NAMESPACES = 0x00010000, 0x7E020000
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, …, RET|K
_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW, ERRNO|…


def _seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jump-if-true, jump-if-false, k); jumps are resolved from labels."""
    audit_arch, column = _ARCHES[machine]
    nr = {name: numbers[column] for name, numbers in _SYSCALLS.items() if numbers[column] is not None}
    code: list[Any] = [(_LD, 0, 0, 4), (_JEQ, 0, "deny", audit_arch)]
    code.append((_LD, 0, 0, 0))  # seccomp_data.nr
    if machine == "x86_64":
        code.append((_JGE, "deny", 0, 0x40000000))  # the x32 ABI's numbers
    code += [(_JEQ, "deny", 0, number) for name, number in nr.items() if name not in _CONDITIONAL]
    code += [(_JEQ, "enosys", 0, nr["clone3"]), (_JEQ, "clone", 0, nr["clone"])]  # glibc falls back to clone
    code += [(_JEQ, "socket", 0, nr["socket"]), (_JEQ, "socket", 0, nr["socketpair"])]
    code += [(_JEQ, "kill", 0, nr["kill"]), (_JEQ, "prctl", 0, nr["prctl"])]
    code += [(_JEQ, "self", 0, nr[name]) for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")]
    code += [(_RET, 0, 0, _ALLOW), "clone", (_LD, 0, 0, 16), (_JSET, 0, "deny", _CLONE_THREAD)]
    code += [(_JSET, "deny", "allow", _CLONE_NAMESPACES), "socket", (_LD, 0, 0, 16)]
    code += [(_JEQ, "allow", "deny", 1), "kill", (_LD, 0, 0, 16), (_JEQ, "allow", 0, 0)]  # AF_UNIX; kill(0)
    code += ["self", (_LD, 0, 0, 16), (_JEQ, "allow", "deny", pid), "prctl", (_LD, 0, 0, 16)]
    code += [(_JEQ, "deny", "allow", 1)]  # PR_SET_PDEATHSIG: the link to the parent stays
    code += ["allow", (_RET, 0, 0, _ALLOW), "deny", (_RET, 0, 0, _EPERM), "enosys", (_RET, 0, 0, _ENOSYS)]
    labels, index = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    program = [item for item in code if not isinstance(item, str)]
    return [
        (op, *(labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)), k)
        for i, (op, jt, jf, k) in enumerate(program)
    ]


def _landlock(syscall: Callable[..., int], workdir: str, readable: list[str]) -> None:
    """Allow reading `readable`, everything but executing in `workdir`, nothing else (+ net, scopes)."""
    import ctypes

    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available in this kernel")
    # Every file-system right the ABI knows: 13 in ABI 1, then REFER (2), TRUNCATE (3), IOCTL_DEV (5).
    fs = (1 << (13 if abi == 1 else 14 if abi == 2 else 15 if abi < 5 else 16)) - 1
    attr = (ctypes.c_uint64 * 3)(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)  # net: TCP; scopes
    ruleset = syscall(444, ctypes.byref(attr), 8 if abi < 4 else 16 if abi < 6 else 24, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    file_rights = fs & 0b1100000000000111  # those that apply to a file: execute, write, read, truncate, ioctl
    read, write_all = 0b1100, fs & ~1  # READ_FILE | READ_DIR; everything but EXECUTE
    for path, rights in [*((p, read) for p in readable), (workdir, write_all)]:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rights = rights if os.path.isdir(path) else rights & file_rights
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        if syscall(445, ruleset, 1, rule, 0) != 0:  # LANDLOCK_RULE_PATH_BENEATH
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        os.close(fd)
    if syscall(446, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def _contain(request: dict[str, object]) -> list[str]:
    """Install every layer it can; the untrusted program runs after this returns."""
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    limits, workdir = request["limits"], str(request["workdir"])
    assert isinstance(limits, dict) and isinstance(request["readable"], list)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the thread that started us
    if os.getppid() != request["parent"]:  # it died before that took effect
        os._exit(SETUP_FAILED)
    cpu = math.ceil(limits["cpu_seconds"])
    for limit, value in (
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2),
        (resource.RLIMIT_FSIZE, (limits["file_size_mb"] << 20,) * 2),
        (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
    ):
        resource.setrlimit(limit, value)
    layers = ["rlimits"]
    if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        layers.append("netns")
        # Counted per uid inside the new namespace only now; set before, it would count the uid's
        # processes machine-wide.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which Landlock and seccomp need
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    errors = []
    try:
        _landlock(libc.syscall, workdir, request["readable"])
        layers.append("landlock")
    except OSError as error:
        errors.append(f"landlock: {error}")
    machine = os.uname().machine
    program = _seccomp_program(machine, os.getpid()) if machine in _ARCHES else []
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in program))
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(filters))  # struct sock_fprog
    if program and libc.prctl(22, 2, ctypes.create_string_buffer(fprog, 16), 0, 0) == 0:  # PR_SET_SECCOMP
        layers.append("seccomp")
    else:
        errors.append(f"seccomp: not available on {machine} ({os.strerror(ctypes.get_errno())})")
    missing = [layer for layer in limits["require"] if layer not in layers]
    if missing:
        raise OSError(f"required layers {missing} could not be installed: {'; '.join(errors)}")
    if limits["audit_hook"]:
        _audit_hook(workdir, request["readable"])
        layers.append("audit_hook")
    return layers


def _audit_hook(workdir: str, readable: list[str]) -> None:
    """Best effort (see the module docstring): refuse processes, sockets, ctypes, signals, and opens
    outside the working directory (reads: or the readable roots)."""
    refused = ("os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.kill")
    refused += ("subprocess.Popen", "pty.spawn", "socket.", "ctypes.dlopen", "ctypes.cdata", "ctypes.call")
    roots = tuple(os.path.realpath(p) for p in readable)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path: str, bases: tuple[str, ...]) -> bool:
        return any(path == base or path.startswith(base.rstrip(os.sep) + os.sep) for base in bases)

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event.startswith(refused):
            raise PermissionError(f"icepop sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], str | bytes):
            path, mode, flags = os.path.realpath(os.fsdecode(args[0])), args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & writes
            )
            if not inside(path, (workdir,) if writing else (workdir, *roots)):
                raise PermissionError(f"icepop sandbox: may not open {path!r}")

    sys.addaudithook(hook)


def _child_main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token, program = request.pop("token"), request.pop("program")
    try:
        layers = _contain(request)
    except OSError as error:
        sys.stderr.write(f"icepop-sandbox-setup {token}: {error}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    sys.stdout.write(f"{token} ready {','.join(layers)}\n")
    sys.stdout.flush()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<sample>", "exec"), namespace)
    except BaseException as error:  # SystemExit too: exiting early is not passing
        name = type(error).__name__
        del error
        namespace.clear()  # frees what it allocated, so a MemoryError can still be reported
        with contextlib.suppress(BaseException):
            traceback.print_exc()
        sys.stderr.write(f"\n{name}\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write(f"\n{token} passed\n")
    sys.stdout.flush()
    os._exit(0)  # skips atexit handlers the program registered


if __name__ == "__main__":
    _child_main()
