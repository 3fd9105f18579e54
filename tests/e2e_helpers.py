"""Running `python -m icepop.train` from the end-to-end tests, with their reduced sizes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

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


QUICK_SFT = ["sft.steps=4", "sft.eval_size=8"]
"""The tiny default's SFT warm-up in the tests: short. Every run with these and SMALL shares one cached
warm-up (the session's shared ICEPOP_CACHE, tests/conftest.py)."""
TINY_DEFAULT = [
    "+recipe=rlvr", *QUICK_SFT, "train.steps=3", "trainer.zero_stage=2", "trainer.lr=1e-4",
    "rollout.engines=2",  # prompts split across two engines, one per rank under cluster.placement=colocated
    "reward.function=e2e_rewards:shorter",  # a custom reward by dotted path, never zero-variance
    "logger=wandb",  # offline by default: a local run that `wandb sync` uploads later
    "algo.kl_coef=0.01",  # a KL term to the starting policy, scored by the reference actor ...
    "rollout.temperature=0.8",  # ... at the sampling temperature, like the policy's log-probs
    *SMALL,
]  # fmt: skip
"""The tiny default's RLVR as tests/test_rlvr_e2e.py checks it: its SFT warm-up runs first."""
REFERENCE = [
    "+recipe=rlvr", *QUICK_SFT, "reward.function=e2e_rewards:longer", "rollout.dtype=bfloat16", *SMALL,
    "train.steps=6", "train.checkpoint_every=2", "train.keep_last=2", "train.eval_every=0",
]  # fmt: skip
"""The uninterrupted run that runs with faults (tests/test_faults.py) and a two-node run
(tests/test_multinode.py) must reproduce step for step: the tiny default from its cached SFT warm-up,
a reward that varies within every group (real updates every step), a bfloat16 engine (a real
mismatch), checkpoints."""


DETERMINISTIC = ("reward/mean", "reward/std", "actor/loss", "actor/grad_norm", "response_length/mean",
                 "mismatch/abs_logp_diff_max", "icepop/mask_frac", "actor/entropy")  # fmt: skip
"""Metrics that a run reproduces exactly (up to float noise) for a fixed seed, whatever its layout."""


def assert_same_steps(rows: list[dict], reference: list[dict], steps: range) -> None:
    """Every `DETERMINISTIC` metric of these steps equals the reference run's."""
    by_step = {r["step"]: r for r in rows}
    expected = {r["step"]: r for r in reference}
    for step in steps:
        for key in DETERMINISTIC:
            assert by_step[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)


@dataclass
class Run:
    """A finished `python -m icepop.train`: its run directory and what it printed."""

    dir: Path
    stdout: str


def run_icepop(tmp_path: Path, *overrides: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m icepop.train *overrides` in tmp_path (with its own cache unless `cache` is given;
    tests/ on the path for custom rewards); the finished process, whatever its exit status."""
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "ICEPOP_CACHE": str(cache or tmp_path / "cache"),
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


def icepop_train(tmp_path: Path, *overrides: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """`run_icepop`, which must succeed."""
    result = run_icepop(tmp_path, *overrides, cache=cache)
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
