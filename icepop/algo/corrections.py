"""Train/inference mismatch corrections: per-token weights from the calibration ratio k.

Every correction here looks only at Δ = ℓ_old − ℓ_inf (trainer vs. inference engine, both at the
rollout weights θ_old, see docs/algorithm.md §1-3) and returns a constant per-token weight plus the masks
that explain it. The weight multiplies the policy-gradient surrogate from outside, so nothing here
carries a gradient: callers pass detached log-probs, and every function detaches again to be safe.

Design choice: a token is *masked* by selection (`torch.where`), never by multiplying with 0, and Δ
is zeroed at invalid positions before it is exponentiated. That keeps padding poisoned with NaN, and
tokens with ℓ = −inf, from ever producing 0·∞ = NaN in the loss or its gradient.

A valid token whose Δ is not finite (either log-prob −inf or NaN) gets weight 0 under every
correction, "none" included: no ratio can be formed for it, and the metrics count it separately.

The trust-region corrections of 2025-26 ("dppo-tv", "dppo-kl", "opsm", "trm") look at the current policy
against an anchor instead, under the same rules; they live in trust_region.py and are dispatched here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icepop.algo.correction_base import Correction, broadcast_sequence
from icepop.algo.trust_region import THRESHOLDS, TRUST_REGION_CORRECTIONS, trust_region_weights

CORRECTIONS = (
    "none",
    "tis",
    "token-mis",
    "icepop",
    "seq-tis",
    "seq-mis",
    "geo-mask",
    "kpop",
    "icepop-online",
    *TRUST_REGION_CORRECTIONS,
)
"""Names accepted by `correction_weights` (and by `policy_loss(correction=...)`)."""

ONLINE_CORRECTIONS = ("icepop-online", "dppo-tv", "dppo-kl")
"""Objectives of their own: the kept token's weight is the current ratio π_θ/π_inf, the gradient goes
through it, and there is no PPO clip (pg_loss)."""

KPOP_CLAMP = 1e-8
"""KPop clamps both probabilities to [1e-8, 1 − 1e-8] before the binary KL (docs/algorithm.md §3)."""


def log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """Δ = ℓ_old − ℓ_inf on valid tokens, 0 on padding; [B, T], detached, at least float32."""
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    delta = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    return torch.where(response_mask, delta, torch.zeros_like(delta))


def _token_band(
    delta: Tensor, response_mask: Tensor, low_bound: float | None, high_bound: float | None
) -> Correction:
    """Keep valid tokens with low_bound ≤ k ≤ high_bound (inclusive; None = unbounded); weight k."""
    finite = response_mask & torch.isfinite(delta)
    # Mask before exponentiating: exp only ever sees finite values (Δ = 0 elsewhere).
    k = torch.exp(torch.where(finite, delta, torch.zeros_like(delta)))
    low = response_mask & (delta == -math.inf)
    high = response_mask & (delta == math.inf)
    if low_bound is not None:
        low = low | (finite & (k < low_bound))
    if high_bound is not None:
        high = high | (finite & (k > high_bound))
    keep = finite & ~low & ~high
    weight = torch.where(keep, k, torch.zeros_like(k))
    return Correction(weight, keep, low, high)


def no_correction(delta: Tensor, response_mask: Tensor) -> Correction:
    """Vanilla GRPO: weight 1 on every valid token with a finite ratio."""
    band = _token_band(delta, response_mask, None, None)
    return band._replace(weight=band.keep.to(delta.dtype))


def tis(delta: Tensor, response_mask: Tensor, cap: float) -> Correction:
    """Truncated importance sampling (Yao et al. 2025): weight min(k, C); no token is masked.

    Δ = +∞ still has a well-defined weight, C; Δ = −∞ has weight 0 (k = 0) and counts as low.
    """
    finite = response_mask & torch.isfinite(delta)
    k = torch.exp(torch.where(finite, delta, torch.zeros_like(delta)))
    weight = torch.where(finite, k.clamp(max=cap), torch.zeros_like(k))
    plus_inf = response_mask & (delta == math.inf)
    weight = torch.where(plus_inf, torch.full_like(k, cap), weight)
    low = response_mask & (delta == -math.inf)
    keep = (finite | plus_inf) & ~low
    return Correction(weight, keep, low, torch.zeros_like(keep))


def token_mis(delta: Tensor, response_mask: Tensor, cap: float) -> Correction:
    """Token masked importance sampling: weight k·1[k ≤ C] (one-sided mask)."""
    return _token_band(delta, response_mask, None, cap)


def icepop(delta: Tensor, response_mask: Tensor, ratio_low: float, ratio_high: float) -> Correction:
    """IcePop (arXiv 2510.18855 Eq. 1): M(k) = k if α ≤ k ≤ β else 0, bounds inclusive."""
    return _token_band(delta, response_mask, ratio_low, ratio_high)


def _sequence_log_ratio(delta: Tensor, response_mask: Tensor, mean: bool) -> tuple[Tensor, Tensor]:
    """Σ_t Δ_t (or mean_t Δ_t) per sequence, [B]; and whether every valid Δ of it is finite."""
    finite = torch.isfinite(delta) | ~response_mask
    all_finite = finite.all(dim=-1)
    total = torch.where(response_mask & finite, delta, torch.zeros_like(delta)).sum(dim=-1)
    if mean:
        total = total / response_mask.sum(dim=-1).clamp(min=1)
    return total, all_finite


def seq_tis(delta: Tensor, response_mask: Tensor, cap: float) -> Correction:
    """Sequence TIS: ρ = exp(Σ_t Δ_t), weight min(ρ, C) on every token of the sequence.

    Computed in log space (Σ Δ easily exceeds float range); a sequence with any non-finite Δ is
    dropped whole.
    """
    log_rho, ok = _sequence_log_ratio(delta, response_mask, mean=False)
    rho = torch.exp(torch.where(ok, log_rho.clamp(max=math.log(cap)), torch.zeros_like(log_rho)))
    # Sequence TIS never masks on the low side; only a sequence with a non-finite Δ is dropped.
    return broadcast_sequence(rho, ok, torch.zeros_like(ok), ~ok, response_mask)


def seq_mis(delta: Tensor, response_mask: Tensor, cap: float) -> Correction:
    """Sequence masked IS: ρ = exp(Σ_t Δ_t); keep the whole sequence iff ρ ≤ C, weight ρ."""
    log_rho, ok = _sequence_log_ratio(delta, response_mask, mean=False)
    high = ~ok | (log_rho > math.log(cap))
    keep = ~high
    rho = torch.exp(torch.where(keep, log_rho, torch.zeros_like(log_rho)))
    return broadcast_sequence(rho, keep, torch.zeros_like(keep), high, response_mask)


def geo_mask(delta: Tensor, response_mask: Tensor, ratio_low: float, ratio_high: float) -> Correction:
    """Geometric sequence mask: keep a sequence iff exp(mean_t Δ_t) ∈ [lo, hi]; kept tokens weigh k_t.

    The gate is length-insensitive (a geometric mean), unlike ρ = exp(Σ Δ) of seq-tis/seq-mis.
    """
    mean_log, ok = _sequence_log_ratio(delta, response_mask, mean=True)
    geo = torch.exp(torch.where(ok, mean_log, torch.zeros_like(mean_log)))
    low = ok & (geo < ratio_low)
    high = ~ok | (geo > ratio_high)
    seq_keep = ~low & ~high
    tokens = _token_band(delta, response_mask, None, None)
    keep = tokens.keep & seq_keep[:, None]
    weight = torch.where(keep, tokens.weight, torch.zeros_like(tokens.weight))
    return Correction(weight, keep, low[:, None] & response_mask, high[:, None] & response_mask)


def binary_kl(p: Tensor, q: Tensor) -> Tensor:
    """D_B(p‖q) = p ln(p/q) + (1−p) ln((1−p)/(1−q)), the KL between Bernoulli(p) and Bernoulli(q)."""
    return p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))


def kpop(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, threshold: float
) -> Correction:
    """KPop (Ant Group, May 2026): keep iff max(D_B(p‖q), D_B(q‖p)) ≤ φ, weight k = p/q.

    p = exp(ℓ_old), q = exp(ℓ_inf), both clamped to [1e-8, 1 − 1e-8]. Unlike a fixed ratio band,
    the accepted region narrows for high-probability tokens, where a small ratio is a large change.
    A kept token that fails the binary-KL test is classed low or high by the side of k against 1.
    """
    delta = log_ratio(old_logprobs, rollout_logprobs, response_mask)
    tokens = _token_band(delta, response_mask, None, None)
    # float64: in float32, 1 − 1e-8 rounds to 1 and ln(1 − p) becomes −inf.
    zero = torch.zeros_like(delta, dtype=torch.float64)
    lo, hi = KPOP_CLAMP, 1.0 - KPOP_CLAMP
    p = torch.exp(torch.where(tokens.keep, old_logprobs.detach().double(), zero)).clamp(lo, hi)
    q = torch.exp(torch.where(tokens.keep, rollout_logprobs.detach().double(), zero)).clamp(lo, hi)
    divergence = torch.maximum(binary_kl(p, q), binary_kl(q, p))
    zero = torch.zeros_like(delta)
    reject = tokens.keep & (divergence > threshold)
    low = tokens.low | (reject & (delta < 0))
    high = tokens.high | (reject & (delta >= 0))
    keep = tokens.keep & ~reject
    return Correction(torch.where(keep, tokens.weight, zero), keep, low, high)


def correction_weights(
    correction: str,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    ratio_low: float,
    ratio_high: float,
    kpop_threshold: float,
    logprobs: Tensor | None = None,
    advantages: Tensor | None = None,
    anchor: str = "rollout",
    threshold: float | None = None,
) -> Correction:
    """Apply the named correction to [B, T] log-probs. For "icepop-online" pass ℓ_θ as old_logprobs.

    ratio_low/ratio_high are α/β for "icepop", "icepop-online" and "geo-mask"; ratio_high is the cap C
    for the one-sided "tis", "token-mis", "seq-tis" and "seq-mis"; kpop_threshold is φ for "kpop".
    The trust-region corrections ("dppo-tv", "dppo-kl", "opsm", "trm", trust_region.py) also take the
    current ℓ_θ as `logprobs` (detached; None: θ = θ_old, ℓ_θ = ℓ_old), the advantages for the sign tests
    of "dppo-*" and "opsm" (None: both sides masked, an upper bound), the `anchor` ("rollout": ℓ_inf, or
    "old": ℓ_old) and their δ as `threshold` (None: that correction's default, trust_region.THRESHOLDS).
    """
    if correction in TRUST_REGION_CORRECTIONS:
        return trust_region_weights(
            correction, old_logprobs if logprobs is None else logprobs, old_logprobs, rollout_logprobs,
            response_mask, advantages=advantages, anchor=anchor,
            threshold=THRESHOLDS[correction] if threshold is None else threshold,
        )  # fmt: skip
    delta = log_ratio(old_logprobs, rollout_logprobs, response_mask)
    if correction == "none":
        return no_correction(delta, response_mask)
    elif correction == "tis":
        return tis(delta, response_mask, ratio_high)
    elif correction == "token-mis":
        return token_mis(delta, response_mask, ratio_high)
    elif correction in ("icepop", "icepop-online"):
        return icepop(delta, response_mask, ratio_low, ratio_high)
    elif correction == "seq-tis":
        return seq_tis(delta, response_mask, ratio_high)
    elif correction == "seq-mis":
        return seq_mis(delta, response_mask, ratio_high)
    elif correction == "geo-mask":
        return geo_mask(delta, response_mask, ratio_low, ratio_high)
    elif correction == "kpop":
        return kpop(old_logprobs, rollout_logprobs, response_mask, kpop_threshold)
    raise ValueError(f"correction={correction!r} is not one of {', '.join(CORRECTIONS)}")
