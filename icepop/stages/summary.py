"""A finished stage's summary (summary.json in its run directory): what the pipeline table shows,
and the mark that the stage is complete — written last and atomically, so a stage that crashed
never looks done and a resumed pipeline runs it again."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SUMMARY = "summary.json"


@dataclass
class Summary:
    stage: str
    steps: int
    seconds: float
    measure: str
    """What before/after measure, e.g. "held-out accuracy"; higher is better unless it is a loss."""
    before: float | None
    after: float
    checkpoint: str | None
    """The stage's final Hugging Face checkpoint (None for eval)."""


def write_summary(
    run_dir: Path,
    stage: str,
    steps: int,
    seconds: float,
    measure: str,
    before: float | None,
    after: float,
    checkpoint: str | None,
) -> Summary:
    checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())  # usable from any cwd
    summary = Summary(stage, steps, seconds, measure, before, after, checkpoint)
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(asdict(summary), indent=2))
    os.replace(tmp, run_dir / SUMMARY)
    return summary


def read_summary(run_dir: Path) -> Summary | None:
    """The stage's summary, or None when it has not completed."""
    path = run_dir / SUMMARY
    return Summary(**json.loads(path.read_text())) if path.is_file() else None
