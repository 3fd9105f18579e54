"""Where an RLVR step spends its time, on the embedded default (or any overrides you pass).

Runs `python -m icepop.train +recipe=rlvr` for a few steps, then reads the run's metrics.jsonl and
prints the median seconds of each phase — generate, reward, old log-probs, train, sync — with its
share of the step (the ratio against the whole step, measured in the same run), and the rollout
throughput. The first step (start-up effects) is left out.

    python bench/rlvr_step.py                       # tiny dense model on countdown, CPU
    python bench/rlvr_step.py model=tiny-moe train.steps=8
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from icepop.tracking import read_metrics

PHASES = ("generate", "reward", "old_logprobs", "train", "sync")


def main() -> None:
    overrides = sys.argv[1:]
    if not any(o.startswith("train.steps=") for o in overrides):
        overrides.append("train.steps=6")
    run_dir = Path(tempfile.mkdtemp(prefix="icepop-bench-")) / "run"
    command = [sys.executable, "-m", "icepop.train", "+recipe=rlvr", f"run.dir={run_dir}", *overrides]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    rows = read_metrics(run_dir)[1:]
    step = statistics.median(r["perf/step_seconds"] for r in rows)
    print(f"\nmedian over steps 2-{len(rows) + 1} of {' '.join(overrides)}")
    print(f"  {'phase':<14} {'seconds':>8} {'share':>7}")
    for phase in PHASES:
        seconds = statistics.median(r[f"timing/{phase}_seconds"] for r in rows)
        print(f"  {phase:<14} {seconds:>8.3f} {seconds / step:>7.1%}")
    print(f"  {'step':<14} {step:>8.3f} {1:>7.0%}")
    tokens = statistics.median(r["perf/rollout_tokens_per_second"] for r in rows)
    print(
        f"rollout: {tokens:,.0f} generated tokens/s; response length {rows[-1]['response_length/mean']:.1f}"
    )


if __name__ == "__main__":
    main()
