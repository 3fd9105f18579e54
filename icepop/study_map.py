"""The mismatch map's arms, its protocol, and its figure (`python -m icepop.report --map studies/map`).

The protocol was fixed before the first arm ran (docs/study.md, part (e)); `verdict` and `separates`
are it, in code:

- An arm's **outcome** is its held-out greedy accuracy at the end: the mean of its last two evaluations
  (steps 125 and 150 of 150: 400 greedy answers on 200 held-out problems).
- **Degraded**: the outcome is at least `MARGIN` below that of the same seed's reference arm (the exact
  float32 engine, no correction, same model).
- **Collapsed**: the outcome is below the arm's own starting accuracy by at least `MARGIN`, or its
  training reward over the last fifth of the steps is under half of the first fifth's, or the run stopped
  on non-finite steps.
- A correction **changes the outcome** at a level only when it **separates** from no correction: on
  every seed the two arms' outcomes differ by at least `MARGIN` in the same direction. One seed, or
  seeds that disagree, is reported as "not separated", never as an effect.

`MARGIN` = 0.05 is twice the standard error of one evaluation (p ≈ 0.15, 200 problems: 0.025).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icepop.report import read_evals
from icepop.stages.summary import read_summary
from icepop.tracking import read_metrics

MARGIN = 0.05


@dataclass(frozen=True)
class Source:
    """One mismatch source at one level: the overrides that make it, and the arm it is compared with."""

    name: str
    label: str
    overrides: tuple[str, ...]
    reference: str = "fp32"
    """The exact-engine source of the same model (itself for a reference)."""

    @property
    def mismatch(self) -> bool:
        return self.reference != self.name


def _source(name: str, label: str, *overrides: str, reference: str = "fp32") -> tuple[str, Source]:
    return name, Source(name, label, overrides, reference)


SOURCES: dict[str, Source] = dict([
    _source("fp32", "float32 engine (none)", "rollout.dtype=float32"),
    _source("fp16", "float16 engine", "rollout.dtype=float16"),
    _source("bf16", "bfloat16 engine", "rollout.dtype=bfloat16"),
    _source("fp8", "FP8 weight rounding (simulated) + bf16", "rollout.dtype=bfloat16",
            "rollout.quantization=fp8"),
    _source("fp32-moe", "MoE, float32 engine (none)", "model=tiny-moe", "rollout.dtype=float32",
            reference="fp32-moe"),
    _source("bf16-moe", "MoE, bfloat16 engine (routing flips)", "model=tiny-moe", "rollout.dtype=bfloat16",
            reference="fp32-moe"),
    _source("noise-0.1", "injected noise 0.1", "rollout.mismatch_noise=0.1"),
    _source("noise-0.3", "injected noise 0.3", "rollout.mismatch_noise=0.3"),
    _source("noise-1.0", "injected noise 1.0", "rollout.mismatch_noise=1.0"),
    _source("stale-1", "stale rollouts, max_staleness 1", "rollout.max_staleness=1"),
    _source("stale-4", "stale rollouts, max_staleness 4", "rollout.max_staleness=4"),
])  # fmt: skip
"""In the order of the map's rows."""

CORRECTIONS: dict[str, tuple[str, ...]] = {
    "none": ("algo.correction=none",),
    "tis": ("algo.correction=tis", "algo.ratio_high=2"),
    "seq-mis": ("algo.correction=seq-mis",),
    "icepop": ("algo.correction=icepop", "algo.ratio_low=0.5", "algo.ratio_high=5"),
    "kpop": ("algo.correction=kpop",),
    "dppo-tv": ("algo.correction=dppo-tv",),
    "opsm": ("algo.correction=opsm",),
    "trm": ("algo.correction=trm",),
}
"""The map's columns, each at its documented default (TIS at the paper's C = 2)."""


def arm_name(source: str, correction: str, seed: int) -> str:
    return f"{source}--{correction}--seed{seed}"


@dataclass(frozen=True)
class Arm:
    source: str
    correction: str
    seed: int
    start: float
    outcome: float
    reward_first: float
    reward_last: float
    stopped_nonfinite: bool
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]


def read_arm(arm_dir: Path) -> Arm:
    """An arm as studies/map keeps it (arm.json, metrics.jsonl, eval.jsonl, summary.json)."""
    meta = json.loads((arm_dir / "arm.json").read_text())
    metrics, evals = read_metrics(arm_dir), read_evals(arm_dir)
    accuracy = [r["eval/accuracy_lenient"] for r in evals]
    summary = read_summary(arm_dir)
    fifth = max(1, len(metrics) // 5)
    reward = [m["reward/mean"] for m in metrics]
    return Arm(
        source=meta["source"],
        correction=meta["correction"],
        seed=meta["seed"],
        start=accuracy[0],
        outcome=statistics.fmean(accuracy[-2:]),
        reward_first=statistics.fmean(reward[:fifth]),
        reward_last=statistics.fmean(reward[-fifth:]),
        stopped_nonfinite=summary is None or len(metrics) < summary.steps,
        metrics=metrics,
        evals=evals,
    )


def read_map(directory: Path) -> dict[tuple[str, str, int], Arm]:
    return {
        (a.source, a.correction, a.seed): a
        for a in (read_arm(d) for d in sorted(directory.iterdir()) if (d / "arm.json").is_file())
    }


def verdict(arm: Arm, arms: dict[tuple[str, str, int], Arm]) -> str:
    """Collapsed", "degraded", "held" (neither), or "no reference" (its seed's reference not run)."""
    if (arm.outcome <= arm.start - MARGIN or arm.reward_last < arm.reward_first / 2
            or arm.stopped_nonfinite):  # fmt: skip
        return "collapsed"
    reference = arms.get((SOURCES[arm.source].reference, "none", arm.seed))
    if reference is None:
        return "no reference"
    return "degraded" if arm.outcome <= reference.outcome - MARGIN else "held"


def separates(source: str, correction: str, arms: dict[tuple[str, str, int], Arm]) -> str:
    """Better", "worse", "not separated" (seeds disagree or differ by < MARGIN), or "one seed"."""
    seeds = sorted(s for (src, c, s) in arms if src == source and c == correction)
    pairs = [(arms[source, correction, s].outcome, arms[source, "none", s].outcome)
             for s in seeds if (source, "none", s) in arms]  # fmt: skip
    if len(pairs) < 2:
        return "one seed"
    if all(a - b >= MARGIN for a, b in pairs):
        return "better"
    if all(b - a >= MARGIN for a, b in pairs):
        return "worse"
    return "not separated"
