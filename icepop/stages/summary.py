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


def closing_lines(summaries: list[Summary], run_dir: Path, data_source: str) -> list[str]:
    """What a finished run prints last: where it wrote, each stage's measure and final checkpoint, and
    how to use the last checkpoint (evaluate on `data_source`, serve, load; a LoRA run's adapter)."""
    lines = [f"icepop: finished; run directory {run_dir.resolve()}"]
    for s in summaries:
        before = "" if s.before is None else f"{s.before:.3f} → "
        steps = f" in {s.steps} steps" if s.steps else ""
        lines.append(f"  {s.stage}: {s.measure} {before}{s.after:.3f}{steps} ({s.seconds:.0f} s)")
    final = next((s.checkpoint for s in reversed(summaries) if s.checkpoint is not None), None)
    if final is not None:
        lines += [
            f"  final checkpoint: {final}",
            f"    evaluate: python -m icepop.train +recipe=eval model.path={final} model.sft_warmup=false "
            f"data.source={data_source}",
            f"    serve:    vllm serve {final}",
            f"    load:     transformers.AutoModelForCausalLM.from_pretrained('{final}')",
        ]
        if (Path(final) / "adapter").is_dir():
            lines.append(f"    adapter:  peft.AutoPeftModelForCausalLM.from_pretrained('{final}/adapter')")
    return lines
