"""An independent float64 reference of the policy loss, written token by token in plain Python.

It shares no code with icepop.algo (torch only builds test tensors): corrections, surrogates and
aggregations are re-derived from docs/algorithm.md with `math` on Python floats, and the gradient is the
analytic one,
∂L/∂ℓ_θ,t = c_t · w_t · ∂l_t/∂ℓ_θ,t, where c_t is the aggregation's coefficient of token t.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

Matrix = list[list[float]]
Mask = list[list[bool]]


@dataclass
class Reference:
    loss: float
    grad: Matrix
    weights: Matrix
    mask_frac: float


def _finite(x: float) -> bool:
    return math.isfinite(x)


def token_weight(
    correction: str, delta: float, lo: float, hi: float, phi: float, p_log: float, q_log: float
) -> float:
    """Weight of one valid token with log-ratio delta under a token-level correction."""
    if not _finite(delta):
        if correction == "tis" and delta == math.inf:
            return hi
        return 0.0
    k = math.exp(delta)
    if correction == "none":
        return 1.0
    if correction == "tis":
        return min(k, hi)
    if correction == "token-mis":
        return k if k <= hi else 0.0
    if correction in ("icepop", "icepop-online"):
        return k if lo <= k <= hi else 0.0
    if correction == "kpop":
        clamp = 1e-8
        p = min(max(math.exp(p_log), clamp), 1 - clamp)
        q = min(max(math.exp(q_log), clamp), 1 - clamp)

        def bkl(a: float, b: float) -> float:
            return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

        return k if max(bkl(p, q), bkl(q, p)) <= phi else 0.0
    raise AssertionError(correction)


def sequence_weights(correction: str, deltas: list[float], lo: float, hi: float) -> list[float]:
    """Weights of one sequence's valid tokens under a sequence-level correction."""
    if not all(_finite(d) for d in deltas):
        return [0.0] * len(deltas)
    if correction == "seq-tis":
        return [math.exp(min(sum(deltas), math.log(hi)))] * len(deltas)
    if correction == "seq-mis":
        total = sum(deltas)
        return [math.exp(total) if total <= math.log(hi) else 0.0] * len(deltas)
    if correction == "geo-mask":
        geo = math.exp(sum(deltas) / len(deltas))
        return [math.exp(d) for d in deltas] if lo <= geo <= hi else [0.0] * len(deltas)
    raise AssertionError(correction)


TRUST_REGION = {"dppo-tv": 0.15, "dppo-kl": 0.05, "opsm": 0.1, "trm": math.log(5.0)}
"""The trust-region corrections (docs/algorithm.md §10) and their default δ."""
ONLINE = ("icepop-online", "dppo-tv", "dppo-kl")


def dppo_weight(kind: str, lp: float, anchor: float, inf: float, adv: float | None, delta: float) -> float:
    """DPPO's weight π_θ/π_inf of one valid token, or 0 where its trust region masks it."""
    log_weight, drift = lp - inf, lp - anchor
    if not (_finite(log_weight) and _finite(drift)) or log_weight > math.log(sys.float_info.max):
        return 0.0
    lp, anchor = min(lp, 0.0), min(anchor, 0.0)  # a probability is at most 1
    p, pa = math.exp(lp), math.exp(anchor)
    if kind == "tv":
        up, down = p - pa > delta, p - pa < -delta
    else:
        kl = pa * (anchor - lp) + (1 - pa) * math.log((1 - pa + 1e-8) / (1 - p + 1e-8))
        up, down = kl > delta and p > pa, kl > delta and p < pa
    if adv is None:
        masked = up or down
    else:
        masked = up if adv > 0 else down
    return 0.0 if masked else math.exp(log_weight)


def trust_region_weights(
    correction: str,
    lps: list[float],
    anchors: list[float],
    olds: list[float],
    infs: list[float],
    advs: list[float] | list[None],
    delta: float,
) -> list[float]:
    """Weights of one sequence's valid tokens under "dppo-tv", "dppo-kl", "opsm" or "trm"."""
    if correction.startswith("dppo-"):
        kind = correction.removeprefix("dppo-")
        return [dppo_weight(kind, *x, delta) for x in zip(lps, anchors, infs, advs, strict=True)]
    n = len(lps)
    if not all(
        _finite(o - i) and _finite(lp - a) for lp, a, o, i in zip(lps, anchors, olds, infs, strict=True)
    ):
        return [0.0] * n
    if correction == "opsm":
        divergence = sum(a - lp for lp, a in zip(lps, anchors, strict=True)) / n
        return [0.0 if (a is None or a < 0) and divergence > delta else 1.0 for a in advs]
    largest = max(abs(lp - a) for lp, a in zip(lps, anchors, strict=True))
    return [1.0 if largest <= delta else 0.0] * n


def reference_loss(
    logprobs: Matrix,
    old: Matrix,
    rollout: Matrix,
    adv: Matrix,
    mask: Mask,
    *,
    correction: str,
    lo: float = 0.5,
    hi: float = 5.0,
    phi: float = 0.05,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "token-mean",
    max_len: int | None = None,
    anchor: str = "rollout",
    threshold: float | None = None,
) -> Reference:
    """PPO-clip objective (or the online form) with the named correction and aggregation; `anchor`
    and `threshold` (None: the default δ) are those of the trust-region corrections."""
    rows, cols = len(logprobs), len(logprobs[0])
    weights = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        valid = [t for t in range(cols) if mask[i][t]]
        numer = logprobs if correction == "icepop-online" else old
        deltas = [numer[i][t] - rollout[i][t] for t in valid]
        if correction in TRUST_REGION:
            delta = TRUST_REGION[correction] if threshold is None else threshold
            anchors = rollout if anchor == "rollout" else old
            cut = [[m[i][t] for t in valid] for m in (logprobs, anchors, old, rollout, adv)]
            ws = trust_region_weights(correction, *cut, delta) if valid else []
        elif correction in ("seq-tis", "seq-mis", "geo-mask"):
            ws = sequence_weights(correction, deltas, lo, hi) if valid else []
        else:
            ws = [
                token_weight(correction, d, lo, hi, phi, old[i][t], rollout[i][t])
                for d, t in zip(deltas, valid, strict=True)
            ]
        for t, w in zip(valid, ws, strict=True):
            weights[i][t] = w

    # Aggregation coefficients c_t: L = Σ_t c_t · l_t.
    n_tokens = sum(sum(row) for row in mask)
    n_seqs = sum(1 for row in mask if any(row))
    coef = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        n_i = sum(mask[i])
        for t in range(cols):
            if not mask[i][t]:
                continue
            if agg == "token-mean":
                coef[i][t] = 1.0 / max(n_tokens, 1)
            elif agg == "seq-mean-token-mean":
                coef[i][t] = 1.0 / (max(n_seqs, 1) * n_i)
            elif agg == "seq-mean-token-sum":
                coef[i][t] = 1.0 / max(n_seqs, 1)
            else:
                coef[i][t] = 1.0 / (max(n_seqs, 1) * (max_len or cols))

    loss, grad, masked = 0.0, [[0.0] * cols for _ in range(rows)], 0
    for i in range(rows):
        for t in range(cols):
            if not mask[i][t]:
                continue
            w = weights[i][t]
            if w == 0.0:
                masked += 1
                continue
            a = adv[i][t]
            if correction in ONLINE:
                value, dvalue = -a, -a  # l = −A·exp(ℓ_θ − sg ℓ_θ): value −A, derivative −A
            else:
                r = math.exp(logprobs[i][t] - old[i][t])
                unclipped, clipped = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
                value = max(unclipped, clipped)
                dvalue = -a * r if unclipped >= clipped else 0.0
            loss += coef[i][t] * w * value
            grad[i][t] = coef[i][t] * w * dvalue
    return Reference(loss, grad, weights, masked / max(n_tokens, 1))


def t64(values: object, grad: bool = False) -> torch.Tensor:
    """A float64 tensor (a leaf requiring grad if asked) from nested lists or a tensor."""
    return torch.as_tensor(values, dtype=torch.float64).clone().requires_grad_(grad)
