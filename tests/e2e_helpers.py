"""Running `python -m icepop.train` from the end-to-end tests, with their reduced sizes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

SMALL = [
    "algo.prompts_per_step=4",
    "algo.samples_per_prompt=4",
    "trainer.micro_batch_size=4",
    "sft.batch_size=8",
    "rollout.max_new_tokens=12",
    "data.size=200",
    "sft.examples=200",
    "data.eval_size=8",
    "reward.workers=1",
]


def run_icepop(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m icepop.train *overrides` in tmp_path (its own cache; tests/ on the path for custom
    rewards); the finished process, whatever its exit status."""
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "ICEPOP_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": pythonpath,
    }
    return subprocess.run(
        [sys.executable, "-m", "icepop.train", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def icepop_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`run_icepop`, which must succeed."""
    result = run_icepop(tmp_path, *overrides)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result


RAY_PROCESS_MARKS = ("raylet", "gcs_server", "ray::", "default_worker.py")


def ray_processes(cache: str) -> set[int]:
    """Ray's processes (daemons, agents, workers) of the runs whose ICEPOP_CACHE is `cache`: they all
    inherit the driver's environment, so runs of other tests (or users) on the machine do not count."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(mark in " ".join(proc.info["cmdline"] or []) for mark in RAY_PROCESS_MARKS):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ICEPOP_CACHE") == cache:
                    found.add(proc.info["pid"])
    return found
