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

from icepop.plots import pyplot, read_evals, save_figure, series
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
    _source("noise-0.6", "injected noise 0.6", "rollout.mismatch_noise=0.6"),
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
    reward_first, reward_last = _fifths(metrics, "reward/mean")
    return Arm(
        source=meta["source"],
        correction=meta["correction"],
        seed=meta["seed"],
        start=accuracy[0],
        outcome=statistics.fmean(accuracy[-2:]),
        reward_first=reward_first,
        reward_last=reward_last,
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
    """The arm's verdict: "collapsed", "degraded", "held" (neither), or "no reference" (its seed's
    reference arm has not run)."""
    if (arm.outcome <= arm.start - MARGIN or arm.reward_last < arm.reward_first / 2
            or arm.stopped_nonfinite):  # fmt: skip
        return "collapsed"
    reference = arms.get((SOURCES[arm.source].reference, "none", arm.seed))
    if reference is None:
        return "no reference"
    return "degraded" if arm.outcome <= reference.outcome - MARGIN else "held"


def separates(source: str, correction: str, arms: dict[tuple[str, str, int], Arm]) -> str:
    """How a correction's arms compare with no correction's, seed by seed: "better", "worse", "not
    separated" (seeds disagree, or differ by less than MARGIN), or "one seed" (fewer than two pairs)."""
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


def _fifths(metrics: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """A metric's mean over the first and over the last fifth of a run's steps."""
    _, values = series(metrics, key)
    fifth = max(1, len(values) // 5)
    return statistics.fmean(values[:fifth]), statistics.fmean(values[-fifth:])


def _mean_fifths(group: list[Arm], key: str) -> tuple[float, float]:
    """`_fifths` averaged over a group's arms (seeds)."""
    fifths = [_fifths(a.metrics, key) for a in group]
    return statistics.fmean(f[0] for f in fifths), statistics.fmean(f[1] for f in fifths)


def _deltas(group: list[Arm], arms: dict[tuple[str, str, int], Arm]) -> list[float]:
    """Each arm's outcome minus its seed's reference arm's (arms whose reference has not run: none)."""
    references = [arms.get((SOURCES[a.source].reference, "none", a.seed)) for a in group]
    return [a.outcome - r.outcome for a, r in zip(group, references, strict=True) if r is not None]


def _peak(group: list[Arm], key: str) -> float:
    return max(max(series(a.metrics, key)[1]) for a in group)


def table(arms: dict[tuple[str, str, int], Arm]) -> str:
    """One row per (source, correction): each seed's start → outcome and verdict, the difference from
    the reference and the separation from no correction, then the telemetry over training."""
    lines = [
        "| source | correction | seeds | held-out start → end (each seed) | Δ vs reference | verdicts "
        "| vs none | reward, first → last fifth | mean \\|log k\\|, first → last fifth "
        "| max \\|log k\\|, first → last fifth | masked | entropy, first → last fifth | max grad norm |",
        "|---|---|---:|---|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for source, correction in _cells(arms):
        group = [arms[key] for key in sorted(arms) if key[:2] == (source, correction)]
        deltas = _deltas(group, arms)
        mismatch, worst, entropy = (
            _mean_fifths(group, key)
            for key in ("mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max", "actor/entropy")
        )
        masked = statistics.fmean(statistics.fmean(series(a.metrics, "icepop/mask_frac")[1]) for a in group)
        lines.append(
            f"| {SOURCES[source].label} | {correction} | {len(group)} "
            f"| {', '.join(f'{a.start:.3f} → {a.outcome:.3f}' for a in group)} "
            f"| {f'{statistics.fmean(deltas):+.3f}' if deltas else '—'} "
            f"| {', '.join(verdict(a, arms) for a in group)} "
            f"| {'—' if correction == 'none' else separates(source, correction, arms)} "
            f"| {statistics.fmean(a.reward_first for a in group):.3f} → "
            f"{statistics.fmean(a.reward_last for a in group):.3f} "
            f"| {mismatch[0]:.2g} → {mismatch[1]:.2g} | {worst[0]:.3g} → {worst[1]:.3g} | {masked:.2%} "
            f"| {entropy[0]:.3f} → {entropy[1]:.3f} "
            f"| {_peak(group, 'actor/grad_norm'):.3g} |"
        )
    return "\n".join(lines)


def _cells(arms: dict[tuple[str, str, int], Arm]) -> list[tuple[str, str]]:
    """The (source, correction) pairs that have arms, in the map's order."""
    present = {key[:2] for key in arms}
    return [(s, c) for s in SOURCES for c in CORRECTIONS if (s, c) in present]


def draw_map(arms: dict[tuple[str, str, int], Arm], path: Path) -> Path:
    """The map: a row per source and level, a column per correction; each cell the mean outcome's
    difference from the reference (blue better, red worse), with the seeds run and the protocol's marks
    (C collapsed, D degraded on some seed; + / − a correction that separates from none on every seed)."""
    plt = pyplot()
    rows = [s for s in SOURCES if any(key[0] == s for key in arms)]
    columns = [c for c in CORRECTIONS if any(key[1] == c for key in arms)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(columns) + 4), 0.6 * len(rows) + 1.8))
    grid = [[float("nan")] * len(columns) for _ in rows]
    for (i, source), (j, correction) in ((r, c) for r in enumerate(rows) for c in enumerate(columns)):
        group = [a for key, a in arms.items() if key[:2] == (source, correction)]
        deltas = _deltas(group, arms)
        if not deltas:
            continue
        grid[i][j] = statistics.fmean(deltas)
        verdicts = {verdict(a, arms) for a in group}
        marks = "C" if "collapsed" in verdicts else "D" if "degraded" in verdicts else ""
        marks += {"better": " +", "worse": " −"}.get(separates(source, correction, arms), "")
        ax.text(j, i, f"{grid[i][j]:+.2f}{marks}\n{len(group)} seed{'s' * (len(group) > 1)}",
                ha="center", va="center", fontsize=7)  # fmt: skip
    image = ax.imshow(grid, cmap="RdBu", vmin=-0.15, vmax=0.15, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), [SOURCES[s].label for s in rows])
    fig.colorbar(image, ax=ax, label="Δ held-out accuracy vs reference")
    return save_figure(fig, "The mismatch map: tiny models, countdown, 150 RL steps", path)


CURVES = [
    ("eval/accuracy_lenient", "held-out greedy accuracy"),
    ("reward/mean", "training reward"),
    ("mismatch/abs_logp_diff_mean", "mean |log k|"),
    ("mismatch/abs_logp_diff_max", "max |log k|"),
    ("icepop/mask_frac", "fraction of tokens masked"),
    ("actor/entropy", "policy entropy"),
    ("actor/grad_norm", "gradient norm"),
]


def draw_curves(arms: dict[tuple[str, str, int], Arm], source: str, path: Path) -> Path:
    """Every correction's curves at one source and level (thin: each seed) and its reference's (grey)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    reference = SOURCES[source].reference
    lines = [
        (key, a) for key, a in sorted(arms.items()) if key[0] == source or key[:2] == (reference, "none")
    ]
    for ax, (key, title) in zip(axes.flat, CURVES, strict=False):
        for (src, correction, seed), arm in lines:
            colour = "black" if src != source else f"C{list(CORRECTIONS).index(correction)}"
            label = f"{correction}{' (reference)' if src != source else ''}" if seed == 0 else None
            if key.startswith("eval/"):
                steps, values = series(arm.evals, key)
            else:  # per-step metrics: a 10-step moving average
                steps, values = series(arm.metrics, key)
                values = [statistics.fmean(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
            ax.plot(steps, values, color=colour, linewidth=1.0, alpha=0.8, label=label,
                    linestyle="-" if seed == 0 else "--")  # fmt: skip
        ax.set(title=title if key.startswith("eval/") else f"{title} (10-step mean)", xlabel="RL step")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(
        *axes.flat[0].get_legend_handles_labels(), loc="center", title="seed 0 solid, 1 dashed"
    )
    return save_figure(fig, f"{SOURCES[source].label}: every correction", path)


def draw(directory: Path, out: Path) -> Path:
    """map.png, one curves-<source>.png per source with corrections beyond IcePop, and map.md."""
    arms = read_map(directory)
    if not arms:
        raise SystemExit(f"{directory} holds no arms (arm.json): run studies/mismatch_map.py first")
    out.mkdir(parents=True, exist_ok=True)
    figures = [draw_map(arms, out / "map.png")]
    for source in SOURCES:
        if len({c for s, c, _ in arms if s == source}) > 2:
            figures.append(draw_curves(arms, source, out / f"curves-{source}.png"))
    commits = sorted({json.loads((d / "arm.json").read_text())["commit"][:10]
                      for d in directory.iterdir() if (d / "arm.json").is_file()})  # fmt: skip
    text = [f"# The mismatch map ({len(arms)} arms; commits {', '.join(commits)})", "", table(arms), ""]
    text += [f"![{f.stem}]({f.name})" for f in figures]
    path = out / "map.md"
    path.write_text("\n".join(text) + "\n")
    return path
