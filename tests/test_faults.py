"""Exact resume and surviving faults, on real runs of `python -m icepop.train +recipe=rlvr`:

- a rollout engine killed mid-run is restarted, re-synced and its step retried: the run's metrics
  equal the uninterrupted run's; then the same run is killed with SIGKILL (driver, Ray and every
  worker at once), resumes from its last complete checkpoint, and its later steps equal those of the
  uninterrupted run too (one run serves both faults);
- a trainer rank killed mid-run stops the run quickly with a message naming the rank and the
  checkpoint to resume from, and no complete checkpoint is lost;
- NaN losses skip their update, are counted, and stop the run after `train.max_nonfinite_steps` in a
  row; a reward function that hangs is timed out and scored 0 without stopping the run.

Faults come from outside where they can (signals to the processes, found by their Ray actor class in
the process title); the NaN is injected into the loss with `train.inject_nonfinite_steps`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from e2e_helpers import REFERENCE, Run, assert_same_steps

from icepop.stages import checkpoint
from icepop.tracking import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # whole runs of python -m icepop.train, killed and resumed

RUN = [*REFERENCE, "run.dir=run"]


def start(tmp_path: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    """The run in tmp_path, in a session of its own (so that a SIGKILL reaches all of it); `cache` is the
    session's, which holds the tiny model's SFT warm-up."""
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "ICEPOP_CACHE": str(cache),
        "PYTHONPATH": tests,
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen([sys.executable, "-m", "icepop.train", *RUN, *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(run: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = run.communicate(timeout=timeout)
    return output


@contextlib.contextmanager
def running(tmp_path: Path, cache: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """A started run that is killed (with all its processes) if the test leaves early."""
    run = start(tmp_path, cache, *overrides)
    try:
        yield run
    finally:
        if run.poll() is None:
            kill_all(run.pid)
            run.communicate(timeout=60)


def kill_all(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a machine failure would."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def wait_for(condition: Callable[[], bool], run: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended before {what}:\n{run.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def restarted_step(run_dir: Path) -> int | None:
    """The first logged step that counts an engine restart."""
    return next((r["step"] for r in read_metrics(run_dir) if r["fault/engine_restarts"]), None)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len([line for line in path.read_text().splitlines() if line.strip()]) if path.is_file() else 0


def actor_processes(pid: int, actor_class: str) -> list[psutil.Process]:
    """The run's Ray actor processes of one role, by the class in their process title."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if f"ray::{actor_class}" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def reference(reference_run: Run) -> list[dict]:
    """The uninterrupted run (shared with test_multinode): its metrics, its checkpoints pruned to the
    last two."""
    run_dir = reference_run.dir
    assert [step for step, _ in checkpoint.complete_checkpoints(run_dir)] == [4, 6]  # keep_last=2
    assert not list((run_dir / "checkpoints").glob(".*"))  # no partial folder left
    return read_metrics(run_dir)


@dataclass
class Killed:
    """The run whose engine was killed (and restarted), then the whole of it with SIGKILL."""

    output: str
    returncode: int
    rows: list[dict]
    """Its metrics as they were when it was killed."""
    events: list[dict]
    latest: tuple[int, Path] | None
    """Its last complete checkpoint then."""
    latest_state: dict
    """That checkpoint's state.json (the resumed run prunes the checkpoint later: keep_last)."""
    run_dir: Path
    resumed_returncode: int
    """The same command run again afterwards: it resumes."""
    resumed_output: str
    logged_at_kill: int
    """Steps logged when the engine was killed."""


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Killed:
    tmp_path = tmp_path_factory.mktemp("killed")
    run_dir = tmp_path / "run"
    with running(tmp_path, shared_cache) as run:
        wait_for(lambda: steps_logged(run_dir) >= 1, run, "step 1")
        (engine,) = actor_processes(run.pid, "EngineHost")
        engine.kill()
        logged = steps_logged(run_dir)
        # The engine is restarted and the step retried; once that step is logged (and a checkpoint is
        # complete), the whole run is killed at once, as a machine failure would. (Waiting for a step
        # count instead raced: the kill can land a step later than the poll saw, after its push.)
        wait_for(lambda: checkpoint.latest(run_dir) is not None and restarted_step(run_dir) is not None, run,
                 "the engine's restart logged, after the first checkpoint")  # fmt: skip
        kill_all(run.pid)
        output = finish(run, timeout=60)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rows, latest = read_metrics(run_dir), checkpoint.latest(run_dir)
    state = checkpoint.read_state(latest[1]) if latest is not None else {}
    resumed = start(tmp_path, shared_cache)
    resumed_output = finish(resumed)
    return Killed(output, run.returncode, rows, events, latest, state, run_dir, resumed.returncode,
                  resumed_output, logged)  # fmt: skip


def test_killed_engine_is_restarted_and_the_step_retried(killed: Killed, reference: list[dict]) -> None:
    assert "rollout engine 0 died" in killed.output
    restarted = [r for r in killed.rows if r["fault/engine_restarts"] == 1]
    # The death is noticed in the step under way at the kill, or (killed after its push) in the next.
    assert restarted and restarted[0]["step"] <= killed.logged_at_kill + 2
    assert [e["event"] for e in killed.events if "event" in e] == ["engine_restarted"]
    # The restarted engine got the current weights (the probe checks every later sync) and the
    # retried step sampled exactly what it would have: the run equals the uninterrupted one.
    assert_same_steps(killed.rows, reference, range(1, len(killed.rows) + 1))


def test_sigkill_mid_training_then_resume_continues_exactly(killed: Killed, reference: list[dict]) -> None:
    assert killed.returncode == -signal.SIGKILL
    assert killed.latest is not None and killed.latest[0] in (2, 4)  # complete checkpoints survived the kill
    latest = killed.latest
    assert killed.latest_state["step"] == latest[0]
    assert killed.resumed_returncode == 0, killed.resumed_output[-4000:]
    assert f"resumed from {latest[1]} (step {latest[0]} of 6)" in killed.resumed_output
    rows = read_metrics(killed.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint were redone once
    assert_same_steps(rows, reference, range(1, 7))
    assert [step for step, _ in checkpoint.complete_checkpoints(killed.run_dir)] == [4, 6]


def test_dead_trainer_rank_stops_the_run_fast_and_keeps_checkpoints(
    tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    with running(tmp_path, shared_cache) as run:
        wait_for(lambda: checkpoint.latest(run_dir) is not None and steps_logged(run_dir) >= 3, run,
                 "step 3 after the first checkpoint")  # fmt: skip
        ranks = actor_processes(run.pid, "TrainerHost")
        assert len(ranks) == 2
        ranks[-1].kill()
        killed = time.monotonic()
        output = finish(run, timeout=300)  # the survivors' collective would wait 30 min for the dead rank
        stopped_after = time.monotonic() - killed
    assert run.returncode != 0
    assert "trainer rank" in output and "died at step" in output, output[-4000:]
    latest = checkpoint.latest(run_dir)
    assert latest is not None and f"run.dir={run_dir.resolve()}" in output.replace("\n", "")
    assert f"The last complete checkpoint is {latest[1]}" in output.replace("\n", "")
    assert (latest[1] / "model.safetensors").is_file() and (latest[1] / "trainer").is_dir()
    assert stopped_after < 240, stopped_after


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path: Path, shared_cache: Path) -> None:
    faults = ["train.inject_nonfinite_steps=[2,4,5,6]", "train.max_nonfinite_steps=3",
              "reward.function=e2e_rewards:hangs_sometimes", "reward.timeout_seconds=1"]  # fmt: skip
    run = start(tmp_path, shared_cache, "train.steps=8", *faults)
    output = finish(run)
    assert run.returncode != 0
    assert "3 steps in a row (up to step 6) had a NaN/inf loss" in output.replace("\n", ""), output[-4000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # stopped at the third skip in a row
    assert [r["actor/nonfinite_skipped"] for r in rows] == [0, 1, 0, 1, 1, 1]
    assert all(r["actor/grad_norm"] is None for r in rows if r["actor/nonfinite_skipped"])  # inf → null
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "nonfinite_update_skipped"]
    assert [(e["step"], e["in_a_row"]) for e in skipped] == [(2, 1), (4, 1), (5, 2), (6, 3)]
    # The step-2 and step-4 checkpoints are complete; nothing was written for the stopped step.
    assert [step for step, _ in checkpoint.complete_checkpoints(tmp_path / "run")] == [2, 4]
    # The hanging reward calls were timed out and scored 0, and the run went on.
    assert sum(r["reward/timeouts"] for r in rows) > 0
