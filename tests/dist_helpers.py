"""Run a function on N ranks as spawned processes (real torch.distributed over gloo), for tests.

A failing or hung rank must not hang the test: the parent polls, and as soon as one rank exits
with an error (the others would wait in a collective until the gloo timeout) or the deadline
passes, it kills the rest and raises with every rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icepop.ray import hosts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range (icepop's own)."""
    return hosts.free_port()


def _entry(
    fn: Callable[..., None], rank: int, world_size: int, error_dir: str, args: tuple[Any, ...]
) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on two cores; more threads per rank only thrash
    try:
        fn(rank, world_size, *args)
    except BaseException:
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_ranks(
    fn: Callable[..., None], world_size: int, *args: Any, error_dir: Path, timeout_s: float
) -> None:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes and wait for all of them;
    fn and args must be picklable (fn a module-level function)."""
    error_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at start
    try:
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, str(error_dir), args))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()
    codes = [p.exitcode for p in procs]
    if any(code != 0 for code in codes):
        errors = "\n".join(f.read_text() for f in sorted(error_dir.glob("rank*.txt")))
        raise AssertionError(f"ranks exited with {codes} (timeout {timeout_s:.0f} s):\n{errors}")


def send_file(port: int, path: str) -> None:
    """A stand-in for trainer rank 0 (run in a spawned process): broadcast a safetensors file's tensors in
    two buckets over a weight group of two (icepop.comm). Kept here, in a module that imports little,
    so that a spawned process starts in seconds."""
    import torch
    from safetensors.torch import load_file

    from icepop import comm

    group = comm.weight_group("127.0.0.1", port, 0, 2, torch.device("cpu"))
    state = load_file(path)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    comm.send_tensors(group, [{n: state[n] for n in half} for half in halves], torch.device("cpu"))
