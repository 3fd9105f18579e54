"""IcePop's central result at small scale, on the tiny built-in models: does masking the tokens whose
train/inference ratio leaves [α, β] keep GRPO stable where no correction (or TIS) does not?

Three parts, each a set of ordinary `python -m icepop.train` runs whose run directories it then reads
(metrics.jsonl, histograms.jsonl, events.jsonl, summary.json), so any run can be re-plotted with
`python -m icepop.report` too:

(a) the mismatch of the tiny dense and tiny MoE models at step 1 — a bfloat16 vLLM engine against
    the float32 trainer, both at the same SFT weights — overall and by response position (the
    paper's Fig. 1-2 analogue);
(b) GRPO without correction, TIS (C = 2), IcePop [0.5, 5] and KPop, at several mismatch levels
    (engine-side weight noise, `rollout.mismatch_noise`, on a float32 engine: level 0 is exact),
    several seeds each, same data and budget: reward, gradient norm, max mismatch and mask fraction
    over training (Fig. 6-10 analogues), and which runs raised the mismatch alerts;
(c) the band sensitivity of IcePop: [0.5, 5] vs [0.5, 2] vs [0.4, 5] at the highest level.

    python studies/mismatch_study.py --size quick    # ≤ 30 min on this 2-core CPU (docs/study.md)
    python studies/mismatch_study.py --size full     # longer runs, more seeds, both models; a GPU box

Runs go under --runs (default studies/runs/<size>/, not committed); figures, results.md and
results.json under --out (default docs/study/<size>/). A run whose summary.json exists is reused, so
an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from icepop.report import pyplot, save_figure, series
from icepop.stages.summary import read_summary
from icepop.telemetry import MismatchAlerts, read_histograms
from icepop.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SECONDS = "study_seconds.txt"
"""Each run's wall time (process start to end), kept in its folder: the study's cost adds them up."""

CORRECTIONS = {
    "none": ["algo.correction=none"],
    "tis C=2": ["algo.correction=tis", "algo.ratio_high=2"],
    "icepop [0.5, 5]": ["algo.correction=icepop", "algo.ratio_low=0.5", "algo.ratio_high=5"],
    "kpop": ["algo.correction=kpop"],
}
BANDS = {
    "icepop [0.5, 5]": CORRECTIONS["icepop [0.5, 5]"],
    "icepop [0.5, 2]": ["algo.correction=icepop", "algo.ratio_low=0.5", "algo.ratio_high=2"],
    "icepop [0.4, 5]": ["algo.correction=icepop", "algo.ratio_low=0.4", "algo.ratio_high=5"],
}
PANELS = [
    ("reward/mean", "training reward (mean)"),
    ("actor/grad_norm", "gradient norm"),
    ("mismatch/abs_logp_diff_max", "max |log k| over the batch"),
    ("icepop/mask_frac", "fraction of tokens masked"),
]


@dataclass(frozen=True)
class Size:
    sft_steps: dict[str, int]
    """SFT warm-up steps per model (2-digit arithmetic)."""
    rl_steps: int
    seeds: tuple[int, ...]
    levels: tuple[float, ...]
    """`rollout.mismatch_noise` levels of (b); (c) runs at the last one."""
    band_seeds: tuple[int, ...]
    rl_models: tuple[str, ...]
    prompts_per_step: int
    samples_per_prompt: int


# Measured mean |k − 1| on the SFT'd tiny dense model (fp32 engine): noise 0.05 → 2.7% (below the 5%
# alert), 0.1 → 5.3%, 0.3 → 15%; the tiny MoE: 2.1%, 5.3%, 14%.
SIZES = {
    "quick": Size(sft_steps={"dense": 300, "moe": 100}, rl_steps=25, seeds=(0, 1), levels=(0.0, 0.05, 0.3),
                  band_seeds=(0,), rl_models=("dense",), prompts_per_step=8, samples_per_prompt=8),
    "full": Size(sft_steps={"dense": 600, "moe": 600}, rl_steps=300, seeds=(0, 1, 2, 3),
                 levels=(0.0, 0.05, 0.1, 0.3), band_seeds=(0, 1, 2, 3), rl_models=("dense", "moe"),
                 prompts_per_step=32, samples_per_prompt=8),
}  # fmt: skip


def train(runs: Path, name: str, overrides: list[str]) -> Path:
    """`python -m icepop.train *overrides` into runs/name (skipped when already complete)."""
    run_dir = runs / name
    if read_summary(run_dir) is not None:
        print(f"  {name}: done before, reused", flush=True)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts afresh
    command = [sys.executable, "-m", "icepop.train", *overrides, f"run.dir={run_dir}"]
    started = time.perf_counter()
    log = runs / f"{name}.log"
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"run {name} failed ({result.returncode}); see {log}\n  {' '.join(command)}")
    seconds = time.perf_counter() - started
    (run_dir / SECONDS).write_text(f"{seconds:.1f}\n")
    print(f"  {name}: {seconds:.0f} s", flush=True)
    return run_dir


def sft_checkpoints(size: Size, runs: Path, models: set[str]) -> dict[str, str]:
    """A short SFT per model on 2-digit arithmetic, so that RL has a signal to improve."""
    checkpoints = {}
    for model in sorted(models):
        steps = size.sft_steps[model]
        overrides = ["+recipe=sft", f"model=tiny-{model}", "data=arithmetic", f"sft.steps={steps}"]
        run_dir = train(runs, f"sft-{model}-{steps}", overrides)
        summary = read_summary(run_dir)
        assert summary is not None and summary.checkpoint is not None
        checkpoints[model] = summary.checkpoint
    return checkpoints


def rl_overrides(size: Size, model: str, checkpoint: str, steps: int) -> list[str]:
    """One RLVR run of the study, from an SFT checkpoint of a tiny model (with that model's preset:
    lr 1e-4, a float32 engine, 32-token replies), with the size's batch and budget."""
    return [
        "+recipe=rlvr",
        "data=arithmetic",
        f"model=tiny-{model}",
        f"model.path={checkpoint}",
        "model.sft_warmup=false",
        f"train.steps={steps}",
        "train.eval_every=0",
        "data.eval_size=64",
        f"algo.prompts_per_step={size.prompts_per_step}",
        f"algo.samples_per_prompt={size.samples_per_prompt}",
        "logger.alert_window=10",
    ]


def part_a(size: Size, runs: Path, out: Path, checkpoints: dict[str, str]) -> dict[str, Any]:
    """Step-1 mismatch of dense vs MoE with a bfloat16 engine, overall and by response position: after
    SFT (short, confident replies: an answer and EOS) and at the random initialisation (32-token replies,
    which show the profile along a longer response)."""
    plt = pyplot()
    fig, (by_position, histogram) = plt.subplots(1, 2, figsize=(12, 4.2))
    results = {}
    for model, start in itertools.product(("dense", "moe"), ("sft", "init")):
        path = checkpoints[model] if start == "sft" else f"tiny:{model}"
        overrides = [
            *rl_overrides(size, model, path, steps=1),
            "rollout.dtype=bfloat16",
            "algo.prompts_per_step=32",
        ]
        run_dir = train(runs, f"a-{model}-{start}-bf16", overrides)
        edges, rows = read_histograms(run_dir)
        first, metrics = rows[0], read_metrics(run_dir)[0]
        label = f"tiny {model}, {'after SFT' if start == 'sft' else 'random init'}"
        style = {"color": "C0" if model == "dense" else "C1", "linestyle": "-" if start == "sft" else "--"}
        positions = [i for i, n in enumerate(first["tokens_by_position"]) if n >= 16]  # enough tokens
        by_position.plot([i + 1 for i in positions], [first["abs_by_position"][i] for i in positions],
                         marker="o", markersize=3, label=label, **style)  # fmt: skip
        centres = [(lo + hi) / 2 for lo, hi in itertools.pairwise(edges)]
        total = sum(first["counts"])
        histogram.semilogy(centres, [max(c / total, 1e-6) for c in first["counts"]], label=label, **style)
        results[f"{model}-{start}"] = {
            key: metrics[key]
            for key in ("mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max",
                        "mismatch/rel_prob_diff_mean", "mismatch/kl_k3", "response_length/mean")
        }  # fmt: skip
    by_position.set(title="mean |log k| by response position", xlabel="response token position",
                    ylabel="mean |ℓ_old − ℓ_inf|", yscale="log")  # fmt: skip
    histogram.set(title="distribution of log k over all tokens (0.1-wide bins)",
                  xlabel="log k = ℓ_old − ℓ_inf", ylabel="fraction of tokens (log scale)",
                  xlim=(-0.6, 0.6))  # fmt: skip
    for ax in (by_position, histogram):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, "(a) bfloat16 vLLM vs float32 trainer, same weights, step 1", out / "a_mismatch.png")
    return results


def run_grid(size: Size, runs: Path, checkpoint: str, model: str, grid: dict[str, list[str]],
             levels: tuple[float, ...], seeds: tuple[int, ...],
             prefix: str) -> dict[tuple[str, float], list[Path]]:  # fmt: skip
    """Every (correction, level) of the grid over the seeds."""
    found: dict[tuple[str, float], list[Path]] = {}
    for level in levels:
        # At level 0 the fp32 engine is exact (k ≡ 1): every correction keeps every token with weight 1,
        # so the runs would be identical; one (no correction, first seed) is the reference for all.
        for label, correction in grid.items() if level else list(grid.items())[:1]:
            for seed in seeds if level else seeds[:1]:
                name = (f"{prefix}-{model}-{label.split()[0]}{_band(correction)}-noise{level}-seed{seed}"
                        f"-{size.rl_steps}steps")  # fmt: skip
                overrides = [*rl_overrides(size, model, checkpoint, size.rl_steps), *correction,
                             f"rollout.mismatch_noise={level}", f"run.seed={seed}"]  # fmt: skip
                found.setdefault((label, level), []).append(train(runs, name, overrides))
    return found


def _band(correction: list[str]) -> str:
    values = [o.split("=")[1] for o in correction if o.startswith(("algo.ratio_low", "algo.ratio_high"))]
    return "-" + "-".join(values) if values else ""


def plot_grid(found: dict[tuple[str, float], list[Path]], title: str, path: Path) -> None:
    """Panels of PANELS; one colour per correction, the mean over seeds (thin lines: each seed),
    one line style per level."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    labels = sorted({label for label, _ in found}, key=list(CORRECTIONS | BANDS).index)
    levels = sorted({level for _, level in found})
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, (key, panel) in zip(axes.flat, PANELS, strict=True):
        for (label, level), run_dirs in found.items():
            curves = [series(read_metrics(d), key) for d in run_dirs]
            style = ["-", "--", ":", "-."][levels.index(level) % 4]
            for steps, values in curves:
                ax.plot(steps, values, color=colours[label], linestyle=style, linewidth=0.5, alpha=0.35)
            steps = curves[0][0]
            mean = [statistics.fmean(values[i] for _, values in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=colours[label], linestyle=style, linewidth=1.8,
                    label=f"{label}, noise {level}")  # fmt: skip
        ax.set(title=panel, xlabel="RL step", ylabel=key)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    save_figure(fig, title, path)


def alert_events(run_dir: Path, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's alerts as icepop.telemetry raises them now, replayed over its logged metrics with its
    own settings (the same as its events.jsonl for a run made with this version of icepop)."""
    logger = yaml.safe_load((run_dir / "config.yaml").read_text())["logger"]
    alerts = MismatchAlerts(logger["mismatch_alert"], logger["alert_window"])
    nan = float("nan")
    return [
        e
        for row in metrics
        for e in alerts.update(row["step"], {k: nan if v is None else v for k, v in row.items()})
    ]


def summarise(found: dict[tuple[str, float], list[Path]]) -> list[dict[str, Any]]:
    """Per run: reward over the first and last fifth of training, held-out greedy accuracy before
    and after, worst mismatch and gradient norm, mean mask fraction, and the alerts it raised."""
    rows = []
    for (label, level), run_dirs in found.items():
        for run_dir in run_dirs:
            metrics = read_metrics(run_dir)
            fifth = max(1, len(metrics) // 5)
            reward = [m["reward/mean"] for m in metrics]
            summary = read_summary(run_dir)
            assert summary is not None
            events = alert_events(run_dir, metrics)
            rows.append({
                "run": run_dir.name,
                "correction": label,
                "noise": level,
                "reward_first": statistics.fmean(reward[:fifth]),
                "reward_last": statistics.fmean(reward[-fifth:]),
                "heldout_before": summary.before,
                "heldout_after": summary.after,
                "max_abs_log_k": max(m["mismatch/abs_logp_diff_max"] for m in metrics),
                "rel_prob_diff_mean": statistics.fmean(m["mismatch/rel_prob_diff_mean"] for m in metrics),
                "max_grad_norm": max(m["actor/grad_norm"] for m in metrics),
                "mask_frac_mean": statistics.fmean(m["icepop/mask_frac"] for m in metrics),
                "alerts": sorted({e["alert"] for e in events}),
                "minutes": summary.seconds / 60,
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| correction | noise | seeds | train reward, first → last fifth "
        "| held-out greedy acc., before → after | mean \\|k − 1\\| | max \\|log k\\| | max grad norm "
        "| mask fraction | runs with alerts |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["correction"], row["noise"]), []).append(row)
    for (label, level), group in groups.items():

        def mean(key: str, group: list[dict[str, Any]] = group) -> float:
            return statistics.fmean(r[key] for r in group)

        alerts = {a: sum(a in r["alerts"] for r in group) for r in group for a in r["alerts"]}
        lines.append(
            f"| {label} | {level} | {len(group)} | {mean('reward_first'):.3f} → {mean('reward_last'):.3f} "
            f"| {mean('heldout_before'):.3f} → {mean('heldout_after'):.3f} "
            f"| {mean('rel_prob_diff_mean'):.4f} "
            f"| {mean('max_abs_log_k'):.3g} | {max(r['max_grad_norm'] for r in group):.3g} "
            f"| {mean('mask_frac_mean'):.4f} "
            f"| {', '.join(f'{a}: {n}/{len(group)}' for a, n in sorted(alerts.items())) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--runs", type=Path, default=None, help="run directories (default studies/runs/SIZE)")
    parser.add_argument("--out", type=Path, default=None, help="figures and tables (default docs/study/SIZE)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    runs = (args.runs or ROOT / "studies" / "runs" / args.size).resolve()
    out = (args.out or ROOT / "docs" / "study" / args.size).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    started = time.perf_counter()
    print(f"icepop study, size {args.size}: {asdict(size)}", flush=True)

    checkpoints = sft_checkpoints(size, runs, {"dense", "moe"})
    results: dict[str, Any] = {"size": args.size, "settings": asdict(size)}
    print("(a) step-1 mismatch, dense vs MoE", flush=True)
    results["a"] = part_a(size, runs, out, checkpoints)
    sections = [f"## (a) step-1 mismatch, bfloat16 engine\n\n```\n{json.dumps(results['a'], indent=2)}\n```"]
    for model in size.rl_models:
        print(f"(b) corrections × mismatch levels × seeds, tiny {model}", flush=True)
        found = run_grid(size, runs, checkpoints[model], model, CORRECTIONS, size.levels, size.seeds, "rl")
        plot_grid(found, f"(b) corrections under injected mismatch, tiny {model}", out / f"b_{model}.png")
        results[f"b_{model}"] = summarise(found)
        print(f"(c) IcePop band sensitivity, tiny {model}", flush=True)
        top = size.levels[-1:]
        bands = run_grid(size, runs, checkpoints[model], model, BANDS, top, size.band_seeds, "rl")
        plot_grid(bands, f"(c) IcePop bands at noise {size.levels[-1]}, tiny {model}", out / f"c_{model}.png")
        results[f"c_{model}"] = summarise(bands)
        sections += [f"## (b) tiny {model}\n\n{table(results[f'b_{model}'])}",
                     f"## (c) tiny {model}\n\n{table(results[f'c_{model}'])}"]  # fmt: skip
    results["minutes"] = (
        sum(float((d / SECONDS).read_text()) for d in runs.iterdir() if (d / SECONDS).is_file()) / 60
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = (
        f"# Study results ({args.size})\n\n{results['minutes']:.1f} min of runs in all (each run's wall "
        f"time, added up); this invocation {(time.perf_counter() - started) / 60:.1f} min."
    )
    (out / "results.md").write_text("\n\n".join([header, *sections]) + "\n")
    print(f"icepop study: {out / 'results.md'} ({results['minutes']:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
