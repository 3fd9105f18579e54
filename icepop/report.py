"""`python -m icepop.report RUN_DIR [RUN_DIR ...]`: plots that compare RL runs side by side, and a short
Markdown summary next to them. `python -m icepop.report --map studies/map` draws the mismatch map
(icepop.study_map) instead.

Key design choice: everything comes from what a run already wrote — config.yaml (the run's correction
and mismatch-injection level name it in every legend), metrics.jsonl, histograms.jsonl, events.jsonl —
so any finished or running run directory can be reported on, on any machine, without re-running it.
Plots: reward, gradient norm, mismatch mean and max, mask fraction low/high, response length, held-out
greedy accuracy from eval.jsonl (lenient where the run measured it; one panel each, a line per run), and
each run's log k histogram over time (a heat map).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

from icepop.plots import integer_steps, pyplot, read_evals, save_figure, series
from icepop.telemetry import read_histograms
from icepop.tracking import read_metrics

STYLES = ["-", "--", ":", "-."]
PANELS = [
    ("reward/mean", "reward (mean)"),
    ("actor/grad_norm", "gradient norm"),
    ("mismatch/abs_logp_diff_mean", "mismatch: mean |log k|"),
    ("mismatch/abs_logp_diff_max", "mismatch: max |log k|"),
    ("icepop/mask_frac_low", "mask fraction, k < α"),
    ("icepop/mask_frac_high", "mask fraction, k > β"),
    ("response_length/mean", "response length (tokens)"),
    ("response_length/truncated_frac", "replies cut at rollout.max_new_tokens"),
    ("reward/zero_variance_group_frac", "groups with one reward for all (train nothing)"),
    ("actor/entropy", "policy entropy (sampled tokens)"),
    ("actor/kl", "KL to the reference policy (algo.kl_coef > 0)"),
    ("eval/accuracy_lenient", "held-out greedy accuracy"),
]


def run_label(run_dir: Path) -> str:
    """The run's name, correction and mismatch level, from its config.yaml."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    algo, rollout = config["algo"], config["rollout"]
    correction = algo["correction"]
    if correction in ("icepop", "icepop-online", "token-mis", "seq-mis"):
        correction += f" [{algo['ratio_low']}, {algo['ratio_high']}]"
    elif correction in ("tis", "seq-tis"):
        correction += f" C={algo['ratio_high']}"
    elif f"{correction.replace('-', '_')}_threshold" in algo:  # the trust-region corrections
        correction += f" δ={algo[correction.replace('-', '_') + '_threshold']:g}, anchor {algo['anchor']}"
    return (
        f"{run_dir.name}: {correction}, noise {rollout.get('mismatch_noise', 0.0)}, {rollout['dtype']} engine"
    )


def plot_metrics(runs: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """`metrics_figure`, saved as metrics.png."""
    return save_figure(metrics_figure(runs), "icepop runs compared", out / "metrics.png")


def metrics_figure(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """One panel per metric of PANELS, a line per run, whole steps on the x axes."""
    panel_rows = math.ceil(len(PANELS) / 2)
    fig, axes = pyplot().subplots(panel_rows, 2, figsize=(12, 3.2 * panel_rows))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=False):
        for i, (label, rows) in enumerate(runs.items()):  # dashes keep overlapping runs visible
            marker = "o" if key.startswith("eval/") else None  # a few evaluations, not a point per step
            ax.plot(*series(rows, key), label=label, linewidth=1.4, linestyle=STYLES[i % len(STYLES)],
                    marker=marker)  # fmt: skip
        ax.set(title=title, xlabel="RL step", ylabel=key)
        ax.xaxis.set_major_locator(integer_steps())
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    return fig


def plot_histograms(run_dirs: list[Path], labels: list[str], out: Path) -> Path:
    """Each run's log k histogram per step as a heat map (log10 of token counts); histograms.png."""
    import numpy as np

    fig, axes = pyplot().subplots(1, len(run_dirs), figsize=(5.5 * len(run_dirs), 4), squeeze=False)
    for ax, run_dir, label in zip(axes[0], run_dirs, labels, strict=True):
        edges, rows = read_histograms(run_dir)
        counts = np.array([r["counts"] for r in rows], dtype=float).T
        steps = [r["step"] for r in rows]
        image = ax.imshow(np.log10(1 + counts), aspect="auto", origin="lower", cmap="viridis",
                          extent=(min(steps) - 0.5, max(steps) + 0.5, edges[0], edges[-1]))  # fmt: skip
        ax.set(title=label, xlabel="RL step", ylabel="log k = ℓ_old − ℓ_inf")
        ax.xaxis.set_major_locator(integer_steps())
        fig.colorbar(image, ax=ax, label="log10(1 + tokens)")
    return save_figure(fig, "train/inference log-ratio per step", out / "histograms.png")


def summary(
    runs: dict[str, list[dict[str, Any]]],
    events: dict[str, list[dict[str, Any]]],
    evals: dict[str, list[dict[str, Any]]],
) -> str:
    """A Markdown table: steps, first/last-window reward, held-out accuracy first → last, max mismatch,
    mean mask fraction, alerts."""
    lines = [
        "| run | steps | reward, first → last 10% of steps | held-out accuracy | max \\|log k\\| "
        "| mean mask fraction | alerts |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for label, rows in runs.items():
        tenth = max(1, len(rows) // 10)
        reward = [r["reward/mean"] for r in rows]
        first, last = sum(reward[:tenth]) / tenth, sum(reward[-tenth:]) / tenth
        worst = max((r["mismatch/abs_logp_diff_max"] for r in rows), default=float("nan"))
        mask = sum(r["icepop/mask_frac"] for r in rows) / len(rows)
        alerts = ", ".join(f"{e['alert']} @ {e['step']}" for e in events[label]) or "none"
        _, accuracy = series(evals[label], "eval/accuracy_lenient")
        held_out = f"{accuracy[0]:.3f} → {accuracy[-1]:.3f}" if accuracy else "—"
        lines.append(
            f"| {label} | {len(rows)} | {first:.3f} → {last:.3f} | {held_out} | {worst:.3g} | {mask:.4f} "
            f"| {alerts} |"
        )
    return "\n".join(lines)


def report(run_dirs: list[Path], out: Path) -> Path:
    """Write metrics.png, histograms.png and report.md into `out`; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    labels = [run_label(d) for d in run_dirs]
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs, strict=True)}
    events = {
        label: [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines() if line.strip()]
        if (d / "events.jsonl").is_file() else []
        for label, d in zip(labels, run_dirs, strict=True)
    }  # fmt: skip
    evals = {label: read_evals(d) for label, d in zip(labels, run_dirs, strict=True)}
    plotted = {label: rows + evals[label] for label, rows in runs.items()}
    plots = [plot_metrics(plotted, out), plot_histograms(run_dirs, labels, out)]
    text = "\n".join(
        [
            "# icepop report",
            "",
            f"Runs: {', '.join(str(d) for d in run_dirs)}",
            "",
            summary(runs, events, evals),
            "",
        ]
        + [f"![{p.stem}]({p.name})" for p in plots]
    )
    path = out / "report.md"
    path.write_text(text + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icepop.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="*", type=Path, help="run directories (each with config.yaml, metrics.jsonl)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the first run's report/)"
    )
    parser.add_argument(
        "--map", type=Path, default=None,
        help="draw the mismatch map from a folder of arms (studies/map; default out: docs/study/map)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.map is not None:
        from icepop.study_map import draw  # the map's protocol and figures

        print(f"icepop report: {draw(args.map, args.out or Path('docs/study/map'))} and its figures")
        return
    if not args.runs:
        parser.error("pass one or more run directories, or --map DIR")
    for run in args.runs:
        for name in ("config.yaml", "metrics.jsonl", "histograms.jsonl"):
            if not (run / name).is_file():
                parser.error(f"{run} has no {name}: pass the run.dir of an RL run (rlvr or rlhf)")
    path = report(args.runs, args.out or args.runs[0] / "report")
    print(f"icepop report: {path} and its plots")


if __name__ == "__main__":
    main()
