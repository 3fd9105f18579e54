"""The corrections of 2025-26 against the peers' own arithmetic, transcribed (not imported) from the code
read for docs/algorithm.md §10, on the same float64 inputs:

- prime-rl 559b4477, src/prime_rl/trainer/rl/loss.py `default_loss_fn` (DPPO-Binary-TV, anchor rollout)
- sail-sg/Stable-RL c6af1d11 (the DPPO authors), verl/trainer/ppo/core_algos.py
  `_compute_token_mask_for_policy_loss` and `compute_policy_loss_with_mask` (dppo_binary_{tv,kl} anchor
  rollout, *_recompute anchor old)
- verl-project/verl 1dda039b, verl/trainer/ppo/core_algos.py `compute_policy_loss_dppo_{tv,kl}` (anchor
  old) and verl/trainer/ppo/rollout_corr_helper.py `compute_rollout_rejection_mask` ("seq_max_k2", TRM)
- huggingface/trl f2cd5771, trl/trainer/grpo_trainer.py `get_off_policy_mask` and the "grpo" loss (OPSM)
- THUDM/slime 624b824a, slime/utils/ppo_utils.py `compute_opsm_mask` (OPSM)
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from icepop.algo import PolicyLossOptions, pg_loss

DELTA = {"dppo-tv": 0.05, "dppo-kl": 0.01, "opsm": 0.05, "trm": 1.0}  # strict enough to mask a fair share


def batch(seed: int, mismatch: float = 0.5) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, cols = 6, 9
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3 - 1e-3
    return {  # log-probs, so ≤ 0 (icepop reads a positive ℓ as probability 1; the peers take e^ℓ > 1)
        "lp": (old + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).clamp(max=-1e-3),
        "old": old,
        "inf": (old + mismatch * torch.randn(rows, cols, generator=g, dtype=torch.float64)).clamp(max=-1e-3),
        "adv": torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).clone(),
        "mask": torch.cat(
            [torch.ones(rows, 1, dtype=torch.bool), torch.rand(rows, cols - 1, generator=g) < 0.8], 1
        ),
    }


def icepop(b: dict[str, Tensor], correction: str, **options) -> tuple[float, Tensor, Tensor]:
    """icepop's loss, gradient and keep mask with the correction's δ from DELTA."""
    field = f"{correction.replace('-', '_')}_threshold"
    opts = PolicyLossOptions(correction=correction, **{field: DELTA[correction], **options})
    lp = b["lp"].clone().requires_grad_(True)
    loss, _, keep = pg_loss(lp, b["old"], b["inf"], b["adv"], b["mask"], opts)
    loss.backward()
    return loss.item(), lp.grad, keep


SEEDS = range(5)


@pytest.mark.parametrize(("correction", "anchor"), [
    ("dppo-tv", "rollout"), ("dppo-tv", "old"), ("dppo-kl", "rollout"), ("dppo-kl", "old"),
    ("opsm", "rollout"), ("opsm", "old"), ("trm", "rollout"),  # the pairs compared with a peer below
])  # fmt: skip
def test_the_batches_mask_a_fair_share(correction: str, anchor: str) -> None:
    """The comparisons below are not vacuous: on most seeds the correction masks some tokens, not all."""
    mixed = 0
    for seed in SEEDS:
        _, _, keep = icepop(b := batch(seed), correction, anchor=anchor)
        mixed += 0 < int(keep.sum()) < int(b["mask"].sum())
    assert mixed >= 3


# ---- DPPO
def prime_rl_default_loss(
    trainer: Tensor, inference: Tensor, adv: Tensor, loss_mask: Tensor, low: float, high: float
):
    """prime-rl's default loss with adv_tau = 1, kl_tau = 0: −Σ keep·A·π_θ/π_inf, the mask on p_θ − p_inf
    by the sign of A (A > 0: > high; else: < −low). Returns the summed loss and the keep mask."""
    ratio = torch.exp(trainer - inference)
    probs_diff = torch.exp(trainer) - torch.exp(inference)
    invalid = torch.where(adv > 0, probs_diff > high, probs_diff < -low)
    keep = loss_mask & ~invalid
    return (-(keep * adv * ratio)).sum(), keep


@pytest.mark.parametrize("seed", SEEDS)
def test_dppo_tv_is_prime_rls_default_loss(seed: int) -> None:
    # prime-rl divides the sum by the number of loss tokens: icepop's token-mean. Same loss, same gradient.
    b = batch(seed)
    loss, grad, keep = icepop(b, "dppo-tv")
    lp = b["lp"].clone().requires_grad_(True)
    total, peer_keep = prime_rl_default_loss(
        lp, b["inf"], b["adv"], b["mask"], DELTA["dppo-tv"], DELTA["dppo-tv"]
    )
    peer = total / b["mask"].sum()
    peer.backward()
    assert torch.equal(keep, peer_keep)
    assert loss == pytest.approx(peer.item(), abs=1e-12, rel=1e-12)
    torch.testing.assert_close(grad, lp.grad, atol=1e-12, rtol=1e-12)


def stable_rl_valid(
    mode: str, rollout: Tensor, old: Tensor, lp: Tensor, adv: Tensor, low: float, high: float
) -> Tensor:
    """The DPPO authors' mask: invalid on the positive side for A > 0, on the negative side otherwise."""
    prob, old_prob, rollout_prob = torch.exp(lp), torch.exp(old), torch.exp(rollout)
    anchor, anchor_prob = (old, old_prob) if mode.endswith("_recompute") else (rollout, rollout_prob)
    if mode.startswith("dppo_binary_tv"):
        bad_up, bad_down = prob - anchor_prob > high, prob - anchor_prob < -low
    else:
        kl = anchor_prob * (anchor - lp) + (1 - anchor_prob) * torch.log(
            (1.0 - anchor_prob + 1e-8) / (1.0 - prob + 1e-8)
        )
        bad_up, bad_down = (kl > high) & (prob > anchor_prob), (kl > low) & (prob < anchor_prob)
    return ~torch.where(adv > 0, bad_up, bad_down)


def stable_rl_loss(
    lp: Tensor, rollout: Tensor, adv: Tensor, valid: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """−A·sg(min(π_θ/π_inf, C))·valid·ℓ_θ, token-mean: the value differs from icepop's, the gradient not."""
    ratio = torch.exp(torch.clamp(lp - rollout, max=20.0)).clamp(max=cap).detach()
    per_token = -adv * ratio * valid.double() * lp
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("correction", "mode", "anchor"), [
    ("dppo-tv", "dppo_binary_tv", "rollout"), ("dppo-tv", "dppo_binary_tv_recompute", "old"),
    ("dppo-kl", "dppo_binary_kl", "rollout"), ("dppo-kl", "dppo_binary_kl_recompute", "old"),
])  # fmt: skip
def test_dppo_is_the_authors_mask_and_gradient(seed: int, correction: str, mode: str, anchor: str) -> None:
    # Their truncation C (clip_ratio_c) is not reached here: icepop has none (docs/algorithm.md §10.1).
    b = batch(seed)
    _, grad, keep = icepop(b, correction, anchor=anchor)
    valid = stable_rl_valid(mode, b["inf"], b["old"], b["lp"], b["adv"], DELTA[correction], DELTA[correction])
    assert torch.equal(keep, valid & b["mask"])
    assert float(torch.exp(b["lp"] - b["inf"])[b["mask"]].max()) < 1e4
    lp = b["lp"].clone().requires_grad_(True)
    stable_rl_loss(lp, b["inf"], b["adv"], valid, b["mask"], cap=1e4).backward()
    torch.testing.assert_close(grad, lp.grad, atol=1e-12, rtol=1e-12)


def verl_dppo(
    kind: str, old: Tensor, lp: Tensor, adv: Tensor, mask: Tensor, low: float, high: float, cap: float
):
    """verl's dppo_tv / dppo_kl: the region and the ratio are both against old_log_prob; token-mean."""
    ratio = torch.exp(torch.clamp(lp - old, min=-20.0, max=20.0)).clamp(max=cap).detach()
    prob, old_prob = torch.exp(lp), torch.exp(old)
    if kind == "tv":
        valid_up, valid_down = prob - old_prob <= high, prob - old_prob >= -low
    else:
        kl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        valid_up, valid_down = (kl <= high) | (prob <= old_prob), (kl <= low) | (prob >= old_prob)
    valid = torch.where(adv > 0, valid_up, valid_down).detach()
    loss = ((-adv * ratio * lp * valid.double()) * mask).sum() / mask.sum()
    return loss, valid


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("correction", ["dppo-tv", "dppo-kl"])
def test_dppo_anchored_to_old_is_verls_mask_with_the_weight_to_the_sampler(
    seed: int, correction: str
) -> None:
    # Same mask as verl's; verl weighs a kept token by π_θ/π_old, icepop by π_θ/π_inf: the gradients
    # agree where ℓ_old = ℓ_inf and differ by the factor k = π_old/π_inf otherwise.
    for mismatch in (0.0, 0.5):
        b = batch(seed, mismatch)
        _, grad, keep = icepop(b, correction, anchor="old")
        lp = b["lp"].clone().requires_grad_(True)
        loss, valid = verl_dppo(
            correction[-2:], b["old"], lp, b["adv"], b["mask"], DELTA[correction], DELTA[correction], 1e4
        )
        loss.backward()
        assert torch.equal(keep, valid & b["mask"])
        k = torch.exp(b["old"] - b["inf"])
        torch.testing.assert_close(grad, lp.grad * k, atol=1e-12, rtol=1e-12)
        if mismatch:
            assert not torch.allclose(grad, lp.grad)


# ---- OPSM
def trl_off_policy_mask(
    adv: Tensor, per_token_logps: Tensor, sampling: Tensor, mask: Tensor, threshold: float
):
    """TRL: keep a sequence iff A ≥ 0 or mean(ℓ_sampling − ℓ_θ) ≤ δ; (B, 1)."""
    kl = sampling - per_token_logps.detach()
    mean = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean <= threshold)).to(mask.dtype)


def trl_grpo_loss(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, keep: Tensor, eps: float) -> Tensor:
    """TRL's "grpo" loss: per-sequence token means of −min(r·A, clip(r)·A)·mask_opsm, averaged."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) * keep
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_opsm_is_trls_mask_and_loss(seed: int) -> None:
    # TRL measures against the sampling (vLLM) log-probs: anchor "rollout". With its clip ε = 0.2 and
    # the per-sequence token mean ("grpo"), loss and gradient agree.
    b = batch(seed)
    loss, grad, keep = icepop(b, "opsm", agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.2)
    adv, mask = b["adv"][:, :1], b["mask"].double()
    lp = b["lp"].clone().requires_grad_(True)
    peer_keep = trl_off_policy_mask(adv, lp, b["inf"], mask, DELTA["opsm"])
    peer = trl_grpo_loss(lp, b["old"], adv, mask, peer_keep, 0.2)
    peer.backward()
    assert torch.equal(keep, (peer_keep > 0) & b["mask"])
    assert loss == pytest.approx(peer.item(), abs=1e-12, rel=1e-12)
    torch.testing.assert_close(grad, lp.grad, atol=1e-12, rtol=1e-12)


def slime_opsm_mask(
    log_probs: list[Tensor],
    anchor: list[Tensor],
    advantages: list[Tensor],
    loss_masks: list[Tensor],
    delta: float,
):
    """slime: per sample, mask where A < 0 and mean(ℓ_anchor − ℓ_θ) over the loss mask > δ."""
    out = []
    for lp, old, adv, lm in zip(log_probs, anchor, advantages, loss_masks, strict=True):
        seq_kl = ((old - lp) * lm).sum() / torch.clamp_min(lm.sum(), 1)
        out.append(1 - ((adv < 0) & (seq_kl > delta)).float())
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("anchor", ["old", "rollout"])
def test_opsm_is_slimes_mask(seed: int, anchor: str) -> None:
    # slime anchors to the trainer's log-probs ("old"), or to the rollout's with --use-rollout-logprobs.
    b = batch(seed)
    _, _, keep = icepop(b, "opsm", anchor=anchor)
    rows = range(b["lp"].shape[0])
    reference = b["old"] if anchor == "old" else b["inf"]
    per_sample = [[x[i] for i in rows] for x in (b["lp"], reference, b["adv"], b["mask"].double())]
    peer = slime_opsm_mask(*per_sample, DELTA["opsm"])
    assert torch.equal(keep, (torch.stack(peer) > 0) & b["mask"])


# ---- TRM
def verl_seq_max_k2(log_ratio: Tensor, mask: Tensor, tau: float) -> Tensor:
    """verl's "seq_max_k2" rejection: keep a sequence iff max_t ½(log r)² ≤ τ (log r clamped to ±20)."""
    k2 = 0.5 * torch.clamp(log_ratio, min=-20.0, max=20.0) ** 2
    largest = k2.masked_fill(~mask, float("-inf")).max(dim=-1).values
    largest = torch.where(largest == float("-inf"), torch.zeros_like(largest), largest)
    return (largest <= tau)[:, None] & mask


@pytest.mark.parametrize("seed", SEEDS)
def test_trm_is_verls_seq_max_k2_with_tau_half_delta_squared(seed: int) -> None:
    # max ½(log r)² ≤ τ ⇔ max |log r| ≤ √(2τ): the same mask with τ = δ²/2. verl's decoupled mode takes
    # log r = ℓ_old − ℓ_inf (icepop at θ = θ_old), its bypass mode ℓ_θ − ℓ_inf (icepop during the update).
    b = batch(seed)
    delta = DELTA["trm"]
    opts = PolicyLossOptions(correction="trm", trm_threshold=delta)
    at_old = opts.correction_weights(b["old"], b["inf"], b["mask"])
    assert torch.equal(at_old.keep, verl_seq_max_k2(b["old"] - b["inf"], b["mask"], delta**2 / 2))
    _, _, keep = icepop(b, "trm")
    assert torch.equal(keep, verl_seq_max_k2(b["lp"] - b["inf"], b["mask"], delta**2 / 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_trm_keeps_dropped_tokens_in_the_denominator_unlike_verl(seed: int) -> None:
    # verl drops rejected tokens from the response mask, so its token-mean divides by the kept tokens;
    # icepop divides by all valid tokens (docs/algorithm.md §2): L_icepop = L_verl · N_kept / N.
    b = batch(seed)
    loss, _, keep = icepop(b, "trm", clip_low=0.2, clip_high=0.2)
    r = torch.exp(b["lp"] - b["old"])
    per_token = torch.maximum(-b["adv"] * r, -b["adv"] * r.clamp(0.8, 1.2))
    verl = (per_token * keep).sum() / keep.sum()
    assert loss == pytest.approx(
        verl.item() * float(keep.sum()) / float(b["mask"].sum()), abs=1e-12, rel=1e-12
    )
