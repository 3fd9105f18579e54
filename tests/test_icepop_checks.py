"""The checks of docs/algorithm.md §7, one test each, with the arithmetic in comments.

Defaults for these checks: α = 0.5, β = 5.0, ε_low = ε_high = 0.2, KL off, float64, tol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import t64

from icepop.algo import PolicyLossOptions, pg_loss, policy_loss

TOL = 1e-6
EPS = {"clip_low": 0.2, "clip_high": 0.2}


def loss_and_grad(lp, old, inf, adv, mask=None, **kwargs):
    """Run policy_loss on float64 copies; return (loss, ∂L/∂ℓ_θ, metrics as floats)."""
    logprobs = t64(lp, grad=True)
    mask = torch.ones(logprobs.shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    options = {**EPS, **kwargs}
    loss, metrics = policy_loss(logprobs, t64(old), t64(inf), t64(adv), mask, **options)
    loss.backward()
    return loss.item(), logprobs.grad, {k: v.item() for k, v in metrics.items()}


# ---- 1. Reduction: ℓ_inf = ℓ_old ⇒ identical to vanilla GRPO, for every aggregation.
@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_1_no_mismatch_reduces_to_vanilla_grpo(agg: str) -> None:
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    lp = old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)  # r spans the clip range
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.8
    ice = loss_and_grad(lp, old, old, adv, mask, agg=agg)
    vanilla = loss_and_grad(lp, old, old, adv, mask, agg=agg, correction="none")
    # k = exp(0) = 1 for every token: IcePop keeps all of them with weight 1.
    assert ice[0] == pytest.approx(vanilla[0], abs=TOL)
    torch.testing.assert_close(ice[1], vanilla[1], atol=TOL, rtol=0)
    assert ice[2]["icepop/mask_frac"] == 0.0


# ---- 2. On-policy value: ℓ_θ = ℓ_old ⇒ token-mean L = −(1/N) Σ_t M(k_t)·A_t.
def test_2_on_policy_value() -> None:
    old = [[-1.0, -2.0, -0.5, -1.5]]
    inf = [[-1.2, -0.1, -0.5, -4.0]]
    adv = [[0.5, -1.0, 2.0, 1.0]]
    # Δ = ℓ_old − ℓ_inf = [0.2, −1.9, 0, 2.5] ⇒ k = [1.2214, 0.1496 (masked), 1, 12.18 (masked)]
    # L = −(1/4)(1.2214·0.5 + 0 + 1·2 + 0) = −(0.61070138 + 2)/4 = −0.65267534
    expected = -(math.exp(0.2) * 0.5 + 2.0) / 4
    loss, _, _ = loss_and_grad(old, old, inf, adv)
    assert loss == pytest.approx(expected, abs=TOL)
    assert loss == pytest.approx(-0.65267534, abs=TOL)


# ---- 3. Reference vector.
def test_3_reference_vector() -> None:
    # Δ = −1 − [−0.5, −3.5, −0.8] = [−0.5, 2.5, −0.2] ⇒ k = [0.60653066, 12.18249396, 0.81873075]
    # token 2 has k > β = 5: masked (high). r = 1 everywhere, so no clipping.
    # L = −(1/3)(0.60653066·1 + 0·(−1) + 0.81873075·2) = −0.74799739
    # ∂L/∂ℓ_θ = −(1/3)·k·A·r = [−0.20217689, 0, −0.54582050]
    loss, grad, m = loss_and_grad(
        [[-1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0]], [[-0.5, -3.5, -0.8]], [[1.0, -1.0, 2.0]]
    )
    assert loss == pytest.approx(-0.74799739, abs=TOL)
    torch.testing.assert_close(grad, t64([[-0.20217689, 0.0, -0.54582050]]), atol=TOL, rtol=0)
    assert m["icepop/mask_frac"] == pytest.approx(1 / 3)
    assert m["icepop/mask_frac_high"] == pytest.approx(1 / 3)
    assert m["icepop/mask_frac_low"] == 0.0
    assert m["icepop/ratio_max"] == pytest.approx(12.18249396, abs=TOL)


# ---- 4. Masked tokens stay in the denominator.
def test_4_denominator_counts_masked_tokens() -> None:
    # Kept tokens contribute 0.60653066 + 1.63746151 = 2.24399217; divided by 3 (not 2) = 0.74799739.
    loss, _, _ = loss_and_grad(
        [[-1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0]], [[-0.5, -3.5, -0.8]], [[1.0, -1.0, 2.0]]
    )
    kept = math.exp(-0.5) * 1 + math.exp(-0.2) * 2
    assert loss == pytest.approx(-kept / 3, abs=TOL)
    assert loss != pytest.approx(-kept / 2, abs=TOL)


# ---- 5. A masked token has gradient exactly 0, and nothing about it changes L or other gradients.
@pytest.mark.parametrize("side", ["low", "high"])
def test_5_masked_token_is_inert(side: str) -> None:
    inf_masked = -1.0 + 3.0 if side == "low" else -1.0 - 3.0  # k = e^{−3} < α, or e^{3} > β
    base = loss_and_grad(
        [[-1.0, -0.7, -1.3]], [[-1.0, -1.0, -1.0]], [[-0.9, inf_masked, -1.1]], [[1.0, 1.0, -2.0]]
    )
    assert base[1][0, 1].item() == 0.0
    # Change the masked token's ℓ_θ (any value, even absurd), A and ℓ_inf (staying masked).
    inf_still_masked = inf_masked + (1.0 if side == "low" else -1.0)
    for lp1, a1 in [(-50.0, 1.0), (5.0, -7.0), (-0.7, 100.0)]:
        other = loss_and_grad(
            [[-1.0, lp1, -1.3]], [[-1.0, -1.0, -1.0]], [[-0.9, inf_still_masked, -1.1]], [[1.0, a1, -2.0]]
        )
        assert other[0] == base[0]
        assert torch.equal(other[1], base[1])
        assert other[1][0, 1].item() == 0.0


# ---- 6. PPO interplay on one token, ε = 0.2, r = 1.5 (ℓ_θ − ℓ_old = ln 1.5).
@pytest.mark.parametrize(
    ("k", "adv", "loss", "grad"),
    [
        (1.0, +1.0, -1.2, 0.0),  # −min(1.5·1, 1.2·1) = −1.2; the clipped branch wins: no gradient
        (1.0, -1.0, +1.5, +1.5),  # −min(−1.5, −1.2) = 1.5; ∂/∂ℓ_θ of −A·r = −A·r = 1.5
        (2.0, -1.0, +3.0, +3.0),  # kept with weight 2: 2·1.5 and 2·1.5
        (2.0, +1.0, -2.4, 0.0),  # 2·(−1.2), clipped: no gradient
    ],
)
def test_6_ppo_clip_interplay(k: float, adv: float, loss: float, grad: float) -> None:
    old = -1.0
    got = loss_and_grad([[old + math.log(1.5)]], [[old]], [[old - math.log(k)]], [[adv]])
    assert got[0] == pytest.approx(loss, abs=TOL)
    assert got[1].item() == pytest.approx(grad, abs=TOL)


# ---- 7. Inclusive bounds with (α, β) = (0.5, 4.0), both exactly representable.
def test_7_inclusive_bounds() -> None:
    # ℓ_old = 0 so that Δ = 0 − (−d) = d exactly (−1 − d + 1 would round).
    old = [[0.0, 0.0, 0.0, 0.0]]
    delta = [math.log(0.5), math.log(4.0), math.log(0.5) - 1e-4, math.log(4.0) + 1e-4]
    inf = [[-d for d in delta]]
    adv = [[1.0, 1.0, 1.0, 1.0]]
    logprobs = t64(old, grad=True)
    loss, m = policy_loss(
        logprobs,
        t64(old),
        t64(inf),
        t64(adv),
        torch.ones(1, 4, dtype=torch.bool),
        ratio_low=0.5,
        ratio_high=4.0,
        **EPS,
    )
    loss.backward()
    # r = 1, A = 1: ∂L/∂ℓ_θ,t = −w_t/4 ⇒ w = [0.5, 4.0, 0, 0]
    torch.testing.assert_close(-4 * logprobs.grad, t64([[0.5, 4.0, 0.0, 0.0]]), atol=1e-12, rtol=0)
    assert m["icepop/mask_frac_low"].item() == 0.25
    assert m["icepop/mask_frac_high"].item() == 0.25


# ---- 8. No gradient reaches ℓ_old or ℓ_inf; the mask never depends on ℓ_θ.
def test_8_constants_get_no_gradient_and_mask_ignores_policy() -> None:
    lp = t64([[-1.0, -2.0, -0.3]], grad=True)
    old = t64([[-1.1, -1.0, -0.2]], grad=True)
    inf = t64([[-1.0, -4.0, -0.25]], grad=True)
    loss, m = policy_loss(lp, old, inf, t64([[1.0, -1.0, 0.5]]), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert old.grad is None and inf.grad is None
    assert lp.grad is not None
    fracs = {k: v.item() for k, v in m.items() if k.startswith("icepop/mask")}
    for shift in (-30.0, 0.5, 30.0):
        _, m2 = policy_loss(
            (lp + shift).detach(), old, inf, t64([[1.0, -1.0, 0.5]]), torch.ones(1, 3, dtype=torch.bool)
        )
        assert {k: v.item() for k, v in m2.items() if k.startswith("icepop/mask")} == fracs


# ---- 9. Padding contributes nothing, whatever its values.
@pytest.mark.parametrize("poison", [0.0, -math.inf, math.inf, math.nan])
def test_9_padding_is_inert(poison: float) -> None:
    clean = loss_and_grad([[-1.0, -0.5]], [[-1.1, -0.6]], [[-1.0, -0.7]], [[1.0, -1.0]])
    mask = torch.tensor([[True, True, False, False]])
    lp = [[-1.0, -0.5, poison, poison]]
    got = loss_and_grad(
        lp,
        [[-1.1, -0.6, poison, poison]],
        [[-1.0, -0.7, poison, -poison]],
        [[1.0, -1.0, poison, poison]],
        mask,
    )
    assert got[0] == pytest.approx(clean[0], abs=1e-12)
    assert torch.equal(got[1][:, :2], clean[1])
    assert torch.equal(got[1][:, 2:], torch.zeros(1, 2, dtype=torch.float64))
    assert all(math.isfinite(v) for v in got[2].values())


# ---- 10. Non-finite or absurd ratios on valid tokens are masked; everything stays finite.
def test_10_nonfinite_valid_tokens_are_masked() -> None:
    nan, inf = math.nan, math.inf
    old = [[-1.0, -inf, nan, -1.0, -1.0]]
    rollout = [[-inf, -1.0, -1.0, -101.0, -1.2]]  # Δ = +inf, −inf, NaN, +100, 0.2
    loss, grad, m = loss_and_grad([[-1.0, -1.0, -1.0, -1.0, -1.0]], old, rollout, [[1.0, 1.0, 1.0, 1.0, 1.0]])
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0, :4].abs().sum().item() == 0.0
    # only the last token survives: L = −(1/5)·e^{0.2}·1
    assert loss == pytest.approx(-math.exp(0.2) / 5, abs=TOL)
    assert m["icepop/mask_frac"] == pytest.approx(4 / 5)
    assert m["mismatch/nonfinite_frac"] == pytest.approx(3 / 5)
    assert all(math.isfinite(v) for v in m.values())


# ---- 11. Every valid token masked ⇒ L = 0, gradients 0, mask_frac = 1, no NaN.
def test_11_everything_masked() -> None:
    loss, grad, m = loss_and_grad(
        [[-1.0, -1.0], [-2.0, -2.0]],
        [[-1.0, -1.0], [-2.0, -2.0]],
        [[-4.0, 3.0], [-0.1, -9.0]],
        [[1.0, -1.0], [2.0, 2.0]],
    )
    assert loss == 0.0
    assert torch.equal(grad, torch.zeros(2, 2, dtype=torch.float64))
    assert m["icepop/mask_frac"] == 1.0
    assert all(math.isfinite(v) for v in m.values())


# ---- 12. seq-mean-token-mean vs token-mean.
def test_12_seq_mean_token_mean() -> None:
    # seq 1: 2 tokens, k = [1, 10] (10 > β: masked), A = +1 ⇒ token losses [−1, 0], mean −0.5
    # seq 2: 4 tokens, k = 1, A = −1 ⇒ token losses [1, 1, 1, 1], mean 1
    # seq-mean-token-mean = (−0.5 + 1)/2 = 0.25;   token-mean = (−1 + 0 + 4)/6 = 0.5
    old = [[-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
    inf = [[-1.0, -1.0 - math.log(10.0), 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
    adv = [[1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
    mask = [[True, True, False, False], [True, True, True, True]]
    assert loss_and_grad(old, old, inf, adv, mask, agg="seq-mean-token-mean")[0] == pytest.approx(
        0.25, abs=TOL
    )
    assert loss_and_grad(old, old, inf, adv, mask, agg="token-mean")[0] == pytest.approx(0.5, abs=TOL)


# ---- 13. Gradient accumulation over micro-batches equals one big batch (see also test_properties).
@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_13_micro_batches_match_full_batch(agg: str) -> None:
    g = torch.Generator().manual_seed(13)
    old = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 2
    lp = old + 0.2 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    inf = old + 0.8 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(6, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 7, generator=g) < 0.7
    full_lp = lp.clone().requires_grad_(True)
    options = PolicyLossOptions(agg=agg, max_response_length=7)
    full, _, _ = pg_loss(full_lp, old, inf, adv, mask, options)
    full.backward()

    micro_lp = lp.clone().requires_grad_(True)
    n_tokens, n_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven micro-batches
        part, _, _ = pg_loss(
            micro_lp[rows],
            old[rows],
            inf[rows],
            adv[rows],
            mask[rows],
            options,
            global_token_count=n_tokens,
            global_seq_count=n_seqs,
        )
        part.backward()
        total = total + part.detach()
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(micro_lp.grad, full_lp.grad, atol=1e-12, rtol=0)


# ---- 14. TIS vs IcePop.
@pytest.mark.parametrize(("k", "icepop_w", "tis_w"), [(0.3, 0.0, 0.3), (3.0, 3.0, 2.0)])
def test_14_tis_vs_icepop(k: float, icepop_w: float, tis_w: float) -> None:
    # r = 1, A = 1, one token: ∂L/∂ℓ_θ = −w, so the gradient reads off the weight.
    def weight(correction: str, cap: float) -> float:
        _, grad, _ = loss_and_grad(
            [[-1.0]], [[-1.0]], [[-1.0 - math.log(k)]], [[1.0]], correction=correction, ratio_high=cap
        )
        return -grad.item()

    assert weight("icepop", 5.0) == pytest.approx(icepop_w, abs=TOL)
    assert weight("tis", 2.0) == pytest.approx(tis_w, abs=TOL)
