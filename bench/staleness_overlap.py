"""What stale rollouts buy (rollout.max_staleness = N): step time and tokens/s at N = 0, 1, 2, and
the learning curve at N = 0 against N = 1, from whole `python -m icepop.train +recipe=rlvr` runs.

Each N runs the same command (one engine and one trainer rank, so each has a core of its own on this
2-core machine and the overlap can show), one after another; printed: the median step seconds over
steps 3..K (the first two start up and fill the queue), its ratio against N = 0 measured in the same
invocation, the end-to-end tokens/s (perf/tokens_per_second), the mean staleness and the masked
fraction. With --seeds S, each N of --curve runs S seeds: per-step reward and the held-out greedy
accuracy before/after (summary.json), N = 0 beside N = 1.

    python bench/staleness_overlap.py                                   # tiny default, N = 0, 1, 2
    python bench/staleness_overlap.py --steps 8 model=smollm2-135m data=gym-arithmetic
    python bench/staleness_overlap.py --curve --seeds 2 --steps 20      # learning curves, N = 0 vs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from icepop.tracking import read_metrics

LAYOUT = [  # stale rollouts need an engine of its own (model=smollm2-135m's preset colocates it)
    "cluster.placement=disaggregated", "rollout.engines=1", "trainer.ranks=1",
    "rollout.cpus_per_engine=1", "trainer.cpus_per_rank=1",
]  # fmt: skip


def run(base: Path, name: str, overrides: list[str]) -> Path:
    """One `python -m icepop.train` run; its run directory."""
    command = [sys.executable, "-m", "icepop.train", "+recipe=rlvr", *LAYOUT, *overrides, f"run.dir={name}"]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=base, check=True, stdout=subprocess.DEVNULL)
    return base / name


def speed(rows: list[dict]) -> dict[str, float]:
    later = rows[2:] or rows
    return {
        "step_seconds": statistics.median(r["perf/step_seconds"] for r in later),
        "tokens_per_second": statistics.median(r["perf/tokens_per_second"] for r in later),
        "versions_behind": statistics.mean(r["staleness/versions_behind_mean"] for r in later),
        "mask_frac": statistics.mean(r["icepop/mask_frac"] for r in later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--curve", action="store_true", help="learning curves of N = 0 and 1 instead")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args, overrides = parser.parse_known_args()
    common = [f"train.steps={args.steps}", "train.checkpoint_every=0", *overrides]
    base = Path(tempfile.mkdtemp(prefix="icepop-async-"))
    results: dict[str, dict] = {}
    if not args.curve:
        for n in args.staleness:
            rows = read_metrics(run(base, f"n{n}", [*common, f"rollout.max_staleness={n}"]))
            results[f"N={n}"] = speed(rows)
        serial = results[f"N={args.staleness[0]}"]["step_seconds"]
        ratio = f"÷ N={args.staleness[0]}"
        print(f"\n{'':6} {'s/step':>8} {ratio:>8} {'tok/s':>8} {'behind':>7} {'masked':>7}")
        for name, r in results.items():
            speeds = (
                f"{r['step_seconds']:8.2f} {r['step_seconds'] / serial:8.2f} {r['tokens_per_second']:8.0f}"
            )
            print(f"{name:6} {speeds} {r['versions_behind']:7.2f} {r['mask_frac']:7.4f}")
    else:
        for n in (0, 1):
            for seed in range(1, args.seeds + 1):
                name = f"n{n}-seed{seed}"
                run_dir = run(base, name, [*common, f"rollout.max_staleness={n}", f"run.seed={seed}"])
                summary = json.loads((run_dir / "summary.json").read_text())
                rewards = [r["reward/mean"] for r in read_metrics(run_dir)]
                results[name] = {"rewards": rewards, "before": summary["before"], "after": summary["after"],
                                 **speed(read_metrics(run_dir))}  # fmt: skip
                print(f"{name}: held-out {summary['before']:.3f} -> {summary['after']:.3f}; "
                      f"reward by step {' '.join(f'{x:.2f}' for x in rewards)}; "
                      f"{results[name]['step_seconds']:.2f} s/step")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
