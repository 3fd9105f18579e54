"""Measuring a benchmark's subprocess: run it in its own session and poll the memory of its whole
process tree (and of its Ray actors by class) while it runs. Shared by bench/vs_trl.py and
bench/lora_vs_full.py."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

POLL_SECONDS = 0.5
PSS_EVERY = 6
"""PSS every 6th poll (3 s), RSS at every one. Reading a process's PSS walks its page tables
(/proc/PID/smaps_rollup): ≈150 ms a poll for icepop's SmolLM2 tree of ≈10 GB, which at every 0.5 s took
≈30% of a core and slowed icepop's step from 11.3 to 13.9 s (TRL's one process less). RSS (statm) is
cheap. A phase at peak memory lasts longer than 3 s in these workloads (the update: ≈9 s)."""
GB = 1e9


class TreeMemory:
    """Peak RSS/PSS (bytes) of a process and all its descendants, summed, and of the tree's Ray actors of
    each class in `actors` (the peak of their sum and each process's own peak), polled in a thread (PSS
    at every PSS_EVERY-th poll); the trace keeps, at every poll, the first actor class's RSS and the
    tree's."""

    def __init__(self, pid: int, actors: tuple[str, ...] = ()) -> None:
        self.root = psutil.Process(pid)
        self.actors = actors
        self.peak_rss = self.peak_pss = 0
        self.actor_pids: dict[str, set[int]] = {name: set() for name in self.actors}
        self.peak_sum_rss = dict.fromkeys(self.actors, 0)
        self.peak_sum_pss = dict.fromkeys(self.actors, 0)
        self.peak_each_rss: dict[int, int] = {}
        self.peak_each_pss: dict[int, int] = {}
        self.samples = 0
        self.started = time.time()
        self.trace: list[
            tuple[float, float, float]
        ] = []  # (seconds since start, trainer RSS GB, tree RSS GB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _actor(self, process: psutil.Process) -> str | None:
        for name, pids in self.actor_pids.items():
            if process.pid in pids:  # once seen: Ray retitles an actor by its current method
                return name
        title = " ".join(process.cmdline()) + " " + process.name()
        for name in self.actors:
            if name in title:
                self.actor_pids[name].add(process.pid)
                return name
        return None

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            with_pss = self.samples % PSS_EVERY == 0
            rss = pss = 0
            actor_rss, actor_pss = dict.fromkeys(self.actors, 0), dict.fromkeys(self.actors, 0)
            for process in processes:
                try:
                    info = process.memory_full_info() if with_pss else process.memory_info()
                    actor = self._actor(process)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                one_pss = getattr(info, "pss", 0)
                rss, pss = rss + info.rss, pss + one_pss
                if actor is not None:
                    actor_rss[actor] += info.rss
                    actor_pss[actor] += one_pss
                    pid = process.pid
                    self.peak_each_rss[pid] = max(self.peak_each_rss.get(pid, 0), info.rss)
                    self.peak_each_pss[pid] = max(self.peak_each_pss.get(pid, 0), one_pss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            for name in self.actors:
                self.peak_sum_rss[name] = max(self.peak_sum_rss[name], actor_rss[name])
                self.peak_sum_pss[name] = max(self.peak_sum_pss[name], actor_pss[name])
            self.samples += 1
            first = actor_rss[self.actors[0]] if self.actors else 0
            self.trace.append((time.time() - self.started, first / GB, rss / GB))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tree_peak_rss_gb": self.peak_rss / GB,
            "tree_peak_pss_gb": self.peak_pss / GB,
            "samples": self.samples,
            "trace": [[round(t, 1), round(trainer, 3), round(tree, 3)] for t, trainer, tree in self.trace],
        }
        for name in self.actors:
            key = name.removesuffix("Host").lower()
            pids = sorted(self.actor_pids[name])
            out[f"{key}_processes"] = len(pids)
            out[f"{key}_peak_rss_gb"] = self.peak_sum_rss[name] / GB
            out[f"{key}_peak_pss_gb"] = self.peak_sum_pss[name] / GB
            out[f"{key}_each"] = [
                {
                    "pid": pid,
                    "peak_rss_gb": self.peak_each_rss[pid] / GB,
                    "peak_pss_gb": self.peak_each_pss[pid] / GB,
                }
                for pid in pids
                if pid in self.peak_each_rss
            ]
        return out


def run_measured(
    command: list[str],
    log: Path,
    cwd: Path,
    env: dict[str, str],
    actors: tuple[str, ...] = (),
    on_poll: Callable[[], None] | None = None,
) -> tuple[int, TreeMemory]:
    """Run `command` (output to `log`) in its own session while a TreeMemory polls it, calling `on_poll`
    after every poll interval; on any exception (Ctrl-C included) the session is terminated. Returns the
    exit status and the stopped TreeMemory."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        memory = TreeMemory(process.pid, actors)
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                if on_poll is not None:
                    on_poll()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)  # our own child's session only
            process.wait()
            raise
        finally:
            memory.stop()
    return process.returncode, memory
