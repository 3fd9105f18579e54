"""The checkpoint folder protocol (icepop.stages.checkpoint) on its own: only complete checkpoints count,
publishing is a rename, pruning keeps the newest, logs are cut back to the checkpoint's step, and
run.resume finds the run to continue. The end-to-end kill-and-resume tests are in test_faults.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from icepop.stages import checkpoint


def publish(run_dir: Path, step: int, keep_last: int = 0) -> Path:
    partial = checkpoint.partial_dir(run_dir, step)
    (partial / "model.safetensors").write_text("weights")
    return checkpoint.complete(run_dir, step, partial, {"data": {"position": step}}, keep_last)


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    publish(tmp_path, 2)
    # A save that died half-way: its partial folder, and a step folder without state.json.
    (checkpoint.partial_dir(tmp_path, 4) / "model.safetensors").write_text("half")
    (tmp_path / "checkpoints" / "step-6").mkdir()
    assert checkpoint.latest(tmp_path) == (2, tmp_path / "checkpoints" / "step-2")
    assert checkpoint.read_state(tmp_path / "checkpoints" / "step-2") == {"step": 2, "data": {"position": 2}}
    checkpoint.remove_partials(tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".*"))
    for step in (4, 8, 10):
        publish(tmp_path, step, keep_last=2)
    assert [step for step, _ in checkpoint.complete_checkpoints(tmp_path)] == [8, 10]


def test_a_redone_step_replaces_its_old_checkpoint(tmp_path: Path) -> None:
    publish(tmp_path, 4)
    partial = checkpoint.partial_dir(tmp_path, 4)
    checkpoint.complete(tmp_path, 4, partial, {"data": {"position": 99}}, keep_last=0)
    assert checkpoint.read_state(tmp_path / "checkpoints" / "step-4")["data"] == {"position": 99}
    assert not (tmp_path / "checkpoints" / "step-4" / "model.safetensors").exists()


def test_logs_are_cut_back_to_the_checkpoint_step(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    (tmp_path / "histograms.jsonl").write_text(json.dumps({"edges": [0, 1]}) + "\n" + '{"step": 5}\n')
    checkpoint.truncate_logs(tmp_path, 4)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert (tmp_path / "histograms.jsonl").read_text() == json.dumps({"edges": [0, 1]}) + "\n"  # header kept


def test_resume_finds_the_newest_run_of_the_stage(tmp_path: Path) -> None:
    new = tmp_path / "rlvr-20261129-120000"
    assert checkpoint.resume_dir(new, "rlvr", requested=False) == new
    with pytest.raises(FileNotFoundError, match=r"run\.resume=true"):
        checkpoint.resume_dir(new, "rlvr", requested=True)
    older, newer, other = tmp_path / "rlvr-a", tmp_path / "rlvr-b", tmp_path / "rlhf-c"
    for run_dir in (older, newer, other):
        publish(run_dir, 2)
        os.utime(run_dir / "checkpoints" / "step-2", (1, 1) if run_dir == older else None)
    assert checkpoint.resume_dir(new, "rlvr", requested=True) == newer
    assert checkpoint.resume_dir(older, "rlvr", requested=True) == older  # a run.dir with a checkpoint wins


def test_rng_state_round_trips_through_json() -> None:
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), torch.rand(3))
    random.seed(123)
    torch.manual_seed(123)
    checkpoint.set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
