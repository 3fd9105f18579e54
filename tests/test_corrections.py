"""Hand-computed values for each correction's weights and masks, and for the objectives beyond
plain PPO (GSPO, CISPO, dual clip, the online IcePop form, the KL term)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import t64

from icepop.algo import PolicyLossOptions, correction_weights, pg_loss
from icepop.algo.corrections import binary_kl

LN = math.log


def weights(
    correction: str,
    deltas: list[list[float]],
    mask: list[list[bool]] | None = None,
    *,
    old: list[list[float]] | None = None,
    lo: float = 0.5,
    hi: float = 5.0,
    phi: float = 0.05,
):
    """Run a correction on log-ratios Δ (ℓ_old = old or 0, ℓ_inf = ℓ_old − Δ)."""
    old_t = t64(old) if old is not None else torch.zeros(len(deltas), len(deltas[0]), dtype=torch.float64)
    inf_t = old_t - t64(deltas)
    mask_t = torch.ones(old_t.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return correction_weights(
        correction, old_t, inf_t, mask_t, ratio_low=lo, ratio_high=hi, kpop_threshold=phi
    )


def test_none_keeps_every_finite_token_with_weight_one() -> None:
    c = weights("none", [[LN(0.01), LN(100.0), -math.inf]])
    assert c.weight.tolist() == [[1.0, 1.0, 0.0]]
    assert c.low.tolist() == [[False, False, True]]


def test_tis_clamps_only_the_high_side() -> None:
    # k = [0.1, 1.5, 7, +inf] with C = 2 ⇒ [0.1, 1.5, 2, 2]; nothing masked.
    c = weights("tis", [[LN(0.1), LN(1.5), LN(7.0), math.inf]], hi=2.0)
    torch.testing.assert_close(c.weight, t64([[0.1, 1.5, 2.0, 2.0]]))
    assert c.keep.all() and not c.high.any()


def test_token_mis_masks_only_above_the_cap() -> None:
    # k = [0.1, 2, 2.0001] with C = 2 ⇒ [0.1, 2, 0] (bound inclusive)
    c = weights("token-mis", [[LN(0.1), LN(2.0), LN(2.0001)]], hi=2.0)
    torch.testing.assert_close(c.weight, t64([[0.1, 2.0, 0.0]]))
    assert c.high.tolist() == [[False, False, True]]


def test_seq_tis_uses_the_product_of_ratios() -> None:
    # seq 1: Σ Δ = ln 1.2 + ln 1.5 = ln 1.8 ⇒ ρ = 1.8 on both tokens (cap 3 not reached)
    # seq 2: Σ Δ = ln 2 + ln 2 + ln 2 = ln 8 ⇒ ρ = min(8, 3) = 3; its padding stays 0
    c = weights("seq-tis", [[LN(1.2), LN(1.5), 0.0], [LN(2.0), LN(2.0), LN(2.0)]], hi=3.0)
    torch.testing.assert_close(c.weight, t64([[1.8, 1.8, 1.8], [3.0, 3.0, 3.0]]))
    c = weights("seq-tis", [[LN(1.2), LN(1.5), 99.0]], [[True, True, False]], hi=3.0)
    torch.testing.assert_close(c.weight, t64([[1.8, 1.8, 0.0]]))


def test_seq_mis_keeps_or_drops_whole_sequences() -> None:
    # seq 1: ρ = 1.8 ≤ 3 kept with weight 1.8; seq 2: ρ = 8 > 3 dropped whole (high)
    c = weights("seq-mis", [[LN(1.2), LN(1.5)], [LN(4.0), LN(2.0)]], hi=3.0)
    torch.testing.assert_close(c.weight, t64([[1.8, 1.8], [0.0, 0.0]]))
    assert c.high.tolist() == [[False, False], [True, True]]


def test_seq_ratio_survives_overflowing_sums() -> None:
    # 400 tokens of Δ = 2: exp(800) overflows float64, but the sequence is masked, not NaN.
    c = weights("seq-mis", [[2.0] * 400], hi=3.0)
    assert torch.equal(c.weight, torch.zeros(1, 400, dtype=torch.float64))
    c = weights("seq-tis", [[2.0] * 400], hi=3.0)
    torch.testing.assert_close(c.weight, torch.full((1, 400), 3.0, dtype=torch.float64))


def test_geo_mask_gates_on_the_geometric_mean_and_weighs_tokens() -> None:
    # seq 1: Δ = [ln 4, ln 0.5] ⇒ geometric mean √2 = 1.414 ∈ [0.5, 2] ⇒ kept, token weights [4, 0.5]
    # seq 2: Δ = [ln 3, ln 3] ⇒ geometric mean 3 > 2 ⇒ dropped (high)
    # seq 3: Δ = [ln 0.2, ln 1] ⇒ √0.2 = 0.447 < 0.5 ⇒ dropped (low)
    c = weights("geo-mask", [[LN(4.0), LN(0.5)], [LN(3.0), LN(3.0)], [LN(0.2), 0.0]], lo=0.5, hi=2.0)
    torch.testing.assert_close(c.weight, t64([[4.0, 0.5], [0.0, 0.0], [0.0, 0.0]]))
    assert c.high.tolist() == [[False, False], [True, True], [False, False]]
    assert c.low.tolist() == [[False, False], [False, False], [True, True]]


def test_binary_kl_by_hand() -> None:
    # D_B(0.25 ‖ 0.5) = 0.25 ln 0.5 + 0.75 ln 1.5 = −0.17328680 + 0.30409883 = 0.13081204
    assert binary_kl(t64(0.25), t64(0.5)).item() == pytest.approx(0.13081204, abs=1e-8)
    assert binary_kl(t64(0.3), t64(0.3)).item() == 0.0


def test_kpop_region_adapts_to_token_probability() -> None:
    # Same ratio k = 2 at two probability levels:
    #   q = 0.01, p = 0.02: D_B(p‖q) = 0.02 ln 2 + 0.98 ln(0.98/0.99) = 0.01386294 − 0.00995033 = 0.00391
    #                       D_B(q‖p) = 0.01 ln 0.5 + 0.99 ln(0.99/0.98) = −0.00693147 + 0.01005087 = 0.00312
    #                       max 0.0039 ≤ φ = 0.05 ⇒ kept, weight 2
    #   q = 0.4,  p = 0.8:  D_B(p‖q) = 0.8 ln 2 + 0.2 ln(0.2/0.6) = 0.55451774 − 0.21972246 = 0.335 > φ
    #                       ⇒ masked (high)
    c = weights("kpop", [[LN(2.0), LN(2.0)]], old=[[LN(0.02), LN(0.8)]], phi=0.05)
    torch.testing.assert_close(c.weight, t64([[2.0, 0.0]]))
    assert c.high.tolist() == [[False, True]] and not c.low.any()
    # p = 0.4, q = 0.8 (k = 0.5) is rejected on the low side.
    c = weights("kpop", [[LN(0.5)]], old=[[LN(0.4)]], phi=0.05)
    assert c.low.tolist() == [[True]] and c.weight.item() == 0.0


def test_kpop_clamps_certain_tokens() -> None:
    # p = q = 1 (ℓ = 0): clamped to 1 − 1e-8 on both sides, D_B = 0 ⇒ kept with weight 1, no NaN.
    c = weights("kpop", [[0.0]], old=[[0.0]])
    assert c.weight.item() == 1.0


def test_unknown_correction_is_rejected() -> None:
    with pytest.raises(ValueError, match="correction='icepop2'"):
        weights("icepop2", [[0.0]])


def one_token(objective: str = "ppo", **kwargs):
    lp = t64([[kwargs.pop("lp", -1.0)]], grad=True)
    loss, m, _ = pg_loss(
        lp,
        t64([[-1.0]]),
        t64([[kwargs.pop("inf", -1.0)]]),
        t64([[kwargs.pop("adv", 1.0)]]),
        torch.ones(1, 1, dtype=torch.bool),
        PolicyLossOptions(objective=objective, **kwargs),
    )
    loss.backward()
    return loss.item(), lp.grad.item(), m


def test_dual_clip_caps_negative_advantages() -> None:
    # r = 5, A = −1, ε = 0.2: PPO loss max(5, 1.2) = 5; dual clip c = 3 caps it at −c·A = 3, no gradient.
    loss, grad, _ = one_token(lp=-1.0 + LN(5.0), adv=-1.0, dual_clip=3.0, clip_high=0.2)
    assert loss == pytest.approx(3.0) and grad == 0.0
    # Positive advantages are untouched: r = 5, A = 1 ⇒ −min(5, 1.2) = −1.2
    loss, _, _ = one_token(lp=-1.0 + LN(5.0), adv=1.0, dual_clip=3.0, clip_high=0.2)
    assert loss == pytest.approx(-1.2)


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    # r = 1.5, A = 1, ε_high = 0.2: PPO would give no gradient; CISPO's weight sg(clip(r)) = 1.2
    # ⇒ loss value −1.2·1 and gradient −1.2 (= −sg(r̂)·A).
    loss, grad, m = one_token("cispo", lp=-1.0 + LN(1.5), clip_high=0.2)
    assert loss == pytest.approx(-1.2) and grad == pytest.approx(-1.2)
    assert m["actor/pg_clipfrac"].item() == 1.0


def test_gspo_uses_one_length_normalised_ratio_per_sequence() -> None:
    # ℓ_θ − ℓ_old = [ln 2, 0] ⇒ s = exp((ln 2 + 0)/2) = √2 = 1.41421356, beyond 1 + ε = 1.2.
    # A = −1: loss per token max(−A·s, −A·1.2) = √2 (unclipped branch), token-mean √2;
    # ∂/∂ℓ_θ,t = (1/2)·(−A)·s = 0.70710678 for both tokens (gradient of s_i,t = sg(s)·exp(ℓ − sg ℓ)).
    lp = t64([[-1.0 + LN(2.0), -1.0]], grad=True)
    loss, _, _ = pg_loss(
        lp,
        t64([[-1.0, -1.0]]),
        t64([[-1.0, -1.0]]),
        t64([[-1.0, -1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        PolicyLossOptions(objective="gspo", clip_high=0.2),
    )
    loss.backward()
    assert loss.item() == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(lp.grad, t64([[0.70710678, 0.70710678]]))


def test_online_icepop_masks_on_the_current_policy_without_clipping() -> None:
    # k = exp(ℓ_θ − ℓ_inf): token 1 k = e^{0.7} = 2.01375 ∈ [0.5, 5] ⇒ loss −k·A = −2.01375, grad −2.01375
    # (no PPO clip, although r = exp(ℓ_θ − ℓ_old) = 2.01 ≫ 1.28); token 2 k = e^{2} = 7.39 > 5 ⇒ masked.
    lp = t64([[-0.3, 1.0]], grad=True)
    loss, m, _ = pg_loss(
        lp,
        t64([[-1.0, -1.0]]),
        t64([[-1.0, -1.0]]),
        t64([[1.0, 1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        PolicyLossOptions(correction="icepop-online"),
    )
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.7) / 2)
    torch.testing.assert_close(lp.grad, t64([[-math.exp(0.7) / 2, 0.0]]))
    assert m["icepop/mask_frac_high"].item() == 0.5


def test_kl_term_is_added_outside_the_mask() -> None:
    # Token 1 is masked by IcePop (k = 12.18) but still pays the KL penalty.
    # x = ℓ_θ − ℓ_ref = [0.5, 0]; k3 = e^{−0.5} + 0.5 − 1 = 0.10653066; k1 = 0.5
    lp = t64([[-1.0, -1.0]], grad=True)
    common = (t64([[-1.0, -1.0]]), t64([[-3.5, -1.0]]), t64([[0.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool))
    ref = t64([[-1.5, -1.0]])
    loss, m, _ = pg_loss(lp, *common, PolicyLossOptions(kl_coef=0.1, kl_estimator="k3"), ref_logprobs=ref)
    loss.backward()
    # L = 0.1·(0.10653066 + 0)/2; ∂/∂ℓ_θ,1 = 0.1·(1 − e^{−0.5})/2 = 0.01967347
    assert loss.item() == pytest.approx(0.1 * (math.exp(-0.5) - 0.5) / 2)
    torch.testing.assert_close(lp.grad, t64([[0.1 * (1 - math.exp(-0.5)) / 2, 0.0]]))
    assert m["actor/kl"].item() == pytest.approx((math.exp(-0.5) - 0.5) / 2)


def test_pg_loss_returns_the_tokens_it_kept() -> None:
    # IcePop [0.5, 5]: k = exp(ℓ_old − ℓ_inf) = [1, 0.2, 12.2] ⇒ kept, masked low, masked high; the last
    # position is padding, never kept whatever its ratio.
    old = t64([[-1.0, -1.0, -1.0, -1.0]])
    inf = t64([[-1.0, -1.0 + LN(5.0), -1.0 - 2.5, -1.0]])
    mask = torch.tensor([[True, True, True, False]])
    result = pg_loss(old.clone().requires_grad_(), old, inf, t64([[1.0] * 4]), mask)
    assert result.keep.tolist() == [[True, False, False, False]]
    assert result.keep.tolist() == PolicyLossOptions().correction_weights(old, inf, mask).keep.tolist()
