"""The plotting helpers the run report (icepop.report) and the mismatch map (icepop.study_map) share:
matplotlib without a display, a run's held-out evaluations, a metric's series."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """eval.jsonl's rows; `eval/accuracy_lenient` falls back to `eval/accuracy` where a task has no
    lenient reading (the plotted and tabled held-out measure)."""
    path = run_dir / "eval.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    return [
        {**r, "eval/accuracy_lenient": r.get("eval/accuracy_lenient", r.get("eval/accuracy"))} for r in rows
    ]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over a run's rows, skipping steps where it is missing or not finite."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_steps() -> Any:
    """An axis locator with ticks at whole steps only (a 3-step run showed 0.5, 1.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def save_figure(fig: Any, title: str, path: Path) -> Path:
    """Title, lay out, save (110 dpi) and close a figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
