"""`python -m icepop.smoke`: the first thing to run on a new machine, a GPU one above all. A few short
RL runs of the tiny model (no SFT warm-up, 2 steps each, a reward that varies in every group so that
every step really updates the weights) take the paths a real run takes: engines starting, trainer
ranks forming their process group, the weight group, a weight sync checked by the probe after every
update. It ends with one table, a row per run: pass or fail (with the run's last error line), how long
the workers took to start, how the weights moved, the probe's largest |Δ log p|, step time, tok/s.

On a machine with GPUs (`--cpu`: the same runs on CPU, as the tests do, the GPUs hidden from them):
  1. "1 engine + 1 rank": cluster=gpu, a bfloat16 engine, weights broadcast over NCCL (2 GPUs);
  2. "float32": the same with a float32 engine, held to the float32 probe limit (exact attention, 2 GPUs);
  3. "colocated": trainer rank and engine in one process on one GPU, vLLM sleep mode (1 GPU);
  4. "ZeRO-3, 2 ranks": two ranks gathering parameters, one engine (3 GPUs).
A run that needs more GPUs than the machine has is listed as skipped. Exit status 0 when every run
that ran passed. Each run's folder stays under `--dir` for a closer look. A host whose torch cannot use
the GPUs its NVIDIA driver shows (a driver older than torch's CUDA) is refused before any run starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from icepop.types import Prompt

STEPS = 2
COMMON = (
    "+recipe=rlvr", "model=tiny-dense", "model.sft_warmup=false", "reward.function=icepop.smoke:shorter",
    f"train.steps={STEPS}", "train.eval_every=0", "train.checkpoint_every=0", "data.size=64",
    "data.eval_size=8", "algo.prompts_per_step=4", "algo.samples_per_prompt=4", "rollout.max_new_tokens=16",
    "reward.workers=1",
)  # fmt: skip
"""Overrides of every smoke run: `python -m icepop.train` with these and the case's own."""
TIMEOUT_SECONDS = 600


def shorter(prompt: Prompt, response_text: str) -> float:
    """The smoke runs' reward, 1 / (1 + characters): it differs within every group whatever the untrained
    model answers, so every step has non-zero advantages and changes the weights the probe checks."""
    return 1.0 / (1.0 + len(response_text))


@dataclass(frozen=True)
class Case:
    key: str
    """Its name on the command line (--only) and its run folder's."""
    name: str
    gpus: int
    """GPUs the case needs on a GPU machine."""
    overrides: tuple[str, ...]
    engine_dtype: str = "bfloat16"
    """rollout.dtype; the trainer keeps the tiny model's float32."""


CASES = (
    Case("disaggregated", "1 engine + 1 rank", 2, ("rollout.engines=1", "trainer.ranks=1")),
    Case("float32", "float32 engine + 1 rank", 2, ("rollout.engines=1", "trainer.ranks=1"), "float32"),
    Case(
        "colocated",
        "colocated, 1 rank",
        1,
        ("cluster.placement=colocated", "rollout.engines=1", "trainer.ranks=1"),
    ),
    Case(
        "zero3",
        "ZeRO-3, 2 ranks + 1 engine",
        3,
        ("rollout.engines=1", "trainer.ranks=2", "trainer.zero_stage=3"),
    ),
)


@dataclass
class Outcome:
    """One row of the table."""

    case: str
    result: str
    """"pass", "FAIL: <the run's last error line>" or "skipped: <why>"."""
    ready: str = ""
    sync: str = ""
    probe: str = ""
    step_seconds: str = ""
    tokens_per_second: str = ""


def command(case: Case, gpu: bool, run_dir: Path) -> list[str]:
    """The `python -m icepop.train` command line of one case."""
    cluster = ("cluster=gpu",) if gpu else ()
    dtype = f"rollout.dtype={case.engine_dtype}"
    head = [sys.executable, "-m", "icepop.train", *COMMON, dtype]
    return [*head, *cluster, *case.overrides, f"run.dir={run_dir}"]


def child_env(gpu: bool) -> dict[str, str]:
    """The environment of a case's run: this one's, with every GPU hidden from a CPU run (`--cpu`): Ray
    then counts none, so a CPU run on a GPU host is not refused for reserving none."""
    return dict(os.environ) if gpu else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def outcome(case: Case, returncode: int, output: str, run_dir: Path) -> Outcome:
    """What a finished run shows: its start-up line ("workers ready in 12.3 s; weights by ..."), its
    metrics (the last step's time and tok/s, the largest probe difference over the steps)."""
    ready_line = next((line for line in output.splitlines() if "workers ready in" in line), "")
    ready, _, sync = ready_line.partition("workers ready in ")[2].partition("; ")
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    row = Outcome(case.name, "pass", ready.strip(), sync.strip())
    if rows:
        row.probe = f"{max(r['sync/probe_abs_logp_diff'] for r in rows):.2g}"
        row.step_seconds = f"{rows[-1]['perf/step_seconds']:.2f}"
        row.tokens_per_second = f"{rows[-1]['perf/rollout_tokens_per_second']:.0f}"
    if returncode != 0 or len(rows) < STEPS:
        errors = [line for line in output.splitlines() if line.strip()]
        row.result = f"FAIL: {errors[-1].strip() if errors else f'exit status {returncode}'}"
    return row


def run_case(case: Case, gpu: bool, gpus: int, base: Path) -> Outcome:
    if gpu and case.gpus > gpus:
        return Outcome(case.name, f"skipped: needs {case.gpus} GPUs, {gpus} here")
    run_dir = base / case.key
    print(f"icepop smoke: {case.name} ...", flush=True)
    try:
        done = subprocess.run(
            command(case, gpu, run_dir),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            env=child_env(gpu),
        )
    except subprocess.TimeoutExpired as timeout:
        output = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else timeout.stdout or ""
        return outcome(case, -1, output + f"\ntimed out after {TIMEOUT_SECONDS} s", run_dir)
    return outcome(case, done.returncode, done.stdout + done.stderr, run_dir)


def table(rows: list[Outcome], title: str) -> str:
    """The rows as one aligned text table."""
    header = ("run", "result", "workers ready (s)", "weight sync", "probe max |Δ log p|", "step (s)", "tok/s")
    cells = [header] + [
        (r.case, r.result, r.ready.removesuffix(" s"), r.sync, r.probe, r.step_seconds, r.tokens_per_second)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)) for line in cells
    ]
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icepop.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where GPUs are visible")
    parser.add_argument("--only", choices=[c.key for c in CASES], action="append", help="these runs only")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the runs' folders go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    import torch

    from icepop.preflight import check_driver

    problem = None if args.cpu else check_driver()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    gpus = 0 if args.cpu else torch.cuda.device_count()
    base = args.dir or Path(tempfile.mkdtemp(prefix="icepop-smoke-"))
    cases = [case for case in CASES if not args.only or case.key in args.only]
    rows = [run_case(case, gpus > 0, gpus, base) for case in cases]
    device = f"{gpus} GPU(s)" if gpus else "CPU"
    print(
        table(
            rows, f"icepop smoke on {device} ({STEPS} RL steps of the tiny model per run; folders in {base})"
        )
    )
    return 0 if all(not r.result.startswith("FAIL") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
