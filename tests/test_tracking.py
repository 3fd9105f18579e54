"""What a run shows outside a terminal (a log file under SLURM, nohup or `| tee`): one plain line per
step from the metrics the stage has, and at the end where everything went. (A whole run's log is
checked in tests/test_rlvr_e2e.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icepop.config import Config
from icepop.stages.summary import Summary, closing_lines
from icepop.tracking import Tracker, step_line


def test_a_step_line_shows_the_stages_metrics_seconds_per_step_and_time_left() -> None:
    metrics = {"reward/mean": 0.5, "icepop/mask_frac": 0.01, "actor/grad_norm": 2.0, "other/x": 7.0}
    line = step_line("rlvr", 10, 110, metrics, seconds=45.0, done=9)
    assert line == "rlvr step 10/110  reward 0.500  masked 0.0100  grad 2  5.0 s/step  ETA 0:08:20"
    assert (
        step_line("sft", 3, 3, {"sft/loss": 1.25}, 6.0, 3)
        == "sft step 3/3  loss 1.2500  2.0 s/step  ETA 0:00:00"
    )


def test_a_tracker_outside_a_terminal_prints_a_line_per_step_and_keeps_every_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Tracker(Config(stage="rlvr"), tmp_path, 2, "rlvr") as tracker:
        assert not tracker.terminal  # pytest captures stdout: a file, not a terminal
        tracker.log(1, {"reward/mean": 0.25, "actor/kl": float("nan")}, status="ignored here")
        tracker.log(2, {"reward/mean": 0.75})
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in out] == [
        ["rlvr step 1/2", "reward 0.250"],
        ["rlvr step 2/2", "reward 0.750"],
    ]
    assert "kl nan" in out[0] and "\x1b[" not in "".join(out)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "actor/kl": None, "reward/mean": 0.25}, {"step": 2, "reward/mean": 0.75}]


def test_the_closing_lines_name_the_final_checkpoint_and_how_to_use_it(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "step-3"
    (checkpoint / "adapter").mkdir(parents=True)
    done = [
        Summary("sft", 4, 10.0, "validation loss", 5.0, 4.0, str(tmp_path / "sft")),
        Summary("rlvr", 3, 21.0, "held-out greedy accuracy", 0.0, 0.5, str(checkpoint)),
    ]
    lines = closing_lines(done, tmp_path, "countdown")
    assert lines[0] == f"icepop: finished; run directory {tmp_path.resolve()}"
    assert lines[2] == "  rlvr: held-out greedy accuracy 0.000 → 0.500 in 3 steps (21 s)"
    assert f"final checkpoint: {checkpoint}" in lines[3]
    assert f"+recipe=eval model.path={checkpoint} model.sft_warmup=false data.source=countdown" in lines[4]
    assert f"vllm serve {checkpoint}" in lines[5] and lines[-1].endswith(
        f"from_pretrained('{checkpoint}/adapter')"
    )


def test_tensorboard_and_mlflow_receive_every_step_and_the_config(tmp_path: Path) -> None:
    """logger=tensorboard and logger=mlflow, read back with their own readers."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = Config(stage="rlvr")
    base = replace(base, run=replace(base.run, dir=str(tmp_path)))  # resolved, as a run's is
    for backend in ("tensorboard", "mlflow"):
        config = replace(base, logger=replace(base.logger, backend=backend))
        (tmp_path / backend).mkdir()
        with Tracker(config, tmp_path / backend, 2, "rlvr") as tracker:
            tracker.log(1, {"reward/mean": 0.25, "actor/kl": float("nan")})
            tracker.log(2, {"reward/mean": 0.75, "actor/kl": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard" / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert events.Tags()["tensors"] == ["config/text_summary"]  # the settings, as text
    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("icepop").experiment_id])
    assert run.info.run_name == "mlflow" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.75)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "actor/kl")] == [2]  # NaN left out
    assert run.data.params["trainer.lr"] == "2e-06" and run.data.params["stage"] == "rlvr"
