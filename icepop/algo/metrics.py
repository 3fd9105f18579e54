"""Mismatch and correction metrics, logged every step (docs/algorithm.md §6).

All values are 0-dim float64 tensors, detached (no device sync until the caller reads them).
Means are over valid tokens; ratio and log-prob statistics skip tokens whose Δ is not finite, which
`mismatch/nonfinite_frac` counts instead. A statistic over an empty set is reported as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icepop.algo.corrections import Correction

Metrics = dict[str, Tensor]


def masked_mean(values: Tensor, where: Tensor) -> Tensor:
    """Mean of `values` where `where` is True, detached, in float64; 0 over an empty set."""
    values = values.detach().double()
    total = torch.where(where, values, torch.zeros_like(values)).sum()
    return total / where.sum().clamp(min=1)


def _extreme(values: Tensor, where: Tensor, largest: bool) -> Tensor:
    if not bool(where.any()):
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return values[where].max() if largest else values[where].min()


def mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> Metrics:
    """How far the trainer (ℓ_old) and the inference engine (ℓ_inf) disagree at θ_old.

    kl_k1 = mean(ℓ_inf − ℓ_old) and kl_k3 = mean(k − 1 − Δ) estimate KL(π_infer ‖ π_train) from
    tokens sampled by the engine; rel_prob_diff_mean = mean |k − 1|, the "relative probability
    difference" the IcePop paper tracks.
    """
    delta = old_logprobs.detach().double() - rollout_logprobs.detach().double()
    finite = response_mask & torch.isfinite(delta)
    delta = torch.where(finite, delta, torch.zeros_like(delta))
    abs_delta = delta.abs()
    k = torch.exp(delta)
    valid = response_mask.sum().clamp(min=1)
    return {
        "mismatch/abs_logp_diff_mean": masked_mean(abs_delta, finite),
        "mismatch/abs_logp_diff_max": _extreme(abs_delta, finite, largest=True),
        "mismatch/kl_k1": masked_mean(-delta, finite),
        "mismatch/kl_k3": masked_mean(k - 1.0 - delta, finite),
        "mismatch/rel_prob_diff_mean": masked_mean((k - 1.0).abs(), finite),
        "mismatch/nonfinite_frac": (response_mask & ~finite).sum().double() / valid,
    }


def correction_metrics(correction: Correction, delta: Tensor, response_mask: Tensor) -> Metrics:
    """Mask fractions (all, low side, high side) over valid tokens, and the ratio k's range.

    `delta` is the log-ratio the correction looked at (Δ, or ℓ_θ − ℓ_inf for "icepop-online" and
    "dppo-*", whose weight it is). The sequence masks ("seq-mis", "geo-mask", "opsm", "trm") drop whole
    sequences: mask_frac counts their tokens, icepop/masked_seq_frac (weight_metrics) the sequences.
    """
    valid = response_mask.sum().clamp(min=1).double()
    finite = response_mask & torch.isfinite(delta)
    k = torch.exp(torch.where(finite, delta.detach().double(), torch.zeros_like(delta, dtype=torch.float64)))
    masked = response_mask & ~correction.keep
    return {
        "icepop/mask_frac": masked.sum().double() / valid,
        "icepop/mask_frac_low": correction.low.sum().double() / valid,
        "icepop/mask_frac_high": correction.high.sum().double() / valid,
        "icepop/ratio_min": _extreme(k, finite, largest=False),
        "icepop/ratio_mean": masked_mean(k, finite),
        "icepop/ratio_max": _extreme(k, finite, largest=True),
        "icepop/weight_mean": masked_mean(correction.weight, correction.keep),
        **weight_metrics(correction, response_mask),
    }


def weight_metrics(correction: Correction, response_mask: Tensor) -> Metrics:
    """How much of the batch the correction leaves: the effective sample size of the per-token weights
    (w = weight on kept tokens, 0 on masked ones) as a fraction of the valid tokens,
    ESS/n = (Σw)² / (n·Σw²) (Kish), and the masked tokens per sequence.

    1 when every weight is equal (nothing masked, k ≡ 1); it falls as masking and uneven k concentrate
    the update on fewer tokens.
    """
    w = torch.where(response_mask & correction.keep, correction.weight.detach().double(), 0.0)
    n = response_mask.sum().double()
    sequences = (response_mask.sum(-1) > 0).sum().clamp(min=1).double()
    masked = (response_mask & ~correction.keep).sum(-1).double()
    squares = (w * w).sum()
    return {
        "icepop/ess_frac": w.sum() ** 2 / (n * squares)
        if squares > 0
        else torch.zeros((), dtype=torch.float64),
        "icepop/masked_tokens_per_seq": masked.sum() / sequences,
        "icepop/masked_seq_frac": (masked > 0).sum().double() / sequences,
    }


def staleness_metrics(
    logprobs: Tensor, old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor
) -> Metrics:
    """The split of log(π_θ/π_inf) = log(π_θ/π_old) + log(π_old/π_inf), as mean |·| of each part over
    valid tokens: the update drift (the policy moved within the step: its later updates; 0 for the
    first) and the rollout gap (from the weights and engine that sampled to the trainer at θ_old: the
    engine mismatch, plus the versions behind of stale rollouts (rollout.max_staleness), which
    icepop.stages.step_metrics.staleness_split separates), and their total."""
    stale = logprobs.detach().double() - old_logprobs.detach().double()
    mismatch = old_logprobs.detach().double() - rollout_logprobs.detach().double()
    finite = response_mask & torch.isfinite(stale) & torch.isfinite(mismatch)
    return {
        "staleness/update_drift_abs_log_ratio_mean": masked_mean(stale.abs(), finite),
        "staleness/rollout_gap_abs_log_ratio_mean": masked_mean(mismatch.abs(), finite),
        "staleness/total_abs_log_ratio_mean": masked_mean((stale + mismatch).abs(), finite),
    }


def entropy_metrics(entropy: Tensor, keep: Tensor, response_mask: Tensor) -> Metrics:
    """Mean policy entropy over all valid tokens and over the masked ones (masking low-entropy
    tokens only is benign; masking the uncertain ones removes the learning signal)."""
    return {
        "actor/entropy": masked_mean(entropy, response_mask),
        "actor/entropy_masked": masked_mean(entropy, response_mask & ~keep),
    }


def log_ratio_histogram(delta: Tensor, response_mask: Tensor, edges: Tensor) -> Tensor:
    """Counts of log k = Δ over valid finite tokens in the bins given by `edges` [n+1]; [n] int64.

    Values outside [edges[0], edges[-1]] land in the first or last bin, so the counts always sum
    to the number of valid finite tokens.
    """
    finite = response_mask & torch.isfinite(delta)
    values = delta.detach().double()[finite].clamp(float(edges[0]), float(edges[-1]))
    index = torch.bucketize(values, edges.double().to(values.device), right=True) - 1
    index = index.clamp(0, edges.numel() - 2)
    return torch.bincount(index, minlength=edges.numel() - 1)


def abs_log_ratio_by_position(delta: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean |log k| at each response position (0 = a response's first token, wherever its row's
    response starts) over valid finite tokens, and how many tokens each mean covers; both [T'] with T'
    the longest response (the IcePop paper's mismatch-by-position view). A position without tokens is 0."""
    position = response_mask.long().cumsum(dim=1) - 1  # counting the model's tokens only (multi-turn)
    valid = response_mask & torch.isfinite(delta)
    length = int(position[response_mask].max()) + 1 if bool(response_mask.any()) else 0
    index = position[valid]
    sums = torch.zeros(length, dtype=torch.float64, device=delta.device)
    sums.index_add_(0, index, delta.detach().double().abs()[valid])
    counts = torch.zeros(length, dtype=torch.long, device=delta.device).index_add_(
        0, index, torch.ones_like(index)
    )
    return sums / counts.clamp(min=1), counts


def turn_index(response_mask: Tensor) -> Tensor:
    """1, 2, … on the tokens of each row's first, second, … run of valid tokens (a multi-turn episode's
    model turns, observations between them being masked out), 0 elsewhere; [B, T] int64."""
    before = torch.nn.functional.pad(response_mask[:, :-1], (1, 0), value=False)
    starts = response_mask & ~before
    return torch.where(response_mask, starts.long().cumsum(dim=1), torch.zeros_like(starts, dtype=torch.long))


def mismatch_by_turn(delta: Tensor, keep: Tensor, response_mask: Tensor) -> Metrics:
    """Mean |log k| and the correction's mask fraction over the tokens of each model turn (is the
    mismatch worse in later turns of an episode?): turn_<n>/abs_log_ratio_mean, turn_<n>/mask_frac,
    turn_<n>/tokens for n = 1 … the last turn present."""
    turns = turn_index(response_mask)
    out: Metrics = {}
    for n in range(1, int(turns.max()) + 1 if bool(response_mask.any()) else 1):
        where = turns == n
        finite = where & torch.isfinite(delta)
        out[f"turn_{n}/abs_log_ratio_mean"] = masked_mean(delta.abs(), finite)
        out[f"turn_{n}/mask_frac"] = (where & ~keep).sum().double() / where.sum().clamp(min=1)
        out[f"turn_{n}/tokens"] = where.sum().double()
    return out
