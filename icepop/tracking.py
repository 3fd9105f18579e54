"""Per-step metrics: one JSON object per line in run.dir/metrics.jsonl (held-out measures in
eval.jsonl), a progress bar in a terminal or one plain line per step elsewhere (a log file under SLURM,
nohup or `| tee`), and optionally wandb. Values are plain floats; a non-finite value is written as null,
never dropped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from icepop.config import Config

LINE_METRICS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("mismatch/abs_logp_diff_mean", "mismatch", "{:.2e}"),
    ("icepop/mask_frac", "masked", "{:.4f}"),
    ("actor/kl", "kl", "{:.2e}"),
    ("actor/grad_norm", "grad", "{:.3g}"),
    ("sft/loss", "loss", "{:.4f}"),
    ("rm/loss", "loss", "{:.4f}"),
    ("rm/accuracy", "accuracy", "{:.3f}"),
)
"""(metric, label, format) of what a plain per-step line shows, where the stage logs it."""


def step_line(
    description: str, step: int, total: int, metrics: dict[str, float], seconds: float, done: int
) -> str:
    """One plain line for a log file: the step, the metrics of `LINE_METRICS` the stage has, the
    seconds per step over the `done` steps of this process (`seconds` in all) and the time left."""
    shown = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in LINE_METRICS if key in metrics]
    per_step = seconds / max(1, done)
    left = int(per_step * max(0, total - step))
    eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return f"{description} step {step}/{total}  {'  '.join(shown)}  {per_step:.1f} s/step  ETA {eta}"


class Sink(Protocol):
    """Where the metrics go besides metrics.jsonl: a logger.backend other than "console"."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class WandbSink:
    def __init__(self, config: Config, run_dir: Path, settings: dict[str, Any]) -> None:
        import wandb

        mode = config.logger.wandb_mode
        self.run = wandb.init(project=config.logger.project, dir=str(run_dir), mode=mode, config=settings,
                              name=run_dir.name)  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorboardSink:
    """Scalars in run.dir/tensorboard, a tag per metric."""

    def __init__(self, config: Config, run_dir: Path, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(settings, indent=1, default=str)}\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    """A run of experiment `logger.project` in `logger.mlflow_tracking_uri` (default: run.dir/mlflow.db),
    named after the run directory, with the flattened config as its parameters."""

    def __init__(self, config: Config, run_dir: Path, settings: dict[str, Any]) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database set-up, line by line
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = config.logger.mlflow_tracking_uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(config.logger.project)
        experiment = found.experiment_id if found else self.client.create_experiment(config.logger.project)
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)[:500]) for key, value in _flattened(settings).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=rows)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


SINKS = {"wandb": WandbSink, "tensorboard": TensorboardSink, "mlflow": MlflowSink}


def open_sink(config: Config, run_dir: Path) -> Sink | None:
    """logger.backend's sink, given the whole config to record; None for "console"."""
    if config.logger.backend == "console":
        return None
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    return SINKS[config.logger.backend](config, run_dir, settings)


def _flattened(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; an empty dictionary is kept as "{}"."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flattened(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = "{}" if isinstance(value, dict) else value
    return flat


class Tracker:
    """Writes metrics of a stage; use as a context manager so files and wandb are always closed."""

    def __init__(self, config: Config, run_dir: Path, total_steps: int, description: str) -> None:
        self.path, self.eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
        self.file = self.path.open("a")
        self.description, self.total = description, total_steps
        self.started, self.logged = time.perf_counter(), 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(description, total=total_steps, status="")
        self.terminal = self.progress.console.is_terminal  # else a file: no bar, a line per step
        if self.terminal:
            self.progress.start()
        self.sink = open_sink(config, run_dir)

    def log(self, step: int, metrics: dict[str, float], status: str = "") -> None:
        row = {"step": step, **{k: _json_float(v) for k, v in sorted(metrics.items())}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.sink is not None:
            self.sink.log(metrics, step)
        self.logged += 1
        if self.terminal:
            self.progress.update(self.task, completed=step, status=status)
        else:
            seconds = time.perf_counter() - self.started
            self.print(step_line(self.description, step, self.total, metrics, seconds, self.logged))

    def log_eval(self, step: int, measures: dict[str, float], message: str) -> None:
        """Append {"step": step, "eval/<name>": value, ...} to eval.jsonl; print "step N: message"."""
        row = {"step": step, **{f"eval/{k}": _json_float(v) for k, v in measures.items()}}
        with self.eval_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.print(f"step {step}: {message}")

    def print(self, message: str) -> None:
        """Above the bar in a terminal; elsewhere a plain line, unwrapped and without colour codes."""
        if self.terminal:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.terminal:
            self.progress.stop()
        self.file.close()
        if self.sink is not None:
            self.sink.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
