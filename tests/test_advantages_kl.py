"""Advantages (docs/algorithm.md §4), KL estimators and aggregation modes, with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from reference import t64

from icepop.algo import (
    aggregate,
    dr_grpo_advantages,
    grpo_advantages,
    kl_estimate,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    to_tokens,
    token_advantages,
)

# Two groups, interleaved on purpose: group 7 = rewards [1, 0, 0, 1]... written per response.
REWARDS = t64([1.0, 2.0, 0.0, 4.0, 0.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 3, 7, 7])
# group 7: [1, 0, 0, 1] mean 0.5, unbiased var = 4·0.25/3 = 1/3, std 0.57735027
# group 3: [2, 4]       mean 3,   unbiased var = 2/1 = 2,       std 1.41421356


def test_grpo_normalises_by_unbiased_group_std() -> None:
    s7, s3 = math.sqrt(1 / 3) + 1e-6, math.sqrt(2) + 1e-6
    expected = [0.5 / s7, -1 / s3, -0.5 / s7, 1 / s3, -0.5 / s7, 0.5 / s7]
    torch.testing.assert_close(grpo_advantages(REWARDS, GROUPS), t64(expected))


def test_grpo_group_of_one_and_constant_group_give_zero() -> None:
    adv = grpo_advantages(t64([3.0, 1.0, 1.0]), torch.tensor([0, 1, 1]))
    assert adv.tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(adv).all()


def test_dr_grpo_only_centres() -> None:
    torch.testing.assert_close(dr_grpo_advantages(REWARDS, GROUPS), t64([0.5, -1.0, -0.5, 1.0, -0.5, 0.5]))


def test_rloo_leaves_one_out() -> None:
    # group 7, response 0: 1 − mean(0, 0, 1) = 1 − 1/3 = 2/3; response 2: 0 − mean(1, 0, 1) = −2/3
    # group 3: 2 − 4 = −2, 4 − 2 = 2
    torch.testing.assert_close(
        rloo_advantages(REWARDS, GROUPS), t64([2 / 3, -2.0, -2 / 3, 2.0, -2 / 3, 2 / 3])
    )
    assert rloo_advantages(t64([5.0]), torch.tensor([0])).tolist() == [0.0]


def test_reinforce_pp_baseline_whitens_over_valid_tokens() -> None:
    # centred: [+1, −1] (one group); tokens: seq 0 has 3 valid, seq 1 has 1 valid
    # valid token values [1, 1, 1, −1]: mean 0.5, unbiased std = sqrt((3·0.25 + 2.25)/3) = 1
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = reinforce_pp_baseline_advantages(t64([2.0, 0.0]), torch.tensor([0, 0]), mask, eps=0.0)
    torch.testing.assert_close(adv, t64([[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]]))


def test_to_tokens_zeroes_padding() -> None:
    mask = torch.tensor([[True, False], [True, True]])
    assert to_tokens(t64([2.0, -1.0]), mask).tolist() == [[2.0, 0.0], [-1.0, -1.0]]


def test_the_registry_dispatches_every_estimator_by_name_and_refuses_others() -> None:
    # dr_grpo on REWARDS/GROUPS: [0.5, −1, −0.5, 1, −0.5, 0.5], broadcast onto each row's valid tokens.
    mask = torch.tensor(
        [[True, True], [True, False], [False, False], [True, True], [True, False], [True, True]]
    )
    assert token_advantages("dr_grpo", REWARDS, GROUPS, mask).tolist() == [
        [0.5, 0.5], [-1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-0.5, 0.0], [0.5, 0.5]
    ]  # fmt: skip
    for name, sequence in (("grpo", grpo_advantages), ("rloo", rloo_advantages)):
        torch.testing.assert_close(
            token_advantages(name, REWARDS, GROUPS, mask), to_tokens(sequence(REWARDS, GROUPS), mask)
        )
    whitened = reinforce_pp_baseline_advantages(REWARDS, GROUPS, mask)
    torch.testing.assert_close(token_advantages("reinforce_pp", REWARDS, GROUPS, mask), whitened)
    with pytest.raises(ValueError, match="advantage='gae' is not one of grpo, dr_grpo, rloo, reinforce_pp"):
        token_advantages("gae", REWARDS, GROUPS, mask)


def test_advantages_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(t64([1.0, 2.0]), torch.tensor([0, 0, 1]))


def test_kl_estimators_by_hand() -> None:
    lp, ref = t64([-1.0, -2.0]), t64([-1.5, -1.0])  # x = [0.5, −1]
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), t64([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), t64([0.125, 0.5]))
    # k3 = e^{−x} + x − 1 = [0.60653066 − 0.5, 2.71828183 − 2] = [0.10653066, 0.71828183]
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), t64([math.exp(-0.5) - 0.5, math.e - 2]))


def test_k3_is_clamped() -> None:
    # x = −30 is clamped to −20: e^{20} − 21 ≈ 4.85e8, then clamped to 10. x = +30 ⇒ e^{−20} + 19 ⇒ 10.
    assert kl_estimate(t64([-31.0, 29.0]), t64([-1.0, -1.0]), "k3").tolist() == [10.0, 10.0]


def test_kl_gradient_flows_to_policy_only() -> None:
    lp, ref = t64([-1.0], grad=True), t64([-1.5], grad=True)
    kl_estimate(lp, ref, "k3").sum().backward()
    assert lp.grad.item() == pytest.approx(1 - math.exp(-0.5)) and ref.grad is None


def test_aggregation_modes_by_hand() -> None:
    # seq 0: losses [1, 2, 3] all valid; seq 1: [4, NaN(pad), NaN(pad)] one valid; T = 3
    losses = t64([[1.0, 2.0, 3.0], [4.0, math.nan, math.nan]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    assert aggregate(losses, mask, "seq-mean-token-sum-norm", max_response_length=10).item() == pytest.approx(
        0.5
    )
    assert aggregate(losses, mask, "token-mean", global_token_count=8).item() == pytest.approx(10 / 8)
    assert aggregate(losses, mask, "seq-mean-token-sum", global_seq_count=5).item() == pytest.approx(2.0)


def test_aggregation_of_an_empty_batch_is_zero() -> None:
    losses = t64([[math.nan, 1.0]], grad=True)
    out = aggregate(losses, torch.zeros(1, 2, dtype=torch.bool), "seq-mean-token-mean")
    out.backward()
    assert out.item() == 0.0 and losses.grad.tolist() == [[0.0, 0.0]]


def test_unknown_aggregation_is_rejected() -> None:
    with pytest.raises(ValueError, match="agg='mean'"):
        aggregate(t64([[1.0]]), torch.ones(1, 1, dtype=torch.bool), "mean")
