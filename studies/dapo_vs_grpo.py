"""`+recipe=dapo` against `+recipe=rlvr` (plain GRPO with IcePop) on SmolLM2-135M-Instruct, same
workload, steps and seeds: held-out greedy accuracy per RL step and per minute of training.

The workload is README's real-model one (2-digit addition, the lenient reward, 8 prompts × 6 samples,
96-token replies, lr 5e-5, 128 held-out problems); each arm is an ordinary `python -m icepop.train`
run. What the figure needs (config, metrics, evals, summary) is kept under studies/dapo/<arm>/ with
the commit it ran on, so the figure is redrawn on any machine:

    python studies/dapo_vs_grpo.py run --seeds 0 1     # 6-9 min an arm here (2 cores)
    python studies/dapo_vs_grpo.py draw                # docs/study/dapo/curves.png and table.md

"Per minute" is the run's training time: the sum of its steps' wall time (`perf/step_seconds`:
generation, extra dynamic-sampling rounds, scoring, sync and the update), without held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from mismatch_map import commit, keep  # type: ignore[import-not-found]
from mismatch_study import train  # type: ignore[import-not-found]

from icepop.plots import pyplot, read_evals, save_figure, series
from icepop.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVAL_EVERY = 12, 3
WORKLOAD = [
    "model=smollm2-135m",
    "data=arithmetic",
    "reward.function=icepop.rewards.verifiers:lenient_reward",
    "trainer.lr=5e-5",
    "algo.prompts_per_step=8",
    "algo.samples_per_prompt=6",
    "rollout.max_new_tokens=96",
    "data.eval_size=128",
    f"train.steps={STEPS}",
    f"train.eval_every={EVAL_EVERY}",
    "train.checkpoint_every=0",
]
ARMS = {
    "grpo": ["+recipe=rlvr"],
    # DAPO's buffer is a fifth of the reply limit: 96 // 5 = 19 tokens.
    "dapo": ["+recipe=dapo", "algo.overlong_buffer=19"],
}


def run(seeds: list[int], runs: Path, kept: Path) -> None:
    """Every arm × seed not kept yet, grpo and dapo alternating so that drift hits both alike."""
    revision = commit()
    runs.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for arm, recipe in ARMS.items():
            name = f"{arm}--seed{seed}"
            if (kept / name / "summary.json").is_file():
                print(f"  {name}: kept already", flush=True)
                continue
            overrides = [*recipe, *WORKLOAD, f"run.seed={seed}"]
            meta = {"commit": revision, "arm": arm, "seed": seed, "overrides": overrides}
            keep(train(runs, name, overrides), kept / name, meta)


COLUMNS = (
    "Held out: greedy accuracy on 128 problems, read leniently (the reply's last number). Means per step: "
    "rollout s = generating and scoring every round (dynamic sampling's extra rounds included); groups "
    "trained = of algo.prompts_per_step=8 (dapo trains only groups whose samples' rewards differ, up to 3 "
    "rounds to find 8); zero-variance groups = their share of the trained batch."
)


def minutes_at(metrics: list[dict[str, Any]], steps: list[int]) -> list[float]:
    """Training minutes (Σ perf/step_seconds) when each of `steps` had finished; step 0 is minute 0."""
    done, total = {0: 0.0}, 0.0
    for row in metrics:
        total += row.get("perf/step_seconds", 0.0)
        done[row["step"]] = total / 60
    return [done[s] for s in steps]


def rollout_seconds(row: dict[str, Any]) -> float:
    """A step's rollouts: generating and scoring every round. (The runs kept here were made before
    timing/dynamic_sampling_seconds split the extra rounds out of timing/reward_seconds; the sum is the
    same either way.)"""
    parts = ("generate", "reward", "dynamic_sampling")
    return sum(row.get(f"timing/{part}_seconds", 0.0) for part in parts)


def arm_rows(kept: Path) -> list[dict[str, Any]]:
    """Per kept run: arm, seed, evals (steps, accuracy, minutes) and per-step means."""
    rows = []
    for directory in sorted(d for d in kept.iterdir() if (d / "arm.json").is_file()):
        meta = json.loads((directory / "arm.json").read_text())
        metrics = read_metrics(directory)
        steps, accuracy = series(read_evals(directory), "eval/accuracy_lenient")

        def mean(key: str, rows: list[dict[str, Any]] = metrics) -> float:
            values = [r[key] for r in rows if key in r]
            return statistics.fmean(values) if values else float("nan")

        rows.append({**meta, "steps": steps, "accuracy": accuracy, "minutes": minutes_at(metrics, steps),
                     "step_seconds": mean("perf/step_seconds"), "train_seconds": mean("timing/train_seconds"),
                     "rollout_seconds": statistics.fmean(rollout_seconds(r) for r in metrics),
                     "trained_rows": mean("dynamic_sampling/groups_trained"),
                     "rounds": mean("dynamic_sampling/rounds"),
                     "zero_variance": mean("reward/zero_variance_group_frac")})  # fmt: skip
    return rows


def fmt(value: float, spec: str) -> str:
    """`value` in `spec`, or "—" where the arm does not log it (NaN)."""
    return "—" if value != value else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| arm | seed | held out before | after 6 steps | after 12 steps | training min | s/step "
            "| rollout s | train s | rounds | groups trained | zero-variance groups |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        at = dict(zip(r["steps"], r["accuracy"], strict=True))
        lines.append(
            f"| {r['arm']} | {r['seed']} | {at.get(0, float('nan')):.1%} | {at.get(6, float('nan')):.1%} "
            f"| {at.get(STEPS, float('nan')):.1%} | {r['minutes'][-1]:.1f} | {r['step_seconds']:.1f} "
            f"| {r['rollout_seconds']:.1f} | {r['train_seconds']:.1f} | {fmt(r['rounds'], '.2f')} "
            f"| {fmt(r['trained_rows'], '.1f')} | {r['zero_variance']:.0%} |"
        )
    return "\n".join(lines)


def draw(kept: Path, out: Path) -> Path:
    rows = arm_rows(kept)
    if not rows:
        raise SystemExit(f"{kept} holds no runs: `python studies/dapo_vs_grpo.py run` first")
    out.mkdir(parents=True, exist_ok=True)
    fig, (by_step, by_minute) = pyplot().subplots(1, 2, figsize=(11, 4))
    for r in rows:
        style = {"color": f"C{list(ARMS).index(r['arm'])}", "linestyle": ["-", "--", ":"][r["seed"] % 3],
                 "marker": "o", "label": f"{r['arm']} seed {r['seed']}"}  # fmt: skip
        by_step.plot(r["steps"], r["accuracy"], **style)
        by_minute.plot(r["minutes"], r["accuracy"], **style)
    by_step.set(xlabel="RL step", ylabel="held-out accuracy (lenient, greedy)")
    by_minute.set(xlabel="training minutes (evaluation excluded)")
    for ax in (by_step, by_minute):
        ax.grid(alpha=0.3)
    by_minute.legend()
    figure = save_figure(fig, "SmolLM2-135M-Instruct: +recipe=dapo against +recipe=rlvr", out / "curves.png")
    commits = sorted({r["commit"][:10] for r in rows})
    text = [f"# DAPO against GRPO on SmolLM2-135M-Instruct (commits {', '.join(commits)})", "",
            table(rows), "", COLUMNS, "", f"![curves]({figure.name})", ""]  # fmt: skip
    (out / "table.md").write_text("\n".join(text))
    print((out / "table.md").read_text())
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "draw"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=ROOT / "studies" / "runs" / "dapo")
    parser.add_argument("--kept", type=Path, default=ROOT / "studies" / "dapo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study" / "dapo")
    args = parser.parse_args(argv)
    if args.action == "run":
        run(args.seeds, args.runs.resolve(), args.kept.resolve())
    draw(args.kept, args.out)


if __name__ == "__main__":
    sys.exit(main())
