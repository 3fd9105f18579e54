"""Part (d) of the study: the real train/inference mismatch of a real model, with no injection.

SmolLM2-135M-Instruct (model=smollm2-135m) with a bfloat16 vLLM engine against the float32 trainer, at
the start and after RL (a checkpoint given with --after), on short replies (the built-in 2-digit
addition of README's run) and long ones (gsm_symbolic, up to 256 tokens): one RL step each, whose
step-1 metrics are measured before any update. Reported: mean and max |log k|, the fraction of tokens IcePop
[0.5, 5] masks (low and high), the fraction TIS (C = 2) would clip (from the log k histogram, 0.1-wide
bins: log k ≥ 0.7), and mean |log k| by response position — the analogue of the paper's Fig. 1-2.

    python studies/real_mismatch.py --after runs/smol-s0/checkpoints/step-24   # ≈ 15 min here
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from mismatch_study import ROOT, pyplot, save_figure, train

from icepop.telemetry import read_histograms
from icepop.tracking import read_metrics

TASKS = {
    "short replies (arithmetic)": ["data=arithmetic", "rollout.max_new_tokens=96",
                                   "algo.prompts_per_step=16"],
    "long replies (gsm_symbolic)": ["data.source=reasoning_gym:gsm_symbolic", "rollout.max_new_tokens=256",
                                    "algo.prompts_per_step=8", "data.size=64"],
}  # fmt: skip
METRICS = ("mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max", "icepop/mask_frac",
           "icepop/mask_frac_low", "icepop/mask_frac_high", "mismatch/kl_k3", "response_length/mean",
           "sync/probe_abs_logp_diff_mean")  # fmt: skip


def step_one(runs: Path, name: str, start: str | None, task: list[str]) -> Path:
    """One RL step with a bfloat16 engine: its metrics are those of the starting weights."""
    overrides = [
        "+recipe=rlvr", "model=smollm2-135m", *([f"model.path={start}"] if start else []),
        "rollout.dtype=bfloat16", *task, "algo.samples_per_prompt=4",
        "train.steps=1", "train.eval_every=0", "data.eval_size=8",
    ]  # fmt: skip
    return train(runs, name, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=Path, help="a checkpoint after RL (e.g. README's run)")
    parser.add_argument("--runs", type=Path, default=ROOT / "studies" / "runs" / "real")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study" / "real")
    args = parser.parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    starts = {"start": None, **({"after RL": str(args.after.resolve())} if args.after else {})}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    results: dict[str, Any] = {}
    for (task, options), (when, start) in itertools.product(TASKS.items(), starts.items()):
        name = f"d-{task.split('(')[1].rstrip(')')}-{when.replace(' ', '-')}"
        run_dir = step_one(args.runs, name, start, options)
        edges, rows = read_histograms(run_dir)
        first, metrics = rows[0], read_metrics(run_dir)[0]
        tokens = sum(first["counts"])
        tis = sum(c for lo, c in zip(edges, first["counts"], strict=False) if lo >= 0.7 - 1e-9) / tokens
        results[f"{task}, {when}"] = {
            **{k: metrics[k] for k in METRICS},
            "tis_clip_frac": tis,
            "tokens": tokens,
        }
        positions = [i for i, n in enumerate(first["tokens_by_position"]) if n >= 16]
        axes[0 if "short" in task else 1].plot(
            [i + 1 for i in positions], [first["abs_by_position"][i] for i in positions],
            marker="o", markersize=2, label=when,
        )  # fmt: skip
        print(json.dumps({name: results[f"{task}, {when}"]}), flush=True)
    for ax, task in zip(axes, TASKS, strict=True):
        ax.set(title=task, xlabel="response token position", ylabel="mean |ℓ_old − ℓ_inf|", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(
        fig, "(d) SmolLM2-135M: bfloat16 vLLM vs float32 trainer, same weights", args.out / "d_real.png"
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
