"""LoRA (rank 16) against full fine-tuning on the same SmolLM2-135M-Instruct RL workload, on this machine.

    python bench/lora_vs_full.py                                  # full, then lora; 16 steps each (≈45 min)
    python bench/lora_vs_full.py --steps 2 data.eval_size=8       # quick check (a few minutes)
    python bench/lora_vs_full.py --runs lora --lora-lr 1e-3 --out /tmp/lora.json
    python bench/lora_vs_full.py trainer.lora.alpha=16            # trailing key=value: icepop overrides

The workload is README's "A real model on this CPU" command (WORKLOAD below: 8 prompts × 6 samples ×
96 new tokens, lr 5e-5, 128 held-out problems evaluated greedily before step 1, every 8 steps and after
the last). Configurations, each one `python -m icepop.train` subprocess, one after the other (never
concurrently), with run.dir=<--out-dir>/<config> (emptied first, so nothing resumes) and ICEPOP_CACHE
as the environment has it (the SmolLM2 conversion is cached there):
- full: exactly that command (every weight trained);
- lora: the same plus trainer.lora.rank=16 and trainer.lr=--lora-lr (default 5e-4: LoRA wants ≈10× the
  full-fine-tuning learning rate; alpha is icepop's default, 2 × rank = 32).
Trailing `key=value` arguments are added to both (after the configuration's own; a key given twice
keeps the last value).

Measured per configuration:
- trainer peak RSS: every 0.5 s (psutil) the RSS of each trainer rank — the Ray actor processes of the
  run's process tree whose title / cmdline contains "TrainerHost" (2 ranks) — summed; the peak of that
  sum over the run, and each rank's own peak (RSS counts pages shared between processes, e.g. the
  torch libraries, once per process; PSS, which splits them, is reported beside it). For context: the
  vLLM engine's peak (EngineHost) and the whole process tree's peak RSS/PSS (the driver and all its
  descendants: Ray's daemons and workers, the engine, the reward pool), as bench/vs_trl.py measures it;
- step time: median over steps 2..N of perf/step_seconds (metrics.jsonl; generate → sync), and the
  medians of its parts timing/train_seconds (the trainer's update), timing/sync_seconds (weight sync
  plus its log-prob probe), timing/generate_seconds and timing/old_logprobs_seconds, with their shares
  of the median step;
- learning curve: held-out greedy accuracy at each evaluation (eval.jsonl: eval/accuracy_lenient, the
  last number of the reply is the sum, as README reports it; eval/accuracy and eval/accuracy_strict
  are kept in the JSON), and reward/mean of the sampled rollouts at every step;
- wall minutes of the whole process (start-up, evaluations and the final checkpoint included).
The JSON also keeps the trainer's and the tree's RSS at every poll ("trace": seconds since launch, GB,
GB) and when each metrics row appeared ("row_seconds"), which places the peak: "trainer_peak_in_step" is
the step whose row came first after it (0: before step 1's row, i.e. start-up or the first step).
Printed as a table and written to bench/results/lora_vs_full.json (--out). Other jobs on this machine
distort every number: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from process_tree import GB, POLL_SECONDS, run_measured

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "lora_vs_full.json"

WORKLOAD = [
    "+recipe=rlvr",
    "model=smollm2-135m",
    "data=arithmetic",
    "reward.function=icepop.rewards.verifiers:lenient_reward",
    "trainer.lr=5e-5",
    "algo.prompts_per_step=8",
    "algo.samples_per_prompt=6",
    "rollout.max_new_tokens=96",
    "data.eval_size=128",
    "train.steps=16",
    "train.eval_every=8",
    "run.seed=0",
]
"""README's "A real model on this CPU: SmolLM2-135M-Instruct" command."""

LORA_RANK = 16
ACTORS = ("TrainerHost", "EngineHost")
"""Ray actor classes whose processes are measured on their own (found by process title / cmdline)."""

TIMINGS = ("train", "sync", "generate", "old_logprobs")
"""timing/<name>_seconds keys of metrics.jsonl reported beside the step time."""


def merge_overrides(*groups: list[str]) -> list[str]:
    """The overrides in order, a key given again replacing its earlier value in place."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"lora_vs_full: override {item!r} is not key=value")
            merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


def config_overrides(name: str, steps: int, lora_lr: str, run_dir: Path, extra: list[str]) -> list[str]:
    own = [f"trainer.lora.rank={LORA_RANK}", f"trainer.lr={lora_lr}"] if name == "lora" else []
    return merge_overrides(WORKLOAD, [f"train.steps={steps}"], own, extra, [f"run.dir={run_dir}"])


# --- measuring the run's processes ----------------------------------------------------------------


def run_process(command: list[str], log: Path, metrics: Path) -> dict[str, Any]:
    """Run `command` (output to `log`) in its own session while measuring its processes; also note
    when each row of `metrics` (the run's metrics.jsonl) appeared, in seconds since the launch."""
    launched = time.time()
    row_seconds: list[float] = []

    def note_rows() -> None:
        if metrics.is_file():
            rows = metrics.read_text().count("\n")
            row_seconds.extend([round(time.time() - launched, 1)] * (rows - len(row_seconds)))

    returncode, memory = run_measured(command, log, REPO, dict(os.environ), ACTORS, note_rows)
    return {
        "returncode": returncode,
        "wall_seconds": time.time() - launched,
        "row_seconds": row_seconds,
        **memory.report(),
    }


# --- reading the run ------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady(values: list[float]) -> float | None:
    """Median over steps 2..N (step 1 alone if there is no other)."""
    values = [v for v in values if v is not None]
    return statistics.median(values[1:] or values) if values else None


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def read_run(run_dir: Path) -> dict[str, Any]:
    rows = sorted(read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    evals = read_jsonl(run_dir / "eval.jsonl")
    out: dict[str, Any] = {"steps_done": len(rows)}
    step_s = steady([r.get("perf/step_seconds") for r in rows])
    out["step_s"] = step_s
    out["first_step_s"] = rows[0].get("perf/step_seconds") if rows else None
    for name in TIMINGS:
        part = steady([r.get(f"timing/{name}_seconds") for r in rows])
        out[f"{name}_s"] = part
        out[f"{name}_share"] = part / step_s if part is not None and step_s else None
    out["sync_push_s"] = steady([r.get("timing/sync_push_seconds") for r in rows])
    out["sync_probe_s"] = steady([r.get("timing/sync_probe_seconds") for r in rows])
    out["steps_seconds_total"] = sum(r.get("perf/step_seconds") or 0.0 for r in rows)
    rewards = [r.get("reward/mean") for r in rows]
    out["reward_mean"] = rewards
    out["reward_first4"], out["reward_last4"] = mean(rewards[:4]), mean(rewards[-4:])
    out["response_length_mean"] = [r.get("response_length/mean") for r in rows]
    out["truncated_frac"] = [r.get("response_length/truncated_frac") for r in rows]
    out["grad_norm"] = [r.get("actor/grad_norm") for r in rows]
    out["mismatch_abs_logp_diff_mean"] = [r.get("mismatch/abs_logp_diff_mean") for r in rows]
    out["sync_probe_abs_logp_diff"] = [r.get("sync/probe_abs_logp_diff") for r in rows]
    out["eval"] = [
        {
            "step": r["step"],
            "accuracy_lenient": r.get("eval/accuracy_lenient", r.get("eval/accuracy")),
            "accuracy": r.get("eval/accuracy"),
            "accuracy_strict": r.get("eval/accuracy_strict"),
            "problems": r.get("eval/problems"),
        }
        for r in sorted(evals, key=lambda r: r["step"])
    ]
    return out


# --- the comparison -------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit and the changed files of the working tree a run imports (the trainer ranks load
    icepop when they start)."""

    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True)
        return done.stdout.rstrip()

    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--short").splitlines()}


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.out_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run.dir holding a checkpoint would be resumed
    overrides = config_overrides(name, args.steps, args.lora_lr, run_dir, args.overrides)
    command = [sys.executable, "-m", "icepop.train", *overrides]
    log = args.out_dir / f"{name}.log"
    print(f"lora_vs_full: {name}: {' '.join(command[1:])}  (log {log})", flush=True)
    git = git_state()
    measured = run_process(command, log, run_dir / "metrics.jsonl")
    result = {"config": name, "command": command[1:], "run_dir": str(run_dir), "log": str(log), "git": git}
    result.update(measured)
    result.update(read_run(run_dir))
    if measured["trace"]:
        at = max(measured["trace"], key=lambda sample: sample[1])[0]
        result["trainer_peak_at_seconds"] = at
        result["trainer_peak_in_step"] = next(
            (i + 1 for i, seconds in enumerate(measured["row_seconds"]) if seconds >= at), None
        )
    if measured["returncode"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-60:]
        result["error_tail"] = tail
        print(f"lora_vs_full: {name} FAILED (exit {measured['returncode']}); log {log}:", flush=True)
        print("\n".join(tail), flush=True)
    else:
        print(
            f"lora_vs_full: {name} done in {measured['wall_seconds'] / 60:.1f} min; trainer peak RSS "
            f"{measured['trainer_peak_rss_gb']:.2f} GB",
            flush=True,
        )
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    full = next((r for r in results if r["config"] == "full"), None)
    header = (
        "config", "trainer peak RSS GB (sum)", "per rank GB", "ratio lora/full", "tree peak RSS GB",
        "step s", "train s", "sync s", "held-out acc", "reward first4/last4", "wall min",
    )  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        ratio = None
        if full is not None and full.get("trainer_peak_rss_gb"):
            ratio = r["trainer_peak_rss_gb"] / full["trainer_peak_rss_gb"]
        ranks = "/".join(f"{e['peak_rss_gb']:.2f}" for e in r.get("trainer_each", []))
        accuracy = " / ".join(f"{e['step']}: {fmt(e['accuracy_lenient'], '.1%')}" for e in r.get("eval", []))
        cells = (
            r["config"] + ("" if r["returncode"] == 0 else f" (FAILED {r['returncode']})"),
            fmt(r.get("trainer_peak_rss_gb"), ".2f"),
            ranks or "-",
            fmt(ratio, ".2f"),
            fmt(r.get("tree_peak_rss_gb"), ".2f"),
            fmt(r.get("step_s"), ".1f"),
            f"{fmt(r.get('train_s'), '.1f')} ({fmt(r.get('train_share'), '.0%')})",
            f"{fmt(r.get('sync_s'), '.2f')} ({fmt(r.get('sync_share'), '.0%')})",
            accuracy or "-",
            f"{fmt(r.get('reward_first4'), '.3f')} / {fmt(r.get('reward_last4'), '.3f')}",
            fmt(r["wall_seconds"] / 60, ".1f"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16, help="RL steps per configuration (train.steps)")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=("full", "lora"),
        default=["full", "lora"],
        help="configurations, in order",
    )
    parser.add_argument("--lora-lr", default="5e-4", help="trainer.lr of the LoRA run (full: 5e-5)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/lora_vs_full"), help="run dirs and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON results file")
    parser.add_argument(
        "overrides", nargs="*", help="icepop key=value overrides added to every configuration"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    results = []
    for name in args.runs:
        results.append(run_config(name, args))
        spec = {
            "workload": WORKLOAD,
            "steps": args.steps,
            "lora_rank": LORA_RANK,
            "lora_lr": args.lora_lr,
            "extra_overrides": args.overrides,
            "poll_seconds": POLL_SECONDS,
            "machine": {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / GB},
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(spec, indent=1))  # after each configuration: a failure keeps the rest
    print(table(results))
    print(f"lora_vs_full: wrote {args.out} ({(time.time() - started) / 60:.1f} min in all)")
    if any(r["returncode"] != 0 for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
