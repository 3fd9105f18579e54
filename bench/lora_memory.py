"""One trainer rank's peak memory and time on an RL batch, full fine-tuning against LoRA, each setting in a
fresh process (the peak resident set size, ru_maxrss, only grows within one).

The batch is bench/train_phase.py's: real chat prompts of the arithmetic task and random replies of
1..max_new_tokens tokens, here 24 rows (a rank's share of 8 prompts × 6 samples on 2 ranks) of SmolLM2-135M,
trained by one DeepSpeed ZeRO-2 rank (world size 1, so the whole optimizer state is on it) with the
preset's micro-batches of ≤ 4096 tokens. Each setting runs `train_rl` --steps times; printed: the peak
RSS after the build and after the steps, the median step seconds, and each against the first setting.

    python bench/lora_memory.py                                   # full, lora (icepop's defaults)
    python bench/lora_memory.py --settings full lora lora:heap full:gc lora:gc

A setting is `full` or `lora` (rank 16), with optional `:heap` (LoRA without icepop's mmap threshold:
glibc's default heap, see icepop.trainer.lora.fewer_heap_holes) and `:gc` (gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lora_memory.json"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure(setting: str, rows: int, steps: int) -> dict[str, float]:
    """Runs in the child process: build one rank, train `steps` times, report."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_phase import batch, one_rank

    import icepop.trainer.deepspeed as backend
    from icepop.algo import PolicyLossOptions
    from icepop.config import Config
    from icepop.ray.hosts import free_port
    from icepop.stages.setup import resolve_model

    kind, *options = setting.split(":")
    if "heap" in options:
        backend.fewer_heap_holes = lambda: None  # glibc's default allocator behaviour
    config = Config(stage="rlvr")
    config.model.path = "smollm2:135m-instruct"
    model_path = resolve_model(config)
    data = batch(model_path, rows, 6, 96, seed=0)
    trainer = backend.DeepSpeedTrainer(**one_rank(
        model_path, free_port(), lr=1e-5, zero_stage=2, micro_batch_tokens=4096, cpu_threads=1,
        gradient_checkpointing="gc" in options, lora={"rank": 16} if kind == "lora" else None,
    ))  # fmt: skip
    built = peak_gb()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_rl(data, PolicyLossOptions(), int(data.response_mask.sum()), rows)
        seconds.append(time.perf_counter() - start)
    trainer.close()
    return {"built_gb": built, "peak_gb": peak_gb(), "step_s": statistics.median(seconds),
            "tokens": int(data.attention_mask.sum())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["full", "lora"])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.steps)))
        return
    results = {}
    for setting in args.settings:
        command = [
            sys.executable,
            __file__,
            "--child",
            setting,
            "--rows",
            str(args.rows),
            "--steps",
            str(args.steps),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[setting] = json.loads(out.strip().splitlines()[-1])
    base = results[args.settings[0]]
    print(f"{'setting':<12} {'built GB':>9} {'peak GB':>8} {'÷':>5} {'step s':>7} {'÷':>5}")
    for setting, r in results.items():
        memory, seconds = r["peak_gb"] / base["peak_gb"], r["step_s"] / base["step_s"]
        print(f"{setting:<12} {r['built_gb']:>9.2f} {r['peak_gb']:>8.2f} {memory:>5.2f} "
              f"{r['step_s']:>7.1f} {seconds:>5.2f}")  # fmt: skip
    RESULTS.write_text(
        json.dumps({"rows": args.rows, "steps": args.steps, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
