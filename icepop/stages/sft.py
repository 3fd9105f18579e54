"""The SFT stage: chat data, loss on assistant tokens only, on the same DeepSpeed trainer ranks.

Used alone (`+recipe=sft`) and as the cached warm-up that gives RLVR on the tiny models a policy with
some signal. The loop is short: a batch of conversations, split across ranks with the global token
count so the loss is the exact token mean of the whole batch, one optimizer step, a log line.
"""

from __future__ import annotations

from pathlib import Path

import ray

from icepop.config import Config, derived
from icepop.ray import cluster
from icepop.ray.workers import TrainerGroup
from icepop.stages import setup
from icepop.stages.batch import split_rows
from icepop.tracking import Tracker


def run_sft(config: Config, run_dir: Path, model_path: str | None = None) -> Path:
    """Train for `sft.steps` steps; returns the final Hugging Face checkpoint directory."""
    from icepop.data.prompts import ShuffledBatches
    from icepop.data.sft import collate_sft, load_sft_examples

    model_path = model_path or setup.resolve_model(config, run_dir)
    tokenizer = setup.load_tokenizer(model_path)
    sft = config.sft
    print(
        f"icepop sft: model {model_path}; {sft.steps} steps × {sft.batch_size} conversations over "
        f"{config.trainer.ranks} rank(s), {derived(config).sft_micro_batches} micro-batch(es) per rank"
    )
    dataset = load_sft_examples(config.data.source, tokenizer, count=sft.examples, seed=config.run.seed)
    batches = ShuffledBatches(dataset.examples, sft.batch_size, config.run.seed)
    final = run_dir / "checkpoints" / f"step-{sft.steps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster.start(config)
    try:
        placement = cluster.reserve(config, rollout=False)
        trainer = TrainerGroup(
            config,
            model_path,
            placement,
            total_steps=sft.steps,
            lr=sft.lr,
            warmup_steps=sft.warmup_steps,
            temperature=1.0,
        )
        with Tracker(config, run_dir, sft.steps, "sft") as tracker:
            for step in range(1, sft.steps + 1):
                batch = collate_sft(batches.next_batch(), tokenizer.pad_token_id)
                shards = split_rows(batch, trainer.ranks)
                per_rank = ray.get(
                    trainer.async_train_sft(shards, global_token_count=int(batch.loss_mask.sum()))
                )
                metrics = {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}
                tracker.log(step, metrics, status=f"loss {metrics['sft/loss']:.3f}")
        ray.get(trainer.async_call("save", str(final)))
        ray.get(trainer.async_call("close"))
    finally:
        cluster.shutdown()
    return final
