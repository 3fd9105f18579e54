"""Bradley–Terry loss, pairwise accuracy and whitening on hand-computed pairs."""

from __future__ import annotations

import math

import pytest
import torch

from icepop.algo import bradley_terry_loss, pairwise_accuracy, whiten


def test_bradley_terry_on_hand_computed_pairs() -> None:
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # margins 2, 0, −2: −log σ(2) = log(1 + e^−2) = 0.126928; −log σ(0) = log 2 = 0.693147;
    # −log σ(−2) = log(1 + e^2) = 2.126928; mean = 2.947003 / 3 = 0.982334
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(loss) == pytest.approx(0.982334, abs=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(1 / 3)  # the tie (margin 0) is not a win
    assert float(metrics["margin"]) == pytest.approx(0.0)
    # d/dr_c of −log σ(m)/3 = −(1 − σ(m))/3:
    # σ(2) = 0.880797 → −0.039734; σ(0) → −1/6; σ(−2) = 0.119203 → −0.293599
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.039734, -1 / 6, -0.293599]), atol=1e-6, rtol=0)


def test_global_pair_count_makes_shards_add_up_to_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(10, generator=g), torch.randn(10, generator=g)
    whole, _ = bradley_terry_loss(chosen, rejected)
    parts = [bradley_terry_loss(chosen[s], rejected[s], 10)[0] for s in (slice(0, 3), slice(3, 10))]
    assert float(sum(parts)) == pytest.approx(float(whole), abs=1e-6)


def test_extreme_margins_stay_finite_and_bad_shapes_are_refused() -> None:
    loss, _ = bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert float(loss) == pytest.approx(2e4)  # −log σ(−2e4) = 2e4 (no overflow to inf)
    with pytest.raises(ValueError, match="one score per pair"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="global_pair_count"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), 0)


def test_pairwise_accuracy_and_whiten() -> None:
    assert (
        float(pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 1.0, 0.0])))
        == 0.5
    )
    # [1, 2, 3]: mean 2, std (Bessel) 1 → [−1, 0, 1]
    torch.testing.assert_close(
        whiten(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0
    )
    assert torch.equal(whiten(torch.tensor([5.0])), torch.tensor([0.0]))
