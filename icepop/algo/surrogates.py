"""Policy-gradient surrogates, per token, before any mismatch correction and aggregation.

Each returns a per-token *loss* (the negative of the objective j) of shape [B, T]. The correction
weight from `corrections.py` multiplies it from outside (docs/algorithm.md §2); aggregation comes after.
Callers pass log-probs already sanitised at inactive positions (finite everywhere), so no NaN or
inf can enter through an unused token.
"""

from __future__ import annotations

import torch
from torch import Tensor

OBJECTIVES = ("ppo", "gspo", "cispo")
"""Names accepted by `pg_loss(objective=...)`."""


def ppo_clip(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate with decoupled bounds (DAPO clip-higher) and optional dual clip.

    loss = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); with dual clip c > 1 (arXiv 1912.09729),
    tokens with A < 0 are further capped at −c·A so one huge ratio cannot blow up the update.
    Returns (loss [B, T], clipped [B, T] bool: where the clipped branch set the value).
    """
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped


def gspo_ratio(logprobs: Tensor, old_logprobs: Tensor, active: Tensor) -> Tensor:
    """GSPO (arXiv 2507.18071) token form: s_i,t = sg(s_i) · π_θ(y_t)/sg(π_θ(y_t)), [B, T].

    s_i = exp(mean over the sequence's active tokens of (ℓ_θ − ℓ_old)): one length-normalised ratio
    per sequence, clipped as a whole; each token's gradient is s_i·∇ℓ_θ,t.
    """
    log_ratio = torch.where(active, logprobs - old_logprobs, torch.zeros_like(logprobs))
    seq_log_ratio = log_ratio.sum(dim=-1) / active.sum(dim=-1).clamp(min=1)
    return torch.exp(seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach())


def cispo(ratio: Tensor, logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the IS weight, not the update; no token is dropped.

    j = sg(clip(r, 1−ε_low, 1+ε_high))·A·ℓ_θ. Written as sg(r̂)·A·exp(ℓ_θ − sg ℓ_θ): the same gradient,
    r̂·A·∇ℓ_θ, but the value r̂·A is comparable with the PPO loss in logs.
    """
    weight = ratio.detach().clamp(1.0 - clip_low, 1.0 + clip_high)
    return -advantages * weight * torch.exp(logprobs - logprobs.detach())
