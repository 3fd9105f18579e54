"""Score (prompt, response) pairs in worker processes, each sample under its own time limit.

Key design choice: one pipe per worker and one sample in flight per worker, so a sample that raises,
hangs or kills its process costs exactly that sample (reward 0.0, counted in `reward/errors` or
`reward/timeouts`) and a stuck worker is killed and replaced before the next sample is sent. The
workers come from a forkserver (or spawn) context, never plain fork: the caller also runs Ray and
torch threads, which a fork would copy in a broken state. The forkserver preloads the verifiers and
math-verify, so a replacement worker starts in milliseconds.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from icepop.rewards.verifiers import BUILTIN_REWARD, resolve_reward_fn
from icepop.types import Prompt

logger = logging.getLogger(__name__)

START_METHODS = ("forkserver", "spawn")


@dataclass
class Scores:
    """Rewards for one batch, in input order, and what went wrong while computing them."""

    rewards: list[float]
    """One reward per (prompt, response); 0.0 for samples that raised or timed out."""
    stats: dict[str, float]
    """"reward/errors" and "reward/timeouts": how many samples scored 0.0 for that reason."""
    first_error: str | None = None
    """The traceback of the first sample that raised, if any."""


def _worker_main(conn: Connection, reward_fn: str, sys_path: list[str]) -> None:
    """Worker loop: report readiness, then answer (index, prompt, text) with (index, reward, error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle; it closes the pool
    sys.path[:] = sys_path  # the caller's path, so that its reward module imports here too
    try:
        fn = resolve_reward_fn(reward_fn)
    except BaseException:
        conn.send(("ready", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the caller went away
            return
        if request is None:
            return
        index, prompt, text = request
        try:
            reward = float(fn(prompt, text))
            if not math.isfinite(reward):
                raise ValueError(f"reward function returned {reward}")
            conn.send((index, reward, None))
        except Exception:
            conn.send((index, 0.0, traceback.format_exc()))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection


def _stop(worker: _Worker, graceful: bool) -> None:
    """Ask a worker to exit (graceful) or kill it; either way it is reaped and its pipe closed."""
    if graceful:
        try:
            worker.conn.send(None)
        except OSError:
            pass  # already gone: nothing to ask
        worker.process.join(timeout=2.0)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(timeout=5.0)
    worker.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        _stop(worker, graceful=True)
    workers.clear()


@dataclass
class _Progress:
    """The state of one `score` call."""

    rewards: list[float]
    pending: deque[int]
    idle: list[int]
    running: dict[int, tuple[int, float]] = field(default_factory=dict)  # slot → (sample, deadline)
    errors: list[str] = field(default_factory=list)
    timeouts: int = 0


class RewardPool:
    """A fixed set of worker processes that call one reward function `fn(prompt, response_text)`."""

    def __init__(
        self,
        reward_fn: str | None = None,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        start_method: str = "forkserver",
        startup_timeout_s: float = 120.0,
    ) -> None:
        """reward_fn: "package.module:function", or None for the built-in verifiers (by prompt.task)."""
        if num_workers < 1 or not timeout_s > 0:
            raise ValueError(f"need num_workers={num_workers} >= 1 and timeout_s={timeout_s} > 0")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is not one of {', '.join(START_METHODS)}")
        self.reward_fn = reward_fn or BUILTIN_REWARD
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        resolve_reward_fn(self.reward_fn)  # a wrong path fails here, in the caller, with a clear message
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":  # no effect if this process's forkserver already runs
            self._context.set_forkserver_preload(["icepop.rewards.verifiers", "math_verify"])
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        try:
            self._workers.extend(self._launch() for _ in range(num_workers))
            for worker in self._workers:  # they start in parallel; wait for all
                self._await_ready(worker)
        except BaseException:
            self.close()
            raise

    def _launch(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        # daemon: the workers die with the caller even if close() is never reached.
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self.reward_fn, list(sys.path)), daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _await_ready(self, worker: _Worker) -> None:
        """Block until the worker has imported the reward function; raise if it cannot."""
        if not worker.conn.poll(self.startup_timeout_s):
            raise RuntimeError(f"a reward worker did not start within {self.startup_timeout_s} s")
        try:
            _, error = worker.conn.recv()
        except EOFError:
            error = f"the process exited with code {worker.process.exitcode}"
        if error is not None:
            raise RuntimeError(f"a reward worker could not load {self.reward_fn!r}:\n{error}")

    def _replace(self, slot: int) -> None:
        _stop(self._workers[slot], graceful=False)
        self._workers[slot] = self._launch()
        self._await_ready(self._workers[slot])

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a stuck worker is replaced)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Scores:
        """Reward of responses[i] to prompts[i]; an error or a timeout gives 0.0 and is counted.

        Only an interruption of the caller itself (Ctrl-C, a worker that cannot be restarted) raises,
        and it closes the pool first."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; they pair up by index")
        if not self._finalizer.alive:
            raise RuntimeError("this RewardPool is closed")
        progress = _Progress(
            [0.0] * len(prompts), deque(range(len(prompts))), list(range(len(self._workers)))
        )
        try:
            while progress.pending or progress.running:
                self._dispatch(progress, prompts, responses)
                self._collect(progress)
        except BaseException:  # e.g. Ctrl-C: busy workers would answer into the next batch; stop them all
            self.close()
            raise
        if progress.errors:
            logger.warning(
                "reward function failed on %d of %d samples (scored 0.0); first error:\n%s",
                len(progress.errors),
                len(prompts),
                progress.errors[0],
            )
        if progress.timeouts:
            logger.warning(
                "%d of %d samples timed out after %s s", progress.timeouts, len(prompts), self.timeout_s
            )
        stats = {"reward/errors": float(len(progress.errors)), "reward/timeouts": float(progress.timeouts)}
        return Scores(progress.rewards, stats, progress.errors[0] if progress.errors else None)

    def _dispatch(self, progress: _Progress, prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
        """Send pending samples to idle workers, one each."""
        while progress.pending and progress.idle:
            slot, index = progress.idle.pop(), progress.pending.popleft()
            try:
                self._workers[slot].conn.send((index, prompts[index], responses[index]))
            except OSError:  # the worker died while idle (e.g. killed from outside): replace, retry
                self._replace(slot)
                progress.idle.append(slot)
                progress.pending.appendleft(index)
                continue
            except Exception:  # the sample itself cannot be pickled: its error, not the worker's
                progress.errors.append(traceback.format_exc())
                progress.idle.append(slot)
                continue
            progress.running[slot] = (index, time.monotonic() + self.timeout_s)

    def _collect(self, progress: _Progress) -> None:
        """Wait for the first answer or deadline; record answers, kill and replace overdue workers."""
        if not progress.running:
            return
        by_conn = {self._workers[slot].conn: slot for slot in progress.running}
        soonest = min(deadline for _, deadline in progress.running.values())
        for conn in wait(list(by_conn), timeout=max(0.0, soonest - time.monotonic())):
            slot = by_conn[conn]
            index, _ = progress.running.pop(slot)
            reply: Any
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                reply = (index, 0.0, "the reward worker process died while scoring this sample")
                self._replace(slot)
            replied_index, progress.rewards[index], error = reply
            if replied_index != index:
                raise RuntimeError(f"reward worker answered sample {replied_index} for sample {index}")
            if error is not None:
                progress.errors.append(error)
            progress.idle.append(slot)
        now = time.monotonic()
        for slot, (index, deadline) in list(progress.running.items()):
            if deadline <= now:
                del progress.running[slot]
                progress.rewards[index] = 0.0
                progress.timeouts += 1
                self._replace(slot)
                progress.idle.append(slot)

    def close(self) -> None:
        """Stop every worker (asked first, killed if stuck); idempotent, also run at exit and on GC."""
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
