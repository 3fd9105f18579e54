"""The trust-region corrections of 2025-26 (docs/algorithm.md §10): DPPO's binary-TV and binary-KL masks
(arXiv 2602.04879), DeepSeek-V3.2's off-policy sequence masking "OPSM" (arXiv 2512.02556) and Trust
Region Masking "TRM" (arXiv 2512.23075).

The corrections of corrections.py see only the engine mismatch Δ = ℓ_old − ℓ_inf at the rollout weights.
These measure how far the *current* policy π_θ (its detached ℓ_θ) has moved from an **anchor**: the
rollout policy π_inf ("rollout", the default: the divergence then holds the engine mismatch, any
staleness and the update drift) or the trainer's π_old ("old": the update drift alone). Their masks
therefore change within a step as θ moves, like PPO's clip; at θ = θ_old (pass no ℓ_θ) they are the
batch's view at the rollout weights.

- "dppo-tv", "dppo-kl": an objective of their own, replacing the PPO clip: a kept token weighs
  r = π_θ/π_inf (pg_loss takes the gradient through r, as for "icepop-online"). A token is masked when
  it has left the region on the side its advantage pushes it further: for A > 0 when π_θ rose above
  the anchor by more than δ, for A ≤ 0 when it fell below by more than δ (no advantages: both sides).
- "opsm", "trm": pure sequence masks on the configured objective; kept tokens weigh 1.

The design rules of corrections.py hold: selection by torch.where, nothing exponentiated at an invalid
or non-finite position, detached outputs. A valid token whose log-ratio against π_inf or the anchor is
not finite is masked (and, for the sequence masks, its whole sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icepop.algo.correction_base import Correction, broadcast_sequence

TRUST_REGION_CORRECTIONS = ("dppo-tv", "dppo-kl", "opsm", "trm")
"""The corrections of this module (also in corrections.CORRECTIONS)."""

ANCHORS = ("rollout", "old")
"""What the divergence of π_θ is measured against: π_inf, where the mismatch lives (default), or π_old."""

THRESHOLDS = {"dppo-tv": 0.15, "dppo-kl": 0.05, "opsm": 0.1, "trm": math.log(5.0)}
"""Default δ of each (docs/algorithm.md §10 says where each comes from)."""

DPPO_KL_EPS = 1e-8
"""DPPO-KL's ε in ln((1 − p_a + ε)/(1 − p_θ + ε)), as in the authors' code and verl."""


def _diff(numerator: Tensor, denominator: Tensor) -> Tensor:
    return numerator.detach().double() - denominator.detach().double()


def _finite(response_mask: Tensor, *ratios: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Valid tokens whose log-ratios are all finite; and the valid non-finite ones counted low (some
    ratio is −∞) or high (some ratio is +∞ and none −∞). NaN is neither."""
    finite, minus, plus = (
        response_mask.clone(),
        torch.zeros_like(response_mask),
        torch.zeros_like(response_mask),
    )
    for ratio in ratios:
        finite &= torch.isfinite(ratio)
        minus |= ratio == -math.inf
        plus |= ratio == math.inf
    return finite, response_mask & minus, response_mask & plus & ~minus


def dppo(
    divergence: str,
    logprobs: Tensor,
    anchor_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    advantages: Tensor | None,
    threshold: float,
) -> Correction:
    """DPPO with the binary approximation of the divergence between π_θ and the anchor at the sampled
    token, p = e^ℓ_θ and p_a = e^ℓ_a (each at most 1; a positive ℓ, which no distribution gives, counts
    as probability 1):

    - "tv": D = p − p_a, signed: A > 0 masks D > δ (high), A ≤ 0 masks D < −δ (low).
    - "kl": D = p_a·(ℓ_a − ℓ_θ) + (1 − p_a)·ln((1 − p_a + ε)/(1 − p + ε)), KL(Bern(p_a) ‖ Bern(p)) with
      ε = 1e-8: A > 0 masks D > δ with p > p_a (high), A ≤ 0 masks D > δ with p < p_a (low).

    Kept tokens weigh r = exp(ℓ_θ − ℓ_inf), computed in float64; a weight beyond the working dtype's
    range (π_inf < 1e-38·π_θ in float32) cannot be formed and is masked high, like a ratio of +∞.
    """
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    log_weight = _diff(logprobs, rollout_logprobs)
    finite, low, high = _finite(response_mask, log_weight, _diff(logprobs, anchor_logprobs))
    overflow = finite & (log_weight > math.log(torch.finfo(dtype).max))
    finite, high = finite & ~overflow, high | overflow
    zero = torch.zeros_like(log_weight)
    lp = torch.where(finite, logprobs.detach().double(), zero).clamp(max=0.0)
    la = torch.where(finite, anchor_logprobs.detach().double(), zero).clamp(max=0.0)
    p, p_a = torch.exp(lp), torch.exp(la)
    if divergence == "tv":
        above, below = p - p_a > threshold, p - p_a < -threshold
    else:
        kl = p_a * (la - lp) + (1 - p_a) * torch.log((1 - p_a + DPPO_KL_EPS) / (1 - p + DPPO_KL_EPS))
        above, below = (kl > threshold) & (p > p_a), (kl > threshold) & (p < p_a)
    if advantages is not None:
        positive = advantages.detach() > 0
        above, below = above & positive, below & ~positive
    high, low = high | (finite & above), low | (finite & below)
    keep = finite & ~above & ~below
    weight = torch.exp(torch.where(keep, log_weight, zero))
    return Correction(torch.where(keep, weight, zero).to(dtype), keep, low, high)


def _sequence_drift(
    logprobs: Tensor, anchor_logprobs: Tensor, old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, torch.dtype]:
    """ℓ_θ − ℓ_a on valid tokens (0 elsewhere), float64; whether each sequence's valid tokens all have
    finite ℓ_θ − ℓ_a and ℓ_old − ℓ_inf, [B]; and the weights' dtype."""
    drift = _diff(logprobs, anchor_logprobs)
    finite, _, _ = _finite(mask, drift, _diff(old_logprobs, rollout_logprobs))
    ok = (finite | ~mask).all(dim=-1)
    return (
        torch.where(finite, drift, torch.zeros_like(drift)),
        ok,
        torch.promote_types(old_logprobs.dtype, torch.float32),
    )


def opsm(
    logprobs: Tensor,
    anchor_logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    advantages: Tensor | None,
    threshold: float,
) -> Correction:
    """Off-policy sequence masking (DeepSeek-V3.2 Eq. 9): token t of sequence i is masked (low) iff
    A_t < 0 and (1/|y_i|) Σ_t (ℓ_a − ℓ_θ) > δ, the sequence's mean log-ratio of anchor to current policy
    (a k1 estimate of KL(π_a ‖ π_θ)); with the one advantage per sequence of GRPO that masks the whole
    sequence. No advantages: the sign test is dropped (an upper bound). Kept tokens weigh 1; a sequence
    with a non-finite log-ratio is dropped whole (high)."""
    drift, ok, dtype = _sequence_drift(
        logprobs, anchor_logprobs, old_logprobs, rollout_logprobs, response_mask
    )
    divergence = -drift.sum(dim=-1) / response_mask.sum(dim=-1).clamp(min=1)
    negative = response_mask if advantages is None else response_mask & (advantages.detach() < 0)
    low = (ok & (divergence > threshold))[:, None] & negative
    high = (~ok)[:, None] & response_mask
    keep = response_mask & ~low & ~high
    return Correction(keep.to(dtype), keep, low, high)


def trm(
    logprobs: Tensor,
    anchor_logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    threshold: float,
) -> Correction:
    """Trust Region Masking: keep sequence i iff max_t |ℓ_θ,t − ℓ_a,t| ≤ δ over its valid tokens (bound
    inclusive), the sample-based detector of max_t KL(π_a(·|c_t) ‖ π_θ(·|c_t)). A dropped sequence is
    high if some token's ratio left the region above, else low; a sequence with a non-finite log-ratio
    is dropped whole (high). Kept tokens weigh 1."""
    drift, ok, dtype = _sequence_drift(
        logprobs, anchor_logprobs, old_logprobs, rollout_logprobs, response_mask
    )
    above, below = (drift > threshold).any(dim=-1), (drift < -threshold).any(dim=-1)
    high = ~ok | above
    low = ok & below & ~above
    keep = ~high & ~low
    return broadcast_sequence(keep.to(dtype), keep, low, high, response_mask)


def trust_region_weights(
    correction: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    advantages: Tensor | None,
    anchor: str,
    threshold: float,
) -> Correction:
    """Apply the named trust-region correction: ℓ_θ (detached), ℓ_old, ℓ_inf and the advantages (or
    None), [B, T] each; the anchor is ℓ_inf ("rollout") or ℓ_old ("old"); δ = threshold."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r} is not one of {', '.join(ANCHORS)}")
    anchor_logprobs = rollout_logprobs if anchor == "rollout" else old_logprobs
    if correction in ("dppo-tv", "dppo-kl"):
        return dppo(
            correction.removeprefix("dppo-"), logprobs, anchor_logprobs, rollout_logprobs, response_mask,
            advantages, threshold,
        )  # fmt: skip
    elif correction == "opsm":
        return opsm(
            logprobs, anchor_logprobs, old_logprobs, rollout_logprobs, response_mask, advantages, threshold
        )
    elif correction == "trm":
        return trm(logprobs, anchor_logprobs, old_logprobs, rollout_logprobs, response_mask, threshold)
    raise ValueError(f"correction={correction!r} is not one of {', '.join(TRUST_REGION_CORRECTIONS)}")
