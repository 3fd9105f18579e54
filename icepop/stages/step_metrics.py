"""What an RL step logs beyond the trainer's own metrics: whole-batch mismatch and mask statistics,
reward statistics, and the ranks' means. Plain functions of the step's tensors and metric dicts."""

from __future__ import annotations

import torch

from icepop.algo import PolicyLossOptions, correction_metrics, log_ratio, mismatch_metrics
from icepop.types import RLBatch


def mismatch_statistics(batch: RLBatch, options: PolicyLossOptions) -> dict[str, float]:
    """Train/inference mismatch and the correction's mask fractions over every token of the batch."""
    old, rollout, mask = batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
    assert old is not None
    corr = options.correction_weights(old, rollout, mask)
    stats = {
        **mismatch_metrics(old, rollout, mask),
        **correction_metrics(corr, log_ratio(old, rollout, mask), mask),
    }
    return {key: float(value) for key, value in stats.items()}


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Trainer metrics averaged over ranks and updates (every rank holds the same number of rows)."""
    return {key: sum(m[key] for m in per_rank) / len(per_rank) for key in per_rank[0]}


def reward_metrics(
    rewards: torch.Tensor, group_ids: torch.Tensor, stats: dict[str, float]
) -> dict[str, float]:
    """Reward mean/std, and the fraction of groups whose rewards are all equal (no learning signal)."""
    groups = rewards.view(-1, int((group_ids == 0).sum()))
    zero_variance = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean()
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/zero_variance_group_frac": float(zero_variance),
        **{k: float(v) for k, v in stats.items()},
    }
