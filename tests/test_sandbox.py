"""The code sandbox, checked from outside: right HumanEval solutions pass, wrong ones fail, and every
escape attempt scores 0 and is contained, which the test asserts on the parent's side (the target
file is absent, the listener got no connection, no process outlived the sample), never from what
the sample reports. The escape tests run with the audit hook off: the kernel layers alone hold."""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from icepop.data.tasks import generate_problems, humaneval_problem, humaneval_problems, problem
from icepop.rewards import RewardPool, verify
from icepop.rewards.sandbox import SandboxLimits, SandboxResult, run_many, run_python
from icepop.rewards.verifiers import code_program, extract_code
from icepop.types import Prompt

KERNEL_ONLY = SandboxLimits(timeout_seconds=2.0, cpu_seconds=2.0, audit_hook=False)
BOTH = [KERNEL_ONLY, SandboxLimits(timeout_seconds=2.0, cpu_seconds=2.0)]
HUMANEVAL = [0, 2, 53, 162]  # 162 needs hashlib (libcrypto: a system library the sandbox may read)


def sessions() -> dict[int, int]:
    """pid → session id of every process on the machine."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:  # it exited meanwhile
            continue
        if stat:
            found[int(entry)] = int(stat.rsplit(")", 1)[1].split()[3])  # state ppid pgrp session
    return found


def assert_nothing_left(result: SandboxResult) -> None:
    """The sample's session (its pid) has no process left: nothing it started outlived it."""
    assert result.pid not in sessions().values()


def assert_contained(result: SandboxResult, *secret: str) -> None:
    assert not result.passed and result.reason == "failed", result
    assert {"landlock", "seccomp"} <= set(result.layers)
    for text in secret:
        assert text not in result.stdout_tail and text not in result.stderr_tail
    assert_nothing_left(result)


@pytest.mark.parametrize("index", HUMANEVAL)
def test_humaneval_solutions_pass_and_wrong_ones_fail(index: int) -> None:
    p = humaneval_problem(index)
    assert p == list(generate_problems("humaneval", seed=0, count=index + 1))[index] and p.task == "code"
    canonical = humaneval_problems()[index]["canonical_solution"]
    assert verify("code", p.target_reply, p.answer) == 1.0  # the whole function in a ```python block
    assert verify("code", canonical, p.answer) == 1.0  # only the body, as HumanEval completes prompts
    assert verify("code", "```python\n" + p.answer["prompt"] + "    return None\n```", p.answer) == 0.0
    assert verify("code", "def broken(:\n", p.answer) == 0.0  # a syntax error is a failure


def test_humaneval_task_is_the_fixed_set() -> None:
    everything = list(generate_problems("humaneval", seed=3, count=1000))
    assert len(everything) == 164 == len(list(generate_problems("humaneval", seed=4)))
    assert everything == list(generate_problems("humaneval", seed=4, count=164))  # the seed changes nothing
    assert [p.answer["task_id"] for p in everything[:2]] == ["HumanEval/0", "HumanEval/1"]
    with pytest.raises(ValueError, match="index=164"):
        problem("humaneval", 0, 164)
    with pytest.raises(ValueError, match="no options"):
        problem("humaneval", 0, 0, digits=2)


def test_code_answers_and_extraction() -> None:
    reply = "Here it is:\n```python\ndef double(x):\n    return 2 * x\n```\nDone."
    assert extract_code(reply) == "def double(x):\n    return 2 * x\n"
    assert extract_code("```py\nfirst = 1\n```\nbetter:\n```\nsecond = 2\n```") == "second = 2\n"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1\n"  # cut at max_new_tokens
    assert extract_code("x = 1") == "x = 1"
    # A dataset row's answer may be the test program alone.
    assert verify("code", reply, "assert double(4) == 8") == 1.0
    assert verify("code", reply, "assert double(4) == 9") == 0.0
    answer = {"test": "def check(f):\n    assert f(3) == 6", "entry_point": "double"}
    assert code_program("def double(x): return x + x", answer)[0].endswith("check(double)\n")
    assert verify("code", "def double(x): return x + x", answer) == 1.0
    for bad, field in [(42, "test"), ({"test": ""}, "test"), ({"test": "pass", "prompt": 1}, "prompt")]:
        with pytest.raises(ValueError, match=field):
            verify("code", "x = 1", bad)
    with pytest.raises(ValueError, match="entry_point"):
        verify("code", "x = 1", {"test": "pass", "entry_point": "a; import os"})
    with pytest.raises(ValueError, match="timeout_seconds"):
        verify("code", "x = 1", {"test": "pass", "timeout_seconds": 0})
    with pytest.raises(ValueError, match=r"SandboxLimits\.memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="unknown layers"):
        SandboxLimits(require=("chroot",))


@pytest.mark.parametrize(
    "exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"]
)
def test_exiting_early_is_not_passing(exit_call: str) -> None:
    # The tests never ran: a program that leaves with status 0 before them must not be paid.
    answer = {"test": "def check(f):\n    assert f() == 1", "entry_point": "one"}
    assert verify("code", f"def one():\n    return 2\n{exit_call}\n", answer) == 0.0


@pytest.mark.parametrize("limits", BOTH, ids=["kernel", "with_audit_hook"])
def test_writing_outside_its_directory_is_refused(tmp_path: Path, limits: SandboxLimits) -> None:
    targets = [tmp_path / "escaped.txt", Path(f"/tmp/icepop-escape-{secrets.token_hex(8)}.txt")]
    for target in targets:  # each attempt alone: the first refusal must not hide the second
        assert_contained(run_python(f"open({str(target)!r}, 'w').write('escaped')", limits))
        assert not target.exists()
    own = "import os\nos.makedirs('inside/ok')\nopen('inside/ok/f', 'w').write('allowed')\n"
    assert run_python(own, limits).passed  # its own directory is writable


@pytest.mark.parametrize("limits", BOTH, ids=["kernel", "with_audit_hook"])
def test_run_directory_and_parent_environment_stay_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: SandboxLimits
) -> None:
    secret, env_secret = secrets.token_hex(16), secrets.token_hex(16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "secret.txt").write_text(secret)
    (run_dir / "secret.txt").chmod(0o644)  # readable by anyone as far as file modes go
    hidden_name = f"checkpoint-{secrets.token_hex(8)}"  # appears only if the directory can be listed
    (run_dir / hidden_name).write_text("weights")
    monkeypatch.setenv("ICEPOP_TEST_SECRET", env_secret)
    for program in [
        f"print(open({str(run_dir / 'secret.txt')!r}).read())",
        f"import os\nprint(os.listdir({str(run_dir)!r}))",
        "import os\nprint(os.environ['ICEPOP_TEST_SECRET'])",
        "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        f"print(open('/proc/{os.getpid()}/environ').read())",
        "import os\nprint(open(os.path.expanduser('~/.bash_history')).read())",
    ]:
        assert_contained(run_python(program, limits), secret, env_secret, hidden_name)


@pytest.mark.parametrize("limits", BOTH, ids=["kernel", "with_audit_hook"])
def test_no_network_even_to_localhost(limits: SandboxLimits) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    try:
        for program in [
            f"import socket\nsocket.create_connection(('127.0.0.1', {tcp_port}), timeout=1).sendall(b'hi')",
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'hi', ('127.0.0.1', {udp_port}))",
            f"import socket\nsocket.create_connection(('::1', {tcp_port}), timeout=1)",
            "import socket\nsocket.create_server(('0.0.0.0', 0))",
        ]:
            assert_contained(run_python(program, limits))
        tcp.settimeout(0.2)
        udp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
    finally:
        tcp.close()
        udp.close()


def parents() -> dict[int, int]:
    """pid → parent pid of every process on the machine."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            found[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return found


def test_fork_bomb_starts_nothing() -> None:
    baseline = len(sessions())
    quick = run_python("import os\nwhile True:\n    os.fork()", KERNEL_ONLY)
    assert_contained(quick)
    assert quick.duration_seconds < 1.5  # the first fork fails; nothing to clean up
    # One that keeps trying until it is killed; meanwhile, look for any child of the sandbox.
    stubborn = "import os, subprocess, sys\nwhile True:\n"
    stubborn += "    for start in (os.fork, lambda: subprocess.Popen([sys.executable])):\n"
    stubborn += "        try:\n            start()\n        except OSError:\n            pass\n"
    results: list[SandboxResult] = []
    worker = threading.Thread(target=lambda: results.append(run_python(stubborn, KERNEL_ONLY)))
    worker.start()
    seen_sandboxes, grandchildren, machine_most = set(), 0, 0
    while worker.is_alive():
        tree = parents()
        sandboxes = {pid for pid, parent in tree.items() if parent == os.getpid()} & sandbox_processes()
        seen_sandboxes |= sandboxes
        grandchildren = max(grandchildren, sum(parent in sandboxes for parent in tree.values()))
        machine_most = max(machine_most, len(tree))
        time.sleep(0.05)
    worker.join()
    (result,) = results
    assert result.reason in ("timeout", "cpu_time") and result.duration_seconds < 2.0 + 1.0
    assert seen_sandboxes == {result.pid} and grandchildren == 0  # it never had a child
    assert machine_most < baseline + 200  # nor did anything escape the tree (a bomb makes thousands)
    assert_nothing_left(result)


def test_unbounded_allocation_scores_0_and_leaves_the_parent_alone() -> None:
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for program in ["x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", "b = b'x' * 2**40"]:
        result = run_python(program, KERNEL_ONLY)
        assert not result.passed and result.reason == "memory", result
        assert_nothing_left(result)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - parent_peak < 50 * 1024


def test_sleeping_forever_is_killed_at_the_timeout() -> None:
    limits = SandboxLimits(timeout_seconds=1.0, cpu_seconds=1.0, audit_hook=False)
    for program in ["import time\ntime.sleep(10**6)", "import signal\nsignal.pause()"]:
        result = run_python(program, limits)
        assert not result.passed and result.reason == "timeout"
        assert 1.0 <= result.duration_seconds < 1.0 + 1.0
        assert_nothing_left(result)
    spin = run_python("while True:\n    pass", SandboxLimits(timeout_seconds=5.0, cpu_seconds=1.0))
    assert spin.reason == "cpu_time" and spin.duration_seconds < 5.0


def test_many_samples_in_parallel_score_correctly() -> None:
    programs, expected = [], []
    for index in range(8):
        p = humaneval_problem(index)
        programs.append(code_program(p.target_reply, p.answer)[0])
        programs.append(code_program(p.answer["prompt"] + "    return None\n", p.answer)[0])
        expected += [True, False]
    results = run_many(programs, SandboxLimits(timeout_seconds=10.0, cpu_seconds=10.0), max_parallel=4)
    assert [r.passed for r in results] == expected
    assert len({r.pid for r in results}) == len(programs)
    with pytest.raises(ValueError, match="max_parallel"):
        run_many(programs, max_parallel=0)


def sandbox_processes() -> set[int]:
    """Processes running the sandbox's prelude, machine-wide."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if b"icepop/rewards/sandbox_child.py" in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.add(int(entry))
    return found


@contextlib.contextmanager
def own_sandboxes() -> Iterator[set[int]]:
    """The sandbox processes started below this process while the block runs (its descendants, polled
    every 10 ms): this test's own, whatever other tests run sandboxes beside it on the machine."""
    seen: set[int] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any("icepop/rewards/sandbox_child.py" in part for part in child.cmdline()):
                        seen.add(child.pid)
            done.wait(0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def test_reward_pool_scores_code_and_a_killed_worker_takes_its_sandbox_along() -> None:
    p = humaneval_problem(0)
    sleep = "import time\ntime.sleep(10**6)"
    prompts = [Prompt([1], p.answer, "code"), Prompt([1], p.answer, "code")]
    prompts.append(Prompt([1], {"test": sleep, "timeout_seconds": 1.0}, "code"))  # the sandbox ends it
    prompts.append(Prompt([1], {"test": sleep, "timeout_seconds": 60.0}, "code"))  # above the pool's limit
    replies = [p.target_reply, "    return None", "pass", "pass"]
    workdirs = set(Path(tempfile.gettempdir()).glob("icepop-sandbox-*"))
    with own_sandboxes() as ours, RewardPool(None, num_workers=2, timeout_s=3.0) as pool:
        started = time.monotonic()
        scores = pool.score(prompts, replies)
    assert scores.rewards == [1.0, 0.0, 0.0, 0.0]
    # Only the misconfigured sample needed the pool to kill its worker; the 1 s one the sandbox ended.
    assert scores.stats == {"reward/errors": 0.0, "reward/timeouts": 1.0}
    assert time.monotonic() - started < 3.0 + 2.0
    # PR_SET_PDEATHSIG: the killed worker's sandbox died with it instead of sleeping on. (Only this
    # test's sandboxes count: a multi-turn test beside it runs the Python tool's.)
    assert len(ours) >= 2  # the watcher saw at least the two sleeping ones (alive for 1 s and 3 s)
    deadline = time.monotonic() + 2.0
    while ours & sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours & sandbox_processes()
    for leftover in set(Path(tempfile.gettempdir()).glob("icepop-sandbox-*")) - workdirs:
        shutil.rmtree(leftover)  # the killed worker could not remove its sample's directory
