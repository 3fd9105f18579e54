"""The trainer's share of an RL step on its own: one rank's `train_rl` (forward, backward, AdamW) on a
realistic RLVR batch, under several micro-batch settings measured side by side in the same process.

The batch: the model's real chat prompts of the arithmetic task plus random responses whose lengths are
spread over [1, max_new_tokens] (a GRPO batch: some replies stop early, some hit the limit), in the
order the engine returns them. The first setting is the baseline; each line prints its median
seconds per `train_rl` and the ratio to the baseline, plus the tokens the forwards computed (padding
included) against the real ones.

    python bench/train_phase.py                          # SmolLM2-135M, 16 rows (32 / 2 ranks), 32 tokens
    python bench/train_phase.py --model tiny:dense --rows 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from icepop.algo import PolicyLossOptions
from icepop.config import Config
from icepop.data.prompts import load_prompts
from icepop.ray.hosts import free_port
from icepop.stages.batch import rl_batch
from icepop.stages.setup import load_tokenizer, resolve_model
from icepop.trainer.deepspeed import DeepSpeedTrainer
from icepop.trainer.inputs import micro_batch_rows
from icepop.trainer.settings import trainer_settings
from icepop.types import Completion


def one_rank(model_path: str, port: int, **changes: Any) -> dict[str, Any]:
    """The arguments of a lone trainer rank: the config schema's (icepop.trainer.settings) with `changes`."""
    settings = trainer_settings(Config(stage="rlvr"), model_path, "rl")
    return settings | {"rank": 0, "world_size": 1, "master_addr": "127.0.0.1", "master_port": port} | changes


def batch(model_path: str, rows: int, group: int, max_new_tokens: int, seed: int) -> Any:
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompts("arithmetic", tokenizer, 256, count=rows // group, seed=seed).prompts
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in prompts:
        lengths = torch.randint(1, max_new_tokens + 1, (group,), generator=g).tolist()
        replies = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in lengths]
        groups.append([Completion(ids, [-1.0] * len(ids), "stop") for ids in replies])
    advantages = torch.randn(rows, generator=g)
    return rl_batch(prompts, groups, advantages, tokenizer.pad_token_id)


def computed_tokens(lengths: list[int], size: int, budget: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g.tolist()) for g in micro_batch_rows(lengths, size, budget))


def parse(setting: str) -> tuple[int, int]:
    """(micro_batch_size, micro_batch_tokens) of "rows=N" or "tokens=N"."""
    kind, value = setting.split("=")
    return (int(value), 0) if kind == "rows" else (1, int(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m-instruct")
    parser.add_argument("--rows", type=int, default=16, help="rows on this rank")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--settings", nargs="+", default=["rows=4", "rows=8", "rows=16", "tokens=1024", "tokens=2048"],
        help="micro-batch settings: rows=N (trainer.micro_batch_size) or tokens=N (micro_batch_tokens)",
    )  # fmt: skip
    args = parser.parse_args()
    config = Config(stage="rlvr")
    config.model.path = args.model
    model_path = resolve_model(config)
    data = batch(model_path, args.rows, args.group, args.max_new_tokens, seed=0)
    lengths = data.attention_mask.sum(-1).tolist()
    port = free_port()
    trainer = DeepSpeedTrainer(**one_rank(model_path, port, lr=1e-5, micro_batch_size=1, cpu_threads=None))
    options, counts = PolicyLossOptions(), (int(data.response_mask.sum()), args.rows)
    print(
        f"{args.model}: {args.rows} rows, lengths {min(lengths)}-{max(lengths)}, {sum(lengths)} real "
        f"tokens, {torch.get_num_threads()} threads"
    )
    trainer.train_rl(data, options, *counts)  # warm-up
    results: dict[str, list[float]] = {s: [] for s in args.settings}
    for _ in range(args.repeats):  # interleaved, so drift hits every setting alike
        for setting in args.settings:
            trainer.micro_batch_size, trainer.micro_batch_tokens = parse(setting)
            start = time.perf_counter()
            trainer.train_rl(data, options, *counts)
            results[setting].append(time.perf_counter() - start)
    base = statistics.median(results[args.settings[0]])
    print(f"{'setting':<14} {'s/train_rl':>10} {'ratio':>6} {'computed tokens':>16}")
    for setting, seconds in results.items():
        median, computed = statistics.median(seconds), computed_tokens(lengths, *parse(setting))
        print(f"{setting:<14} {median:>10.3f} {median / base:>6.2f} {computed:>16}")
    trainer.close()


if __name__ == "__main__":
    main()
