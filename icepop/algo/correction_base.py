"""What every correction returns (`Correction`), and the broadcast of a per-sequence decision to its tokens.

Shared by corrections.py (the mismatch corrections, which look at ℓ_old − ℓ_inf) and trust_region.py (the
2025-26 corrections, which look at the current policy against an anchor); both follow the design rules of
corrections.py's docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Correction(NamedTuple):
    """Per-token result of a correction; every tensor is [B, T] and detached.

    weight: the factor on each token's surrogate (0 where masked or padded).
    keep:   valid tokens the update uses (weight may still be 0 only if k itself is 0).
    low:    valid tokens masked because the ratio is too small (k < α, or Δ = −inf); for the
            trust-region corrections, because π_θ fell too far below the anchor.
    high:   valid tokens masked because the ratio is too large (k > β, or Δ = +inf); for the
            trust-region corrections, because π_θ rose too far above it (or a log-ratio is not finite).
    """

    weight: Tensor
    keep: Tensor
    low: Tensor
    high: Tensor


def broadcast_sequence(
    seq_weight: Tensor, seq_keep: Tensor, seq_low: Tensor, seq_high: Tensor, response_mask: Tensor
) -> Correction:
    """Per-sequence weight and masks, [B] each, onto the sequence's valid tokens; [B, T] each."""

    def expand(x: Tensor) -> Tensor:
        return x[:, None] & response_mask

    weight = torch.where(expand(seq_keep), seq_weight[:, None].expand_as(response_mask), 0.0)
    return Correction(weight.to(seq_weight.dtype), expand(seq_keep), expand(seq_low), expand(seq_high))
