"""The reward-model stage (`+recipe=rm`): Bradley–Terry training on preference pairs with the same
DeepSpeed trainer ranks, built as a sequence classifier (model_kind "reward").

The loop mirrors SFT's: a batch of pairs split across ranks with the global pair count (so the loss is
the exact mean over the whole batch), one optimizer step, a log line; held-out pairwise accuracy
before, every `rm.eval_every` steps, and after. The checkpoint it writes is what `reward.model_path`
of the RLHF stage loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch

from icepop.algo import pairwise_accuracy
from icepop.config import Config
from icepop.errors import input_errors
from icepop.ray import cluster
from icepop.ray.actors import gather, wait_ready
from icepop.ray.workers import TrainerGroup
from icepop.stages import setup, warmup
from icepop.stages.summary import Summary, write_summary
from icepop.tracking import Tracker
from icepop.types import blocks


def held_out_accuracy(trainer: TrainerGroup, pairs: list[Any], pad_id: int) -> float:
    """Fraction of held-out pairs whose chosen reply the reward model scores strictly higher."""
    from icepop.data.preferences import collate_pairs

    batch = collate_pairs(pairs, pad_id)
    scores = torch.cat(gather(trainer.async_scores(batch.input_ids, batch.attention_mask)))
    chosen, rejected = scores.view(2, -1)
    return float(pairwise_accuracy(chosen, rejected))


def _log_eval(tracker: Tracker, step: int, accuracy: float) -> None:
    tracker.log_eval(step, {"pairwise_accuracy": accuracy}, f"held-out pairwise accuracy {accuracy:.3f}")


def preference_pairs(config: Config, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """Tokenized (train, held-out) preference pairs of rm.source; the skipped rows are logged."""
    from icepop.data.preferences import load_preference_pairs, tokenize_pairs
    from icepop.data.prompts import split_holdout

    rm = config.rm
    loaded = load_preference_pairs(rm.source, count=rm.pairs, seed=config.run.seed)
    max_tokens = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    pairs, overlong = tokenize_pairs(loaded.pairs, tokenizer, max_tokens)
    print(f"{loaded.describe(rm.source)}; {len(overlong)} longer than {max_tokens} tokens dropped")
    train, held_out = split_holdout(pairs, rm.eval_size, config.run.seed)
    if len(train) < config.trainer.ranks or not held_out:
        raise ValueError(
            f"rm.source={rm.source!r} left {len(pairs)} usable pairs: too few to hold {rm.eval_size} out "
            f"(rm.eval_size) and give each of the {config.trainer.ranks} trainer ranks at least one"
        )
    return train, held_out


def run_rm(config: Config, run_dir: Path) -> Summary:
    """Train a reward model for `rm.steps` steps; returns its summary (checkpoint, accuracy before/after)."""
    from icepop.data.preferences import collate_pairs
    from icepop.data.prompts import ShuffledBatches

    started, rm = time.perf_counter(), config.rm
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    with input_errors(f"rm.source={config.rm.source!r}"):  # before any warm-up, engine or rank starts
        train, held_out = preference_pairs(config, tokenizer)
    model_path = warmup.policy_path(config, run_dir)
    batch_size = max(config.trainer.ranks, min(rm.batch_size, len(train)))
    batches = ShuffledBatches(train, batch_size, config.run.seed)
    print(f"icepop rm: model {model_path}; {len(train)} training pairs, {len(held_out)} held out")
    final, pad = run_dir / "checkpoints" / f"step-{rm.steps}", tokenizer.pad_token_id
    with cluster.session(config):
        placement = cluster.reserve(config, rollout=False)
        trainer = TrainerGroup(config, model_path, placement, "rm")
        wait_ready(trainer)
        with Tracker(config, run_dir, rm.steps, "rm") as tracker:
            before = held_out_accuracy(trainer, held_out, pad)
            _log_eval(tracker, 0, before)
            for step in range(1, rm.steps + 1):
                batch = batches.next_batch()
                shards = [collate_pairs(batch[rows], pad) for rows in blocks(len(batch), trainer.ranks)]
                metrics = gather(trainer.async_train_rm(shards, global_pair_count=len(batch)))[0]
                tracker.log(step, metrics, status=f"loss {metrics['rm/loss']:.3f}")
                if rm.eval_every and step % rm.eval_every == 0 and step != rm.steps:
                    _log_eval(tracker, step, held_out_accuracy(trainer, held_out, pad))
            after = held_out_accuracy(trainer, held_out, pad)
            _log_eval(tracker, rm.steps, after)
        ray.get(trainer.async_call("save", str(final)))
        ray.get(trainer.async_call("close"))
    seconds = time.perf_counter() - started
    return write_summary(
        run_dir, "rm", rm.steps, seconds, "held-out pairwise accuracy", before, after, str(final)
    )
