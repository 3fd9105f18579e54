"""Loss aggregation: how per-token losses become one scalar (docs/algorithm.md §5).

Every mode accepts *global* denominators, so that a batch split into micro-batches and accumulated
gives the same loss and gradient as one big batch: each micro-batch divides by the count over the
whole batch (all data-parallel ranks, all micro-batches), never by its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""Names accepted by `aggregate(agg=...)`. The IcePop paper uses "seq-mean-token-mean"."""

Count = int | float | Tensor


def aggregate(
    per_token: Tensor,
    response_mask: Tensor,
    agg: str,
    *,
    global_token_count: Count | None = None,
    global_seq_count: Count | None = None,
    max_response_length: int | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar; positions with response_mask False count as 0.

    token-mean:              Σ m·l / N          N = global_token_count or Σ m
    seq-mean-token-mean:     (1/S) Σ_i (Σ_t m·l / Σ_t m)
    seq-mean-token-sum:      (1/S) Σ_i Σ_t m·l
    seq-mean-token-sum-norm: Σ m·l / (S · L_max)   L_max = max_response_length or T (Dr.GRPO)
    S = global_seq_count or the number of sequences with at least one valid token. A sequence
    always sits whole in one micro-batch, so its own token count Σ_t m is always local.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGREGATIONS)}")
    # Select, don't multiply: padding may hold NaN or inf, and 0·NaN = NaN.
    masked = torch.where(response_mask, per_token, torch.zeros_like(per_token))
    if agg == "token-mean":
        denominator = response_mask.sum() if global_token_count is None else global_token_count
        return masked.sum() / _at_least_one(denominator, masked)

    tokens_per_seq = response_mask.sum(dim=-1)
    seq_count = (tokens_per_seq > 0).sum() if global_seq_count is None else global_seq_count
    seq_count = _at_least_one(seq_count, masked)
    seq_sums = masked.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        return (seq_sums / tokens_per_seq.clamp(min=1)).sum() / seq_count
    if agg == "seq-mean-token-sum":
        return seq_sums.sum() / seq_count
    length = per_token.shape[-1] if max_response_length is None else max_response_length
    return seq_sums.sum() / (seq_count * length)


def _at_least_one(count: Count, like: Tensor) -> Tensor:
    """A denominator as a tensor, floored at 1 so an empty batch gives 0 rather than 0/0 = NaN."""
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)
