"""What an RL step logs beyond the trainer's own metrics: whole-batch mismatch and mask statistics,
reward statistics, and the ranks' means. Plain functions of the step's tensors and metric dicts."""

from __future__ import annotations

import torch

from icepop.algo import (
    PolicyLossOptions,
    correction_metrics,
    log_ratio,
    masked_mean,
    mismatch_by_turn,
    mismatch_metrics,
)
from icepop.types import Completion, RLBatch


def mismatch_statistics(
    batch: RLBatch, options: PolicyLossOptions, by_turn: bool = False
) -> dict[str, float]:
    """Train/inference mismatch and the correction's mask fractions over every token of the batch; with
    `by_turn` (multi-turn episodes) also per model turn, as mismatch/turn_<n>/…"""
    old, rollout, mask = batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
    assert old is not None
    corr = options.correction_weights(old, rollout, mask, advantages=batch.advantages)  # sign tests exact
    delta = log_ratio(old, rollout, mask)
    stats = {**mismatch_metrics(old, rollout, mask), **correction_metrics(corr, delta, mask)}
    if by_turn:
        stats |= {f"mismatch/{key}": value for key, value in mismatch_by_turn(delta, corr.keep, mask).items()}
    return {key: float(value) for key, value in stats.items()}


def staleness_statistics(batch: RLBatch, behind: int, max_staleness: int) -> dict[str, float]:
    """How many weight versions the step's samples are behind the trainer (one batch comes from one
    version), as a histogram over 0 … rollout.max_staleness."""
    versions = torch.full((batch.input_ids.shape[0],), float(behind))
    return {
        "staleness/versions_behind_mean": float(versions.mean()),
        "staleness/versions_behind_max": float(versions.max()),
        **{
            f"staleness/frac_{k}_behind": float((versions == k).float().mean())
            for k in range(max_staleness + 1)
        },
    }


def staleness_split(batch: RLBatch, engine_now: torch.Tensor, options: PolicyLossOptions) -> dict[str, float]:
    """log(π_prox/π_inf) = log(π_prox/π_engine(θ_prox)) + log(π_engine(θ_prox)/π_inf): the engine mismatch
    at the trainer's weights, and the staleness as the engine itself sees it (its log-probs of the same
    tokens now, `engine_now`, against those it sampled with). Also the fraction of tokens the correction
    would mask for the mismatch part alone: well below icepop/mask_frac, staleness does the masking."""
    prox, mask = batch.old_logprobs, batch.response_mask
    assert prox is not None
    mismatch, drift = log_ratio(prox, engine_now, mask), log_ratio(engine_now, batch.rollout_logprobs, mask)
    finite = mask & torch.isfinite(mismatch) & torch.isfinite(drift)
    alone = options.correction_weights(prox, engine_now, mask)
    return {
        "staleness/engine_drift_abs_log_ratio_mean": float(masked_mean(drift.abs(), finite)),
        "staleness/engine_mismatch_abs_log_ratio_mean": float(masked_mean(mismatch.abs(), finite)),
        "staleness/mismatch_only_mask_frac": float((mask & ~alone.keep).sum() / mask.sum().clamp(min=1)),
    }


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


def episode_statistics(completions: list[Completion]) -> dict[str, float]:
    """Multi-turn episodes (none: {}): per-episode means of their counts (turns, observation tokens,
    the environment's own, e.g. tool_calls), and the episodes an environment error or timeout ended."""
    if not completions or completions[0].model_mask is None:
        return {}
    keys = sorted({key for c in completions for key in c.stats} - {"errors", "timeouts"})
    out = {f"episode/{key}_mean": sum(c.stats.get(key, 0.0) for c in completions) / len(completions)
           for key in keys}  # fmt: skip
    out["episode/errors"] = sum(c.stats.get("errors", 0.0) for c in completions)
    out["episode/timeouts"] = sum(c.stats.get("timeouts", 0.0) for c in completions)
    return out
