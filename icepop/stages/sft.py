"""The SFT stage: chat data, loss on assistant tokens only, on the same DeepSpeed trainer ranks.

Used alone (`+recipe=sft`), as the first stage of the pipeline, and as the cached warm-up that gives
RLVR on the tiny models a policy with some signal. The loop is short: a batch of conversations,
right-padded (no attention across conversations; `sft.group_by_length` batches similar lengths to cut
the padding, our alternative to packing), split across ranks with the global token count so the loss
is the exact token mean of the whole batch, one optimizer step, a log line; the validation loss on
held-out conversations before, every `sft.eval_every` steps, and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch

from icepop.config import Config
from icepop.errors import input_errors
from icepop.ray import cluster
from icepop.ray.actors import gather, wait_ready
from icepop.ray.workers import TrainerGroup
from icepop.stages import setup
from icepop.stages.batch import concat_rows, split_rows
from icepop.stages.summary import Summary, write_summary
from icepop.tracking import Tracker


def validation_loss(trainer: TrainerGroup, batch: Any) -> float:
    """Token-mean cross-entropy on the assistant tokens of a held-out batch (no gradient)."""
    blocks = gather(trainer.async_logprobs(batch.input_ids, batch.attention_mask, 1.0))
    logprobs = concat_rows(blocks, batch.loss_mask.shape[1])
    return float(-torch.where(batch.loss_mask, logprobs, 0.0).sum() / batch.loss_mask.sum())


def _log_eval(tracker: Tracker, step: int, loss: float) -> None:
    tracker.log_eval(step, {"validation_loss": loss}, f"validation loss {loss:.4f}")


def sft_examples(config: Config, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """(training, validation) conversations of data.source; the skipped rows are logged."""
    from icepop.data.prompts import split_holdout
    from icepop.data.sft import load_sft_examples
    from icepop.data.tasks import is_generated

    max_tokens = config.data.max_prompt_tokens + config.rollout.response_tokens()
    source, seed = config.data.source, config.run.seed
    data = config.data
    where = data.task_options if is_generated(source) else {"split": data.split, "subset": data.subset}
    from icepop.envs import episode_demonstration

    demonstrated = episode_demonstration(config.rollout.environment, config.rollout.agent)
    if is_generated(source) and demonstrated is not None:  # the episodes' exchange, where they have one
        where = {**where, "conversation": demonstrated[1]}
    dataset = load_sft_examples(
        source, tokenizer, count=config.sft.examples, seed=seed, max_tokens=max_tokens, **where
    )
    print(dataset.describe(source))
    train, held_out = split_holdout(dataset.examples, config.sft.eval_size, seed)
    if not held_out:
        raise ValueError(f"data.source={source!r} has {len(dataset.examples)} usable conversations; need 2+")
    return train, held_out


def run_sft(config: Config, run_dir: Path, model_path: str | None = None) -> Summary:
    """Train for `sft.steps` steps; returns the summary (final checkpoint, validation loss before/after)."""
    from icepop.data.prompts import ShuffledBatches
    from icepop.data.sft import LengthGroupedBatches, collate_sft

    started, sft = time.perf_counter(), config.sft
    model_path = model_path or setup.resolve_model(config)
    tokenizer = setup.load_tokenizer(model_path, config.data)
    with input_errors(f"data.source={config.data.source!r}"):  # before anything starts
        train, held_out = sft_examples(config, tokenizer)
    grouping = LengthGroupedBatches if sft.group_by_length else ShuffledBatches
    batches = grouping(train, min(sft.batch_size, len(train)), config.run.seed)
    validation = collate_sft(held_out, tokenizer.pad_token_id)
    print(
        f"icepop sft: model {model_path}; {sft.steps} steps × {sft.batch_size} conversations over "
        f"{config.trainer.ranks} rank(s), {config.derived().sft_micro_batches or 'token-budget'} "
        f"micro-batch(es) per rank; "
        f"{len(train)} training and {len(held_out)} validation conversations"
    )
    final = run_dir / "checkpoints" / f"step-{sft.steps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with cluster.session(config):
        placement = cluster.reserve(config, rollout=False)
        trainer = TrainerGroup(config, model_path, placement, "sft")
        wait_ready(trainer)
        with Tracker(config, run_dir, sft.steps, "sft") as tracker:
            before = validation_loss(trainer, validation)
            _log_eval(tracker, 0, before)
            for step in range(1, sft.steps + 1):
                batch = collate_sft(batches.next_batch(), tokenizer.pad_token_id)
                shards = split_rows(batch, trainer.ranks)
                per_rank = gather(
                    trainer.async_train_sft(shards, global_token_count=int(batch.loss_mask.sum()))
                )
                metrics = {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}
                tracker.log(step, metrics, status=f"loss {metrics['sft/loss']:.3f}")
                if sft.eval_every and step % sft.eval_every == 0 and step != sft.steps:
                    _log_eval(tracker, step, validation_loss(trainer, validation))
            after = validation_loss(trainer, validation)
            _log_eval(tracker, sft.steps, after)
        ray.get(trainer.async_call("save", str(final)))
        ray.get(trainer.async_call("close"))
    seconds, measure = time.perf_counter() - started, "validation loss (lower is better)"
    return write_summary(run_dir, "sft", sft.steps, seconds, measure, before, after, str(final))
