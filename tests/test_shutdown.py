"""A run interrupted mid-training (Ctrl-C or SIGTERM) stops its Ray cluster and workers and removes its
weight-sync files: no orphaned process, nothing left in shared memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from icepop.weights import shm_dir

RAY_PROCESS_MARKS = ("raylet", "gcs_server", "ray::", "default_worker.py")


def ray_processes() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in RAY_PROCESS_MARKS):
            found.add(proc.info["pid"])
    return found


def weight_dirs() -> set[str]:
    return {p.name for p in Path(shm_dir()).glob("icepop-weights-*")}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing_behind(tmp_path: Path, signum: int) -> None:
    before_ray, before_dirs = ray_processes(), weight_dirs()
    overrides = [
        "+recipe=rlvr", "run.dir=run", "model.sft_warmup=false", "train.steps=500", "algo.prompts_per_step=4",
        "algo.samples_per_prompt=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=8",
        "data.eval_size=4", "reward.workers=1",
    ]  # fmt: skip
    env = {**os.environ, "ICEPOP_CACHE": str(tmp_path / "cache")}
    run = subprocess.Popen([sys.executable, "-m", "icepop.train", *overrides], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and run.poll() is None:
        assert time.monotonic() < deadline, "the run never completed a step"
        time.sleep(0.5)
    assert run.poll() is None, run.stderr.read() if run.stderr else ""
    assert weight_dirs() - before_dirs, "the running job should hold a weight-sync directory"
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    # SIGTERM exits through SystemExit(128 + 15); Python re-raises SIGINT after KeyboardInterrupt (-2).
    assert run.returncode in (128 + signum, -signum), stderr[-3000:]
    assert json.loads(metrics.read_text().splitlines()[0])["step"] == 1
    deadline = time.monotonic() + 30  # Ray's processes exit asynchronously after shutdown
    while ray_processes() - before_ray and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before_ray, "orphaned Ray processes"
    assert weight_dirs() == before_dirs
