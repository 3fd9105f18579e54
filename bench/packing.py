"""Padding-free packed micro-batches (trainer.packing) against padded ones: one rank's `train_rl`
(forward, backward, AdamW) on the same batch, in the same process, settings interleaved.

Two workloads, each printed with its padded baseline measured in the same run:
  W1         SmolLM2-135M, 8 prompts × 4 samples, replies of 1-32 tokens (uniform), arithmetic prompts;
  long-tail  the same model, 8 × 4, reasoning-gym (gsm_symbolic) prompts, reply lengths long-tailed
             (log-normal, median 40, clipped to 1-256: a few replies hit the limit).
Replies are random tokens of the drawn lengths (the train phase's cost depends on the lengths only;
generating 256-token replies on a CPU would take longer than the measurement).

Per setting: median seconds per `train_rl`, the ratio to the first (padded) setting, and the padding
efficiency = real tokens ÷ computed tokens, where real tokens are the inputs that carry a label
(n − 1 per row of n tokens) and computed tokens are those the forwards ran (padding included).

    python bench/packing.py                      # both workloads, SmolLM2-135M
    python bench/packing.py --model tiny:dense --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_phase import one_rank

from icepop.algo import PolicyLossOptions
from icepop.config import Config
from icepop.data.prompts import load_prompts
from icepop.ray.hosts import free_port
from icepop.stages.batch import rl_batch
from icepop.stages.setup import load_tokenizer, resolve_model
from icepop.trainer.deepspeed import DeepSpeedTrainer
from icepop.trainer.inputs import micro_batch_rows
from icepop.types import Completion, RLBatch

SETTINGS = (
    "padded rows=8",
    "padded tokens=2048",
    "packed rows=8",
    "packed tokens=2048",
    "packed tokens=1024",
)
"""The first is the baseline (the default config: 8 rows per micro-batch, padded)."""
WORKLOADS = {  # prompt source, reply lengths
    "W1": ("arithmetic", "uniform", 32),
    "long-tail": ("reasoning_gym:gsm_symbolic", "lognormal", 256),
}


def reply_lengths(kind: str, limit: int, count: int, g: torch.Generator) -> list[int]:
    """`count` reply lengths in [1, limit]: uniform, or log-normal (median 40, σ = 1) clipped."""
    if kind == "uniform":
        return torch.randint(1, limit + 1, (count,), generator=g).tolist()
    drawn = torch.exp(torch.log(torch.tensor(40.0)) + torch.randn(count, generator=g))
    return drawn.round().clamp(1, limit).long().tolist()


def workload(model_path: str, name: str, prompts: int, group: int, seed: int) -> RLBatch:
    source, kind, limit = WORKLOADS[name]
    tokenizer = load_tokenizer(model_path)
    chosen = load_prompts(source, tokenizer, 512, count=prompts, seed=seed).prompts[:prompts]
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in chosen:
        replies = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in reply_lengths(
            kind, limit, group, g)]  # fmt: skip
        groups.append([Completion(ids, [-1.0] * len(ids), "stop") for ids in replies])
    return rl_batch(chosen, groups, torch.randn(len(chosen) * group, generator=g), tokenizer.pad_token_id)


def parse(setting: str) -> tuple[bool, int, int]:
    """(packing, micro_batch_size, micro_batch_tokens) of "padded|packed rows=N|tokens=N"."""
    mode, budget = setting.split()
    kind, value = budget.split("=")
    return mode == "packed", *((int(value), 0) if kind == "rows" else (1, int(value)))


def computed_tokens(lengths: list[int], packing: bool, size: int, budget: int) -> int:
    """Tokens the forwards of one `train_rl` run: per micro-batch rows × (longest − 1) padded, Σ of
    max(n − 1, 1) packed (icepop.trainer.packing.token_logprobs)."""
    total = 0
    for group in micro_batch_rows(lengths, size, budget, packing):
        inputs = [max(lengths[r] - 1, 1) for r in group.tolist()]
        total += sum(inputs) if packing else len(inputs) * max(inputs)
    return total


def measure(trainer: DeepSpeedTrainer, data: RLBatch, settings: list[str], repeats: int) -> dict[str, float]:
    """Median seconds per `train_rl` of each setting, interleaved so that drift hits all alike."""
    options, counts = PolicyLossOptions(), (int(data.response_mask.sum()), data.input_ids.shape[0])
    results: dict[str, list[float]] = {s: [] for s in settings}
    for repeat in range(repeats + 1):  # the first round warms up every setting
        for setting in settings:
            trainer.packing, trainer.micro_batch_size, trainer.micro_batch_tokens = parse(setting)
            start = time.perf_counter()
            trainer.train_rl(data, options, *counts)
            if repeat:
                results[setting].append(time.perf_counter() - start)
    return {setting: statistics.median(seconds) for setting, seconds in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m-instruct")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help='e.g. "packed tokens=2048"')
    args = parser.parse_args()
    config = Config(stage="rlvr")
    config.model.path = args.model
    model_path = resolve_model(config)
    trainer = DeepSpeedTrainer(**one_rank(
        model_path, free_port(), lr=1e-6, packing=True, cpu_threads=args.threads
    ))  # fmt: skip
    for name in args.workloads:
        data = workload(model_path, name, args.prompts, args.group, seed=0)
        lengths = data.attention_mask.sum(-1).tolist()
        real = sum(max(n - 1, 1) for n in lengths)
        print(
            f"\n{name}: {args.model}, {len(lengths)} rows of {min(lengths)}-{max(lengths)} tokens (median "
            f"{statistics.median(lengths):.0f}), {real} real input tokens, {torch.get_num_threads()} threads"
        )
        seconds = measure(trainer, data, args.settings, args.repeats)
        base = seconds[args.settings[0]]
        print(f"{'setting':<20} {'s/train_rl':>10} {'ratio':>6} {'computed':>9} {'efficiency':>10}")
        for setting, median in seconds.items():
            computed = computed_tokens(lengths, *parse(setting))
            print(
                f"{setting:<20} {median:>10.3f} {median / base:>6.2f} {computed:>9} {real / computed:>10.1%}"
            )
    trainer.close()


if __name__ == "__main__":
    main()
