"""The GRPO policy loss with IcePop and its neighbours: the public entry points.

`policy_loss` is the stable, documented signature (docs/algorithm.md §2). `pg_loss` is the same loss with
every option (objective, dual clip, KPop threshold, KL term, global sequence count), which the
trainer calls with one `PolicyLossOptions` built and checked once. Both are pure functions of
tensors: [B, T] in, a scalar and a dict of 0-dim metric tensors out.

Key design choice: the correction decides per token whether it is *active* (kept). Inactive and
padded positions are replaced by finite constants (selected, never multiplied) before any ratio is
formed, so their gradient is exactly 0 whatever their log-probs or advantages hold — NaN included —
while they still count in the aggregation's denominator (docs/algorithm.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from icepop.algo.aggregation import AGGREGATIONS, Count, aggregate
from icepop.algo.corrections import CORRECTIONS, ONLINE_CORRECTIONS, Correction, correction_weights, log_ratio
from icepop.algo.kl import KL_ESTIMATORS, kl_estimate
from icepop.algo.metrics import (
    Metrics,
    correction_metrics,
    masked_mean,
    mismatch_metrics,
    staleness_metrics,
)
from icepop.algo.surrogates import OBJECTIVES, cispo, gspo_ratio, ppo_clip
from icepop.algo.trust_region import ANCHORS, THRESHOLDS

KPOP_THRESHOLD = 0.05
"""Default φ for "kpop". Our choice, not the KPop blog's: at q = 0.01 it accepts about the same
ratios as IcePop's β = 5, and it is markedly stricter on mid- and high-probability tokens."""


@dataclass(frozen=True)
class PolicyLossOptions:
    """The loss's hyper-parameters, checked once when built (ValueError names the field)."""

    correction: str = "icepop"
    """Train/inference correction, one of `CORRECTIONS`; "icepop" is the paper's."""
    ratio_low: float = 0.5
    """α: lower bound of the kept ratio band ("icepop", "icepop-online", "geo-mask")."""
    ratio_high: float = 5.0
    """β for the band corrections; the cap C for "tis", "token-mis", "seq-tis", "seq-mis"."""
    kpop_threshold: float = KPOP_THRESHOLD
    """φ: largest symmetric binary KL a token may have under "kpop"."""
    anchor: str = "rollout"
    """What "dppo-tv", "dppo-kl", "opsm" and "trm" measure π_θ against: "rollout" (π_inf, where the
    mismatch lives) or "old" (π_old, the update drift alone); docs/algorithm.md §10."""
    dppo_tv_threshold: float = THRESHOLDS["dppo-tv"]
    """δ of "dppo-tv": largest move π_θ − π_anchor of the sampled token's probability, on A's side."""
    dppo_kl_threshold: float = THRESHOLDS["dppo-kl"]
    """δ of "dppo-kl": largest binary KL(Bern(π_anchor) ‖ Bern(π_θ)) of the sampled token, A's side."""
    opsm_threshold: float = THRESHOLDS["opsm"]
    """δ of "opsm": largest mean log(π_anchor/π_θ) over a sequence with negative advantage."""
    trm_threshold: float = THRESHOLDS["trm"]
    """δ of "trm": largest |log(π_θ/π_anchor)| any token of a kept sequence may have (default ln 5)."""
    objective: str = "ppo"
    """"ppo" (clipped token ratio), "gspo" (clipped sequence ratio) or "cispo" (clipped IS weight)."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_high: float = 0.28
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO clip-higher)."""
    dual_clip: float | None = None
    """c > 1 caps the loss of tokens with A < 0 at −c·A (dual-clip PPO); None turns it off."""
    agg: str = "token-mean"
    """Loss aggregation, one of `AGGREGATIONS`; the paper uses "seq-mean-token-mean"."""
    max_response_length: int | None = None
    """L_max of "seq-mean-token-sum-norm"; None uses the tensors' T."""
    kl_coef: float = 0.0
    """γ: weight of KL(π_θ ‖ π_ref), added per valid token outside the correction's mask."""
    kl_estimator: str = "k3"
    """KL estimator, one of `KL_ESTIMATORS`."""

    def __post_init__(self) -> None:
        choices = {"correction": CORRECTIONS, "objective": OBJECTIVES, "agg": AGGREGATIONS}
        for name, allowed in {**choices, "kl_estimator": KL_ESTIMATORS}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.ratio_low < self.ratio_high:
            raise ValueError(
                "ratio_low must satisfy 0 <= ratio_low < ratio_high; "
                f"got ratio_low={self.ratio_low}, ratio_high={self.ratio_high}"
            )
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), e.g. 0.2; got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, e.g. 0.28; got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None; got {self.dual_clip}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor={self.anchor!r} is not one of {', '.join(ANCHORS)}")
        given = {"kpop": self.kpop_threshold, **self.thresholds()}
        for correction, value in given.items():
            if value <= 0.0:
                default = {"kpop": KPOP_THRESHOLD, **THRESHOLDS}[correction]
                name = f"{correction.replace('-', '_')}_threshold"
                raise ValueError(f"{name} must be > 0, e.g. {default:.4g}; got {value}")
        if self.correction in ONLINE_CORRECTIONS and self.objective != "ppo":
            raise ValueError(
                f"objective={self.objective!r} cannot combine with correction={self.correction!r}, "
                "which is an objective of its own (no clip); leave objective='ppo'"
            )
        if self.max_response_length is not None and self.max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1 or None; got {self.max_response_length}")

    def correction_weights(
        self,
        numerator: Tensor,
        rollout_logprobs: Tensor,
        response_mask: Tensor,
        *,
        logprobs: Tensor | None = None,
        advantages: Tensor | None = None,
    ) -> Correction:
        """This correction's per-token weights and masks (numerator: ℓ_old, or ℓ_θ for "icepop-online").

        The trust-region corrections also read the current ℓ_θ (`logprobs`, detached; None: θ = θ_old)
        and the advantages' signs (None: masked on both sides, an upper bound on the masked share)."""
        return correction_weights(
            self.correction, numerator, rollout_logprobs, response_mask,
            ratio_low=self.ratio_low, ratio_high=self.ratio_high, kpop_threshold=self.kpop_threshold,
            logprobs=logprobs, advantages=advantages, anchor=self.anchor,
            threshold=self.thresholds().get(self.correction),
        )  # fmt: skip

    def thresholds(self) -> dict[str, float]:
        """δ of each trust-region correction, by correction name (trust_region.THRESHOLDS' keys)."""
        return {
            "dppo-tv": self.dppo_tv_threshold,
            "dppo-kl": self.dppo_kl_threshold,
            "opsm": self.opsm_threshold,
            "trm": self.trm_threshold,
        }


class PolicyLoss(NamedTuple):
    """What `pg_loss` returns."""

    loss: Tensor
    """The scalar loss L = −J (with the global denominators: micro-batch losses sum to the batch's)."""
    metrics: Metrics
    """0-dim tensors: mismatch, mask fractions, clip fraction, … (docs/telemetry.md lists them)."""
    keep: Tensor
    """[B, T] bool: the valid tokens the correction kept (False for masked tokens and padding)."""


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    global_token_count: Count | None = None,
    **options: Any,
) -> tuple[Tensor, Metrics]:
    """IcePop-GRPO loss L = −J (arXiv 2510.18855 Eq. 1) with PPO clipping.

    Tensors are [B, T]: ℓ_θ (with grad), ℓ_old and ℓ_inf (constants), per-token advantages, and a
    bool response mask. `options` are `PolicyLossOptions` fields by keyword (correction="icepop",
    ratio_low=0.5, ...), whose defaults are theirs; `global_token_count` replaces the local Σ mask in
    "token-mean" so micro-batch losses sum to the full-batch loss.
    """
    result = pg_loss(
        logprobs,
        old_logprobs,
        rollout_logprobs,
        advantages,
        response_mask,
        PolicyLossOptions(**options),
        global_token_count=global_token_count,
    )
    return result.loss, result.metrics


def pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    options: PolicyLossOptions = PolicyLossOptions(),
    *,
    global_token_count: Count | None = None,
    global_seq_count: Count | None = None,
    ref_logprobs: Tensor | None = None,
) -> PolicyLoss:
    """`policy_loss` with every option, also returning the correction's keep mask; global counts are
    those of the whole batch (all ranks and micro-batches): tokens for "token-mean", sequences S for
    the "seq-mean-*" aggregations.

    "icepop-online" is a whole objective (INTELLECT-3 form): k = exp(ℓ_θ − ℓ_inf), the mask on
    sg(k), the gradient through k, no PPO clip; so are "dppo-tv" and "dppo-kl" with DPPO's masks.
    "opsm" and "trm" mask sequences on top of the chosen objective. ref_logprobs: when kl_coef ≠ 0."""
    tensors = {"old_logprobs": old_logprobs, "rollout_logprobs": rollout_logprobs, "advantages": advantages}
    _check_tensors(logprobs, {**tensors, "ref_logprobs": ref_logprobs}, response_mask)
    if options.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={options.kl_coef} needs ref_logprobs (the reference policy's log-probs)")
    online = options.correction in ONLINE_CORRECTIONS
    # The mismatch corrections never look at ℓ_θ; the online variant and the trust-region corrections
    # (trust_region.py) measure it by definition, detached.
    numerator = logprobs.detach() if options.correction == "icepop-online" else old_logprobs
    corr = options.correction_weights(
        numerator, rollout_logprobs, response_mask, logprobs=logprobs.detach(), advantages=advantages
    )
    active = corr.keep
    zero = torch.zeros_like(logprobs)
    lp = torch.where(active, logprobs, zero)
    old = torch.where(active, old_logprobs.detach().to(lp.dtype), zero)
    adv = torch.where(active, advantages.detach().to(lp.dtype), zero)
    token_loss, clipped = _surrogate(options, lp, old, adv, active)
    token_loss = torch.where(active, corr.weight.to(token_loss.dtype) * token_loss, zero)
    weighed = logprobs.detach() if online else old_logprobs  # the ratio k = exp(· − ℓ_inf) the metrics show

    metrics = {
        **mismatch_metrics(old_logprobs, rollout_logprobs, response_mask),
        **correction_metrics(corr, log_ratio(weighed, rollout_logprobs, response_mask), response_mask),
        "actor/pg_clipfrac": masked_mean(clipped.to(zero.dtype), active),
        "actor/ppo_kl": masked_mean(old - lp, active),
        "policy/logp_mean": masked_mean(lp, active),
        **staleness_metrics(logprobs, old_logprobs, rollout_logprobs, response_mask),
    }
    counts = {"global_token_count": global_token_count, "global_seq_count": global_seq_count,
              "max_response_length": options.max_response_length}  # fmt: skip
    pg = aggregate(token_loss, response_mask, options.agg, **counts)
    loss = pg
    if options.kl_coef != 0.0 and ref_logprobs is not None:  # outside the correction's mask (§2)
        policy = torch.where(response_mask, logprobs, zero)
        kl = kl_estimate(policy, torch.where(response_mask, ref_logprobs, zero), options.kl_estimator)
        kl_term = options.kl_coef * torch.where(response_mask, kl, zero)
        loss = pg + aggregate(kl_term, response_mask, options.agg, **counts)
        metrics["actor/kl"] = masked_mean(kl, response_mask)
    metrics["actor/pg_loss"] = pg.detach().double()  # the policy-gradient part, without the KL term
    return PolicyLoss(loss, metrics, active)


def _surrogate(
    options: PolicyLossOptions, lp: Tensor, old: Tensor, adv: Tensor, active: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token loss before the correction weight, and where clipping set it; [B, T] each."""
    eps_low, eps_high = options.clip_low, options.clip_high
    ratio = torch.exp(lp - old)
    if options.correction in ONLINE_CORRECTIONS:
        # Value −A (the weight k multiplies outside), gradient −A·∇ℓ_θ: with the weight, k·A·∇ℓ_θ.
        return -adv * torch.exp(lp - lp.detach()), torch.zeros_like(active)
    if options.objective == "ppo":
        return ppo_clip(ratio, adv, eps_low, eps_high, options.dual_clip)
    if options.objective == "gspo":
        return ppo_clip(gspo_ratio(lp, old, active), adv, eps_low, eps_high, options.dual_clip)
    return cispo(ratio, lp, adv, eps_low, eps_high), (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)


def _check_tensors(logprobs: Tensor, others: dict[str, Tensor | None], response_mask: Tensor) -> None:
    """Raise ValueError unless every tensor is [B, T] like `logprobs` and the mask is bool."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    for name, tensor in {**others, "response_mask": response_mask}.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {tuple(logprobs.shape)}; got {tuple(tensor.shape)}"
            )
    if response_mask.dtype != torch.bool:
        raise ValueError(
            f"response_mask must be a bool tensor (True = response token); got {response_mask.dtype}"
        )
