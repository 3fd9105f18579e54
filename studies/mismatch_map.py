"""The mismatch map: for each source of train/inference mismatch and its level, and for each
correction, what happens to RL on the tiny built-in models (docs/study.md, part (e)).

Every arm is an ordinary `python -m icepop.train +recipe=rlvr` run on the default task (countdown, from
the tiny model's cached SFT warm-up), identical but for the arm's source, correction and seed. What a
run wrote that the map needs (metrics, evals, events, summary, config) is kept in the repository under
studies/map/<arm>/, with the commit it ran on, so the map is redrawn by one command on any machine and
grows over several rounds of work:

    python studies/mismatch_map.py coarse        # every source × {none, icepop}, seed 0
    python studies/mismatch_map.py decisive --sources noise-0.3 bf16-moe   # every correction, 2 seeds
    python -m icepop.report --map studies/map     # the figure and table, docs/study/map/

An arm already in studies/map/ is not run again. The protocol (what counts as degraded or collapsed,
and when seeds back a claim) is icepop.study_map's, written before the first run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from mismatch_study import SECONDS, train  # type: ignore[import-not-found]

from icepop.study_map import CORRECTIONS, SOURCES, arm_name

ROOT = Path(__file__).resolve().parent.parent
KEPT = ("config.yaml", "metrics.jsonl", "eval.jsonl", "events.jsonl", "summary.json", SECONDS)
STEPS = 150
COARSE_ORDER = [
    "noise-1.0",
    "noise-0.6",
    "noise-0.3",
    "fp8",
    "bf16-moe",
    "stale-4",
    "bf16",
    "fp16",
    "noise-0.1",
    "stale-1",
]
"""The mismatch sources by how likely they are to break training, largest first."""
COMMON = [
    "+recipe=rlvr",
    f"train.steps={STEPS}",
    "train.eval_every=25",
    "train.checkpoint_every=0",
    "data.size=456",  # 456 training problems and 200 held out (another seed's): not 64, so that the
    "data.eval_size=200",  # held-out accuracy's standard error is ≈ 0.025 rather than 0.045
]


def commit() -> str:
    """The commit the runs are made on (refused when the tree has uncommitted changes to icepop/)."""
    dirty = subprocess.run(["git", "status", "--porcelain", "icepop", "conf", "recipes"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    if dirty.strip():
        raise SystemExit(f"commit the changes first: the map records the commit each arm ran on\n{dirty}")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def run_arm(source: str, correction: str, seed: int, runs: Path, kept: Path, revision: str) -> None:
    """One arm: trained into runs/, then what the map reads copied to kept/<arm>/."""
    name = arm_name(source, correction, seed)
    if (kept / name / "summary.json").is_file():
        print(f"  {name}: in the map already", flush=True)
        return
    overrides = [*COMMON, *SOURCES[source].overrides, *CORRECTIONS[correction], f"run.seed={seed}"]
    run_dir = train(runs, name, overrides)
    meta = {"commit": revision, "source": source, "correction": correction, "seed": seed,
            "overrides": overrides}  # fmt: skip
    keep(run_dir, kept / name, meta)


def keep(run_dir: Path, target: Path, meta: dict[str, object]) -> None:
    """What a study reads of a finished run (KEPT) copied to `target`, with `meta` as its arm.json."""
    target.mkdir(parents=True, exist_ok=True)
    for file in KEPT:
        if (run_dir / file).is_file():
            shutil.copy2(run_dir / file, target / file)
    (target / "arm.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("coarse", "decisive"))
    parser.add_argument("--sources", nargs="*", default=None, help="(decisive) the levels to complete")
    parser.add_argument("--corrections", nargs="*", default=None, help="(decisive) default: all")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=ROOT / "studies" / "runs" / "map")
    parser.add_argument("--map", type=Path, default=ROOT / "studies" / "map")
    args = parser.parse_args(argv)
    revision = commit()
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.phase == "coarse":
        order = [s for s in SOURCES if not SOURCES[s].mismatch] + [s for s in COARSE_ORDER]
        arms = [(s, c, 0) for s in order for c in ("none", "icepop") if c == "none" or SOURCES[s].mismatch]
    else:
        if not args.sources:
            raise SystemExit("decisive: name the --sources to complete (those where `none` degrades)")
        unknown = sorted(set(args.sources) - set(SOURCES))
        if unknown:
            raise SystemExit(f"unknown sources {unknown}; known: {', '.join(SOURCES)}")
        corrections = args.corrections or list(CORRECTIONS)
        arms = [(s, c, seed) for s in args.sources for seed in args.seeds for c in corrections]
    for source, correction, seed in arms:
        run_arm(source, correction, seed, args.runs.resolve(), args.map.resolve(), revision)
    print(f"mismatch map: {len(arms)} arms; draw with `python -m icepop.report --map {args.map}`")


if __name__ == "__main__":
    sys.exit(main())
