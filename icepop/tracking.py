"""Per-step metrics: one JSON object per line in run.dir/metrics.jsonl (held-out measures in
eval.jsonl), a console progress bar, and optionally wandb. Values are plain floats; a non-finite value
is written as null, never dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from icepop.config import Config


class Tracker:
    """Writes metrics of a stage; use as a context manager so files and wandb are always closed."""

    def __init__(self, config: Config, run_dir: Path, total_steps: int, description: str) -> None:
        self.path, self.eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
        self.file = self.path.open("a")
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(description, total=total_steps, status="")
        self.progress.start()
        self.wandb: Any = None
        if config.logger.backend == "wandb":
            import wandb
            from omegaconf import OmegaConf

            self.wandb = wandb.init(
                project=config.logger.project,
                dir=str(run_dir),
                mode=config.logger.wandb_mode,
                config=OmegaConf.to_container(OmegaConf.structured(config), resolve=True),
                name=run_dir.name,
            )

    def log(self, step: int, metrics: dict[str, float], status: str = "") -> None:
        row = {"step": step, **{k: _json_float(v) for k, v in sorted(metrics.items())}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.progress.update(self.task, completed=step, status=status)

    def log_eval(self, step: int, measures: dict[str, float], message: str) -> None:
        """Append {"step": step, "eval/<name>": value, ...} to eval.jsonl; print "step N: message"."""
        row = {"step": step, **{f"eval/{k}": _json_float(v) for k, v in measures.items()}}
        with self.eval_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.print(f"step {step}: {message}")

    def print(self, message: str) -> None:
        self.progress.console.print(message)

    def close(self) -> None:
        self.progress.stop()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()

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
