"""Resumable RL checkpoints: checkpoints/step-N/ holds a Hugging Face model (model files at its top
level, loadable as is), the trainer's DeepSpeed state (trainer/: weights, optimizer, scheduler; one
shard per rank) and the driver's state (state.json: step, data position, RNG, counters).

Key design choice: a checkpoint is written into checkpoints/.step-N.partial/ and renamed to step-N/
only after state.json — written last — is on disk; rename is atomic, so a crash mid-save never leaves
a step-N/ that looks complete, and resuming ignores (and removes) partial folders. Older complete
checkpoints are pruned only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icepop.ray.actors import gather
from icepop.ray.workers import TrainerGroup
from icepop.stages.summary import SUMMARY

CHECKPOINTS = "checkpoints"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
LOGS = ("metrics.jsonl", "histograms.jsonl", "events.jsonl", "eval.jsonl")
"""Per-step logs of a run; on resume, rows after the checkpoint's step are dropped (they are redone)."""


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step}"


def partial_dir(run_dir: Path, step: int) -> Path:
    """Where step N's checkpoint is written before it is complete (emptied first)."""
    path = run_dir / CHECKPOINTS / f".step-{step}.partial"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def complete(run_dir: Path, step: int, partial: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write state.json last (flushed to disk), publish the folder as step-N, then prune older ones."""
    with (partial / STATE).open("w") as f:
        json.dump({"step": step, **state}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(run_dir, step)
    shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume from an earlier checkpoint
    os.replace(partial, final)
    if keep_last:
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = run_dir / CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run directory, if any."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def resume_dir(run_dir: Path, stage: str, requested: bool) -> Path:
    """The run directory to use: run_dir itself when it holds a checkpoint or resuming was not asked
    for; with run.resume=true and none there, the newest `<stage>-*` sibling that holds one."""
    if not requested or latest(run_dir) is not None:
        return run_dir
    siblings = [d for d in run_dir.parent.glob(f"{stage}-*") if d != run_dir and latest(d) is not None]
    if not siblings:
        raise FileNotFoundError(
            f"run.resume=true: neither run.dir={run_dir} nor any {run_dir.parent}/{stage}-* folder holds a "
            f"complete checkpoint ({CHECKPOINTS}/step-N/{STATE}); set run.dir to the run to continue"
        )
    return max(siblings, key=lambda d: latest(d)[1].stat().st_mtime)  # type: ignore[index]


def remove_partials(run_dir: Path) -> None:
    """Folders of checkpoints that were being written when a run died."""
    for path in (run_dir / CHECKPOINTS).glob(".step-*.partial"):
        shutil.rmtree(path, ignore_errors=True)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the rows logged after `step` (atomically per file); lines without a step (headers) stay."""
    for name in LOGS:
        path = run_dir / name
        if not path.is_file():
            continue
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The driver's Python and torch RNG states, JSON-serialisable."""
    return {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(run_dir: Path, step: int, trainer: TrainerGroup, state: dict[str, Any], keep_last: int) -> Path:
    """A resumable checkpoint at `step`: the Hugging Face model, the trainer state, and the driver's
    `state` (data position, counters; the RNG is added here); published atomically (`complete`)."""
    partial = partial_dir(run_dir, step)
    gather(trainer.async_call("save", str(partial)))
    gather(trainer.async_call("save_state", str(partial / "trainer")))
    return complete(run_dir, step, partial, {**state, "rng": rng_state()}, keep_last)


def restore(path: Path, trainer: TrainerGroup) -> dict[str, Any]:
    """Load the trainer state and the driver's RNG that `save` wrote; returns the rest of its state."""
    gather(trainer.async_call("load_state", str(path / "trainer")))
    state = read_state(path)
    set_rng_state(state["rng"])
    return state


@dataclass(frozen=True)
class ResumePoint:
    """Where an RL run in a run directory starts: afresh (step 0, no path) or from a checkpoint."""

    step: int
    path: Path | None
    complete: bool
    """The run has already done all its steps (its summary is written): nothing to do."""


def prepare_resume(run_dir: Path, total_steps: int) -> ResumePoint:
    """The newest complete checkpoint of `run_dir` to continue from. Before continuing, the folders of
    checkpoints that were being written when the run died are removed, and the log rows written after
    the checkpoint are dropped (those steps are redone)."""
    found = latest(run_dir)
    if found is None:
        return ResumePoint(0, None, complete=False)
    step, path = found
    if step >= total_steps and (run_dir / SUMMARY).is_file():
        return ResumePoint(step, path, complete=True)
    remove_partials(run_dir)
    truncate_logs(run_dir, step)
    return ResumePoint(step, path, complete=False)


def resume_hint(run_dir: Path) -> str:
    """Where a stopped run can continue from, for its error message."""
    found = latest(run_dir)
    if found is None:
        return "No checkpoint was complete yet (train.checkpoint_every)."
    return (
        f"The last complete checkpoint is {found[1].resolve()} (step {found[0]}): run the same command "
        f"with run.dir={run_dir.resolve()} to continue from it."
    )
