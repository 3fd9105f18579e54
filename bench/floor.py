"""icepop's train phase against the plain-PyTorch floor of the same update, measured in the same run.

The floor: one process, the model in float32 from transformers, forward → log-probs of the reply
tokens → policy-gradient loss → backward → torch.optim.AdamW, on the same W1 batch (SmolLM2-135M,
8 prompts × 4 samples, replies of 1-32 tokens), micro-batched as icepop's model preset does it (all
rows in one forward) and with all the cores as torch threads. icepop: `DeepSpeedTrainer.train_rl` on
the same rows, as one rank with every core and no ZeRO (`model=smollm2-135m`'s layout) and as two
ZeRO-2 ranks of one thread each (the tiny default's layout; spawned processes over gloo, half the rows
each). The
icepop rank keeps freed memory (icepop.trainer.lora.keep_freed_memory), and that setting is
process-wide: the floor in the same process gets it too.

Each line: median seconds per update, the ratio to the floor, and the achieved FLOP/s against the
machine's float32 GEMM peak measured here with the same threads (a 2048×576×1536 matmul, the shape of
SmolLM2's MLP) — a CPU's MFU. FLOPs per update: 6 × parameters × computed tokens (forward 2, backward
4; the tied embedding counted once, as the output projection it also is, at the positions from the
first reply token on, where both updates run it; attention's n² part left out).

    python bench/floor.py                       # SmolLM2-135M, W1
    python bench/floor.py --model tiny:dense --repeats 3
    python bench/floor.py --one-rank --json floor.json       # what bench/vs_trl.py runs beside TRL
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch
from train_phase import batch, one_rank
from transformers import AutoModelForCausalLM

from icepop.algo import PolicyLossOptions
from icepop.config import Config
from icepop.ray.hosts import free_port
from icepop.stages.batch import split_rows
from icepop.stages.setup import resolve_model
from icepop.trainer.deepspeed import DeepSpeedTrainer
from icepop.trainer.inputs import first_label
from icepop.types import RLBatch

PRESET = {"micro_batch_size": 1, "micro_batch_tokens": 4096, "zero_stage": 0, "lr": 1e-6}
"""model=smollm2-135m's trainer settings (conf/model/smollm2-135m.yaml: one rank, no ZeRO); lr small:
many updates run."""


def gemm_peak(threads: int, repeats: int = 20) -> float:
    """Float32 FLOP/s of a 2048×576 @ 576×1536 matmul with `threads` torch threads (best of repeats)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 2048 * 576 * 1536 / best


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_update(model: Any, optimizer: torch.optim.Optimizer, data: RLBatch) -> None:
    """One policy-gradient update in plain PyTorch: Σ −A·ℓ over reply tokens / their count, AdamW; the
    output head only from the first reply position on (as TRL's logits_to_keep, and icepop's update)."""
    first = first_label(data.response_mask)
    mask = data.response_mask[:, first:]
    logits = model(
        input_ids=data.input_ids[:, :-1], attention_mask=data.attention_mask[:, :-1],
        logits_to_keep=mask.shape[1],
    ).logits  # fmt: skip
    labels = data.input_ids[:, 1 + first :, None]
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, labels).squeeze(-1)
    loss = -(data.advantages[:, first:] * logprobs * mask).sum() / mask.sum()  # token advantages
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def icepop_rank(trainer: DeepSpeedTrainer, data: RLBatch, global_tokens: int, rows: int) -> None:
    trainer.train_rl(data, PolicyLossOptions(), global_tokens, rows)


def two_ranks(rank: int, world: int, model_path: str, port: int, rows: list[int], repeats: int,
              results: Any) -> None:  # fmt: skip
    """A default ZeRO-2 rank of one thread on its half of the batch; rank 0 reports the medians."""
    torch.set_num_threads(1)
    data = batch(model_path, len(rows), 4, 32, seed=0)
    tokens, count = int(data.response_mask.sum()), data.input_ids.shape[0]
    shard = split_rows(data, world)[rank]  # the RL stage's shards
    trainer = DeepSpeedTrainer(**one_rank(
        model_path, port, **(PRESET | {"zero_stage": 2}), rank=rank, world_size=world, cpu_threads=1
    ))  # fmt: skip
    seconds = [_timed(lambda: icepop_rank(trainer, shard, tokens, count)) for _ in range(repeats + 1)][1:]
    trainer.close()
    if rank == 0:
        results.put(statistics.median(seconds))


def spawned_two_ranks(model_path: str, rows: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=two_ranks, args=(r, 2, model_path, port, list(range(rows)), repeats, results))
             for r in range(2)]  # fmt: skip
    for proc in procs:
        proc.start()
    median = results.get(timeout=1800)
    for proc in procs:
        proc.join()
    return median


def in_process(
    model_path: str, data: RLBatch, threads: int, repeats: int
) -> tuple[dict[str, float], tuple[int, int]]:
    """Median seconds of the floor and of one icepop rank with every thread, interleaved so that drift
    hits both alike (the first round warms up); and the model's parameter count."""
    tokens, rows = int(data.response_mask.sum()), data.input_ids.shape[0]
    trainer = DeepSpeedTrainer(**one_rank(model_path, free_port(), **PRESET, cpu_threads=threads))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRESET["lr"], weight_decay=0.0)
    updates = {
        "plain PyTorch (the floor)": lambda: plain_update(model, optimizer, data),
        f"icepop, 1 rank × {threads} threads": lambda: icepop_rank(trainer, data, tokens, rows),
    }
    seconds: dict[str, list[float]] = {name: [] for name in updates}
    for repeat in range(repeats + 1):
        for name, update in updates.items():
            took = _timed(update)
            if repeat:
                seconds[name].append(took)
    trainer.close()
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    return {name: statistics.median(s) for name, s in seconds.items()}, (params, head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m-instruct")
    parser.add_argument("--rows", type=int, default=32, help="8 prompts × 4 samples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--one-rank", action="store_true", help="leave out the two-rank layout")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    config = Config(stage="rlvr")
    config.model.path = args.model
    model_path = resolve_model(config)
    data = batch(model_path, args.rows, 4, 32, seed=0)
    computed = data.input_ids.shape[0] * (data.input_ids.shape[1] - 1)
    headed = data.input_ids.shape[0] * (data.input_ids.shape[1] - 1 - first_label(data.response_mask))
    peak = gemm_peak(args.threads)
    medians, (params, head) = in_process(model_path, data, args.threads, args.repeats)
    if not args.one_rank:
        medians["icepop, 2 ZeRO-2 ranks × 1 thread"] = spawned_two_ranks(model_path, args.rows, args.repeats)
    flops = 6 * (params - head) * computed + 6 * head * headed
    lengths = data.attention_mask.sum(-1)
    print(
        f"\n{args.model}: {params / 1e6:.1f}M parameters, {args.rows} rows of {int(lengths.min())}-"
        f"{int(lengths.max())} tokens, {computed} computed input tokens ({headed} through the output "
        f"head), {flops / 1e12:.2f} TFLOP an update"
    )
    print(f"float32 GEMM peak, {args.threads} threads: {peak / 1e9:.1f} GFLOP/s "
          f"→ the update's compute alone: {flops / peak:.2f} s")  # fmt: skip
    floor = medians["plain PyTorch (the floor)"]
    print(f"{'update':<46} {'s':>7} {'÷ floor':>8} {'GFLOP/s':>8} {'MFU':>6}")
    for name, median in medians.items():
        print(f"{name:<46} {median:>7.2f} {median / floor:>8.2f} {flops / median / 1e9:>8.1f} "
              f"{flops / median / peak:>6.1%}")  # fmt: skip
    if args.json:
        record = {"model": args.model, "threads": args.threads, "flops": flops, "gemm_peak_flops": peak}
        with open(args.json, "w") as out:
            json.dump(record | {"floor_s": floor, "updates_s": medians}, out, indent=2)


if __name__ == "__main__":
    main()
