"""The corrections of 2025-26 (docs/algorithm.md §10): DPPO's binary-TV and binary-KL masks, off-policy
sequence masking (OPSM) and Trust Region Masking (TRM). Hand-computed cases with the arithmetic in
comments, the float64 reference of tests/reference.py on random batches, and the options' checks.
(tests/test_corrections_2025_peers.py transcribes the peers' own formulas.)"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from reference import reference_loss, t64

from icepop.algo import AGGREGATIONS, PolicyLossOptions, correction_weights, pg_loss
from icepop.config import Config
from icepop.config.algo import AlgoConfig
from icepop.train import CONF_DIR

LN = math.log
NEW = ("dppo-tv", "dppo-kl", "opsm", "trm")


def weights(correction: str, lp, old, inf, adv=None, mask=None, **options):
    """The correction of PolicyLossOptions(correction, **options) on float64 [B, T] lists."""
    lp_t, old_t = t64(lp), t64(old)
    mask_t = torch.ones(lp_t.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    adv_t = None if adv is None else t64(adv)
    opts = PolicyLossOptions(correction=correction, **options)
    return opts.correction_weights(old_t, t64(inf), mask_t, logprobs=lp_t, advantages=adv_t)


def run(correction: str, lp, old, inf, adv, mask=None, **options):
    """pg_loss in float64: (loss, ∂L/∂ℓ_θ, metrics as floats)."""
    logprobs = t64(lp, grad=True)
    mask_t = torch.ones(logprobs.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    opts = PolicyLossOptions(correction=correction, **options)
    loss, metrics, _ = pg_loss(logprobs, t64(old), t64(inf), t64(adv), mask_t, opts)
    loss.backward()
    return loss.item(), logprobs.grad, {k: v.item() for k, v in metrics.items()}


# ---- DPPO-TV: the sampled token's probability may move by δ = 0.15 on the side its advantage pushes.
def test_dppo_tv_masks_the_side_the_advantage_pushes() -> None:
    # π_inf = 0.5 for the first five tokens; π_θ = 0.7 (D = +0.2) or 0.3 (D = −0.2):
    #   D = +0.2, A = +1 ⇒ masked (high); A = −1 ⇒ kept, weight π_θ/π_inf = 1.4
    #   D = −0.2, A = +1 ⇒ kept, weight 0.6; A = −1 ⇒ masked (low); A = 0 ⇒ masked (low: A ≤ 0 side)
    # π_inf = 0.001, π_θ = 0.1: ratio 100, but D = 0.099 ≤ 0.15 ⇒ kept with weight 100 (PPO would clip it).
    lp = [[LN(0.7), LN(0.7), LN(0.3), LN(0.3), LN(0.3), LN(0.1)]]
    inf = [[LN(0.5)] * 5 + [LN(0.001)]]
    adv = [[1.0, -1.0, 1.0, -1.0, 0.0, 1.0]]
    c = weights("dppo-tv", lp, inf, inf, adv)
    torch.testing.assert_close(c.weight, t64([[0.0, 1.4, 0.6, 0.0, 0.0, 100.0]]), rtol=1e-12, atol=0)
    assert c.high.tolist() == [[True, False, False, False, False, False]]
    assert c.low.tolist() == [[False, False, False, True, True, False]]
    # Loss: no PPO clip, gradient through r = π_θ/π_inf. Token-mean over 6 tokens:
    # L = −(1/6)(1.4·(−1) + 0.6·1 + 100·1) = −99.2/6; ∂L/∂ℓ_θ,t = −w_t·A_t/6 on kept tokens, 0 elsewhere.
    loss, grad, m = run("dppo-tv", lp, inf, inf, adv)
    assert loss == pytest.approx(-99.2 / 6, rel=1e-12)
    torch.testing.assert_close(grad, t64([[0.0, 1.4, -0.6, 0.0, 0.0, -100.0]]) / 6, rtol=1e-12, atol=1e-15)
    assert m["icepop/mask_frac"] == 0.5 and m["icepop/mask_frac_low"] == pytest.approx(1 / 3)


def test_dppo_kl_region_narrows_for_likely_tokens() -> None:
    # Binary KL(Bern(p_a) ‖ Bern(p)) = p_a ln(p_a/p) + (1 − p_a) ln((1 − p_a + 1e-8)/(1 − p + 1e-8)):
    #   p_a = 0.5,  p = 0.8 (ratio 1.6): 0.5 ln 0.625 + 0.5 ln 2.5 = −0.23500181 + 0.45814537 = 0.22314355
    #   p_a = 0.01, p = 0.02 (ratio 2): 0.01 ln 0.5 + 0.99 ln(0.99/0.98) = −0.00693147 + 0.01005087 = 0.003119
    # against δ = 0.05.
    # A = +1: the first is masked (high: p > p_a), the second kept with weight 2; with A = −1 the first is
    # kept (it moved up, the side A = −1 does not push), weight 1.6.
    lp, inf = [[LN(0.8), LN(0.02), LN(0.8)]], [[LN(0.5), LN(0.01), LN(0.5)]]
    c = weights("dppo-kl", lp, inf, inf, [[1.0, 1.0, -1.0]])
    torch.testing.assert_close(c.weight, t64([[0.0, 2.0, 1.6]]), rtol=1e-12, atol=0)
    assert c.high.tolist() == [[True, False, False]] and not c.low.any()
    # Falling by the same KL with A = −1 is masked low: p_a = 0.8, p = 0.5 ⇒ KL = 0.8 ln 1.6 + 0.2 ln 0.4
    #   = 0.37600290 − 0.18325815 = 0.19274475 > 0.05.
    c = weights("dppo-kl", [[LN(0.5)]], [[LN(0.8)]], [[LN(0.8)]], [[-1.0]])
    assert c.low.tolist() == [[True]] and c.weight.item() == 0.0
    # The first token's KL with ε is 0.22314354 (ε moves it by 1.5e-8 from 0.22314355; the other direction,
    # KL(Bern(p) ‖ Bern(p_a)) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.19274476, would be kept at both δ below).
    one = ([[LN(0.8)]], [[LN(0.5)]], [[LN(0.5)]], [[1.0]])
    assert weights("dppo-kl", *one, dppo_kl_threshold=0.2231435363).weight.item() == 0.0
    assert weights("dppo-kl", *one, dppo_kl_threshold=0.2231435364).weight.item() == pytest.approx(1.6)


def test_dppo_anchor_chooses_the_region_not_the_weight() -> None:
    # π_inf = 0.5, π_old = 0.65, π_θ = 0.7, A = +1, δ = 0.15.
    # anchor "rollout": D = 0.7 − 0.5 = 0.2 > δ ⇒ masked. anchor "old": D = 0.05 ⇒ kept, and the weight is
    # still the importance ratio to the sampler, π_θ/π_inf = 1.4 (not π_θ/π_old).
    args = ([[LN(0.7)]], [[LN(0.65)]], [[LN(0.5)]], [[1.0]])
    assert weights("dppo-tv", *args).weight.item() == 0.0
    assert weights("dppo-tv", *args, anchor="old").weight.item() == pytest.approx(1.4, rel=1e-12)


# ---- OPSM: a negative-advantage sequence goes when its mean log(π_anchor/π_θ) exceeds δ.
def test_opsm_masks_negative_sequences_that_drifted_away() -> None:
    # δ = 0.5; ℓ_inf = −1 on the two valid tokens; the third position is padding (poisoned).
    #   seq 1: ℓ_θ = [−1.5, −1.5]  ⇒ mean(ℓ_inf − ℓ_θ) = 0.5 = δ: kept (the test is > δ), A = −1
    #   seq 2: ℓ_θ = [−1.5, −1.75] ⇒ 0.625 > δ, A = −1 ⇒ both tokens masked (low)
    #   seq 3: as seq 2 with A = +1 ⇒ kept; seq 4: as seq 2 with A = 0 ⇒ kept (only A < 0 is masked)
    nan = math.nan
    lp = [[-1.5, -1.5, nan], [-1.5, -1.75, nan], [-1.5, -1.75, nan], [-1.5, -1.75, nan]]
    inf = [[-1.0, -1.0, nan]] * 4
    adv = [[-1.0, -1.0, nan], [-1.0, -1.0, nan], [1.0, 1.0, nan], [0.0, 0.0, nan]]
    mask = [[True, True, False]] * 4
    c = weights("opsm", lp, inf, inf, adv, mask, opsm_threshold=0.5)
    assert c.keep.tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, False],
        [True, True, False],
    ]
    assert c.low.tolist()[1] == [True, True, False] and not c.high.any()
    assert c.weight.tolist()[0] == [1.0, 1.0, 0.0]  # kept tokens weigh 1
    # anchor "old" with ℓ_old = ℓ_θ: no drift, nothing masked.
    assert weights("opsm", lp, lp, inf, adv, mask, opsm_threshold=0.5, anchor="old").keep.tolist() == mask
    # The batch view without advantages drops the sign test (an upper bound): seq 2-4 all masked.
    c = weights("opsm", lp, inf, inf, None, mask, opsm_threshold=0.5)
    assert c.keep.tolist() == [[True, True, False]] + [[False, False, False]] * 3


# ---- TRM: a sequence goes when its largest |log(π_θ/π_anchor)| leaves [−δ, δ].
def test_trm_drops_a_sequence_for_its_largest_token_divergence() -> None:
    # δ = 1, ℓ_anchor = −2 everywhere, ℓ_θ − ℓ_anchor per sequence (all exact in binary):
    #   [0.5, −1.0]            ⇒ max |·| = 1 = δ: kept (bound inclusive), weight 1
    #   [0.25, 1 + 2⁻¹⁰]       ⇒ masked, high (a ratio left above)
    #   [−1.5, 0]              ⇒ masked, low
    #   [1.5, −1.5]            ⇒ masked, high (some ratio left above)
    drift = [[0.5, -1.0], [0.25, 1.0 + 2**-10], [-1.5, 0.0], [1.5, -1.5]]
    lp = [[-2.0 + d for d in row] for row in drift]
    inf = [[-2.0, -2.0]] * 4
    c = weights("trm", lp, inf, inf, trm_threshold=1.0)
    assert c.keep.tolist() == [[True, True], [False, False], [False, False], [False, False]]
    assert c.high.tolist() == [[False, False], [True, True], [False, False], [True, True]]
    assert c.low.tolist() == [[False, False], [False, False], [True, True], [False, False]]
    assert c.weight.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_sequence_masks_keep_the_ppo_objective_and_the_denominator() -> None:
    # TRM at θ = θ_old (ℓ_θ = ℓ_old, r = 1), δ = ln 5: seq 1 has ℓ_inf = ℓ_old (kept), seq 2 has a token
    # with ℓ_old − ℓ_inf = 2 > ln 5 = 1.609 (dropped). A = +1 on seq 1, −1 on seq 2. Token-mean over all 4:
    # L = −(1/4)(1 + 1) = −0.5 (the dropped tokens stay in the denominator); ∂L/∂ℓ_θ = [−¼, −¼, 0, 0].
    old = [[-1.0, -1.0], [-1.0, -1.0]]
    inf = [[-1.0, -1.0], [-1.0, -3.0]]
    loss, grad, m = run("trm", old, old, inf, [[1.0, 1.0], [-1.0, -1.0]])
    assert loss == -0.5
    assert grad.tolist() == [[-0.25, -0.25], [0.0, 0.0]]
    # Metrics count the dropped sequence in tokens and in sequences.
    assert m["icepop/mask_frac"] == 0.5 and m["icepop/mask_frac_high"] == 0.5
    assert m["icepop/masked_seq_frac"] == 0.5 and m["icepop/masked_tokens_per_seq"] == 1.0


def test_non_finite_log_probs_are_masked_and_everything_stays_finite() -> None:
    # Sequence 2's second token has ℓ_inf = −inf: "opsm" and "trm" drop the whole sequence (high);
    # "dppo-*" mask that token alone (ℓ_θ − ℓ_inf = +inf: high). Loss and gradients stay finite.
    old = [[-1.0, -1.2], [-0.9, -1.1]]
    inf = [[-1.05, -1.2], [-0.9, -math.inf]]
    adv = [[1.0, 1.0], [-1.0, -1.0]]
    for correction in NEW:
        c = weights(correction, old, old, inf, adv)
        expected = (
            [[False, False], [True, True]]
            if correction in ("opsm", "trm")
            else [[False, False], [False, True]]
        )
        assert c.high.tolist() == expected, correction
        loss, grad, _ = run(correction, old, old, inf, adv)
        assert math.isfinite(loss) and torch.isfinite(grad).all(), correction
        assert grad[1, 1].item() == 0.0


def test_dppo_weight_beyond_the_dtype_is_masked_not_infinite() -> None:
    # ℓ_θ = −1, ℓ_inf = −100: r = e^99 overflows float32 (max e^88.7). A = −1 and π_θ rose, so the
    # region alone would keep it; in float32 it is masked high, in float64 kept with weight e^99.
    lp32 = torch.tensor([[-1.0]], requires_grad=True)
    args = (
        torch.tensor([[-1.0]]),
        torch.tensor([[-100.0]]),
        torch.tensor([[-1.0]]),
        torch.ones(1, 1, dtype=torch.bool),
    )
    loss, m, keep = pg_loss(lp32, *args, PolicyLossOptions(correction="dppo-tv"))
    loss.backward()
    assert (
        not keep.any()
        and loss.item() == 0.0
        and lp32.grad.item() == 0.0
        and m["icepop/mask_frac_high"] == 1.0
    )
    assert weights("dppo-tv", [[-1.0]], [[-1.0]], [[-100.0]], [[-1.0]]).weight.item() == pytest.approx(
        math.exp(99)
    )


def test_the_batch_view_at_the_rollout_weights() -> None:
    # What step_metrics sees: no ℓ_θ (θ = θ_old) and no advantages (both sides masked).
    # dppo-tv, anchor rollout: p_old − p_inf = +0.2 (high), −0.2 (low), +0.1 (kept, weight k = 0.6/0.5).
    old, inf = t64([[LN(0.7), LN(0.3), LN(0.6)]]), t64([[LN(0.5)] * 3])
    mask = torch.ones(1, 3, dtype=torch.bool)
    c = PolicyLossOptions(correction="dppo-tv").correction_weights(old, inf, mask)
    assert (c.high.tolist(), c.low.tolist()) == ([[True, False, False]], [[False, True, False]])
    assert c.weight[0, 2].item() == pytest.approx(1.2, rel=1e-12)
    # anchor old: π_θ = π_old, nothing has moved, nothing is masked.
    assert PolicyLossOptions(correction="dppo-tv", anchor="old").correction_weights(old, inf, mask).keep.all()


STRICT = {"dppo-tv": 0.05, "dppo-kl": 0.01, "opsm": 0.05, "trm": 0.5}  # a fair share masked on these batches


@pytest.mark.parametrize("correction", NEW)
@pytest.mark.parametrize("with_advantages", [True, False])
def test_masks_are_disjoint_and_explain_every_masked_token(correction: str, with_advantages: bool) -> None:
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(8, 9, generator=g, dtype=torch.float64) * 3
    lp = old + 0.3 * torch.randn(8, 9, generator=g, dtype=torch.float64)
    inf = old + 0.3 * torch.randn(8, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(8, 1, generator=g, dtype=torch.float64).expand(8, 9) if with_advantages else None
    mask = torch.rand(8, 9, generator=g) < 0.8
    for anchor in ("rollout", "old"):
        bands = {"ratio_low": 0.5, "ratio_high": 5.0, "kpop_threshold": 0.05}
        region = {"anchor": anchor, "threshold": STRICT[correction]}
        c = correction_weights(correction, old, inf, mask, **bands, logprobs=lp, advantages=adv, **region)
        assert not (c.low & c.high).any()
        assert torch.equal(c.low | c.high, mask & ~c.keep)
        assert 0 < int(c.keep.sum()) < int(mask.sum()), (anchor, "some masked, not all")
        assert not (c.keep & ~mask).any() and torch.equal(
            c.weight[~c.keep], torch.zeros_like(c.weight[~c.keep])
        )


# ---- The float64 reference (tests/reference.py), loss, gradient, weights and mask fraction to 1e-12.


@pytest.mark.parametrize("correction", NEW)
@pytest.mark.parametrize("anchor", ["rollout", "old"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_matches_the_float64_reference(correction: str, anchor: str, agg: str) -> None:
    field = f"{correction.replace('-', '_')}_threshold"
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        rows, cols = 4, 7
        old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 4 - 1e-3
        lp = old + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
        inf = old + 0.5 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
        adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).clone()
        mask = torch.rand(rows, cols, generator=g) < 0.8
        for delta in (None, STRICT[correction]):
            extra = {} if delta is None else {field: delta}
            options = PolicyLossOptions(correction=correction, anchor=anchor, agg=agg, **extra)
            logprobs = lp.clone().requires_grad_(True)
            loss, metrics, keep = pg_loss(logprobs, old, inf, adv, mask, options)
            loss.backward()
            ref = reference_loss(lp.tolist(), old.tolist(), inf.tolist(), adv.tolist(), mask.tolist(),
                                 correction=correction, agg=agg, anchor=anchor, threshold=delta)  # fmt: skip
            assert loss.item() == pytest.approx(ref.loss, abs=1e-12, rel=1e-12)
            torch.testing.assert_close(logprobs.grad, t64(ref.grad), atol=1e-12, rtol=1e-12)
            corr = options.correction_weights(old, inf, mask, logprobs=lp, advantages=adv)
            torch.testing.assert_close(corr.weight, t64(ref.weights), atol=0, rtol=1e-12)
            assert torch.equal(keep, mask & (t64(ref.weights) != 0))
            assert metrics["icepop/mask_frac"].item() == pytest.approx(ref.mask_frac, abs=1e-12)


# ---- Options: checked once, and settable from the command line.
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"anchor": "behaviour"}, "anchor='behaviour' is not one of rollout, old"),
        ({"dppo_tv_threshold": 0.0}, "dppo_tv_threshold must be > 0"),
        ({"dppo_kl_threshold": -1.0}, "dppo_kl_threshold must be > 0"),
        ({"opsm_threshold": 0.0}, "opsm_threshold must be > 0"),
        ({"trm_threshold": 0.0}, "trm_threshold must be > 0"),
        ({"correction": "dppo-kl", "objective": "cispo"}, "cannot combine with correction='dppo-kl'"),
    ],
)
def test_invalid_options_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyLossOptions(**kwargs)


def test_each_option_is_set_from_the_command_line() -> None:
    overrides = ["+recipe=rlvr", "algo.correction=trm", "algo.trm_threshold=1.5", "algo.anchor=old"]
    overrides += ["algo.opsm_threshold=0.2", "algo.dppo_tv_threshold=0.2", "algo.dppo_kl_threshold=0.1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    assert isinstance(config, Config)
    options = config.algo.loss_options()
    assert (options.correction, options.trm_threshold, options.anchor) == ("trm", 1.5, "old")
    assert (options.opsm_threshold, options.dppo_tv_threshold, options.dppo_kl_threshold) == (0.2, 0.2, 0.1)
    with pytest.raises(ValueError, match="anchor='inference' is not one of"):
        AlgoConfig(correction="opsm", anchor="inference")
