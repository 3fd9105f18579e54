"""Metrics of docs/algorithm.md §6, argument validation of policy_loss, and the import boundary."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from reference import t64

from icepop.algo import (
    PolicyLossOptions,
    correction_weights,
    entropy_metrics,
    log_ratio,
    log_ratio_histogram,
    mismatch_metrics,
    pg_loss,
    policy_loss,
)

REQUIRED = [
    "icepop/mask_frac",
    "icepop/mask_frac_low",
    "icepop/mask_frac_high",
    "icepop/ratio_max",
    "mismatch/abs_logp_diff_mean",
    "mismatch/kl_k3",
]


def test_mismatch_metrics_by_hand() -> None:
    # Δ = ℓ_old − ℓ_inf = [0.5, −1.0] on valid tokens; the third token is padding.
    old, inf = t64([[-1.0, -2.0, 0.0]]), t64([[-1.5, -1.0, 5.0]])
    m = mismatch_metrics(old, inf, torch.tensor([[True, True, False]]))
    assert m["mismatch/abs_logp_diff_mean"].item() == pytest.approx(0.75)
    assert m["mismatch/abs_logp_diff_max"].item() == pytest.approx(1.0)
    assert m["mismatch/kl_k1"].item() == pytest.approx(0.25)  # mean(ℓ_inf − ℓ_old) = (−0.5 + 1)/2
    # k3 = mean(e^Δ − 1 − Δ) = ((1.64872127 − 1.5) + (0.36787944 − 0))/2 = 0.25830036
    assert m["mismatch/kl_k3"].item() == pytest.approx(((math.exp(0.5) - 1.5) + math.exp(-1.0)) / 2)
    # |k − 1| mean = (0.64872127 + 0.63212056)/2
    assert m["mismatch/rel_prob_diff_mean"].item() == pytest.approx(
        (math.exp(0.5) - 1 + 1 - math.exp(-1)) / 2
    )
    assert m["mismatch/nonfinite_frac"].item() == 0.0


def test_policy_loss_reports_the_required_metrics_as_finite_scalars() -> None:
    lp = t64([[-1.0, -2.0]], grad=True)
    _, m = policy_loss(
        lp, t64([[-1.0, -2.0]]), t64([[-1.2, -0.1]]), t64([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    )
    for key in REQUIRED:
        assert key in m and m[key].dim() == 0 and math.isfinite(m[key].item())
    assert not any(v.requires_grad for v in m.values())


def test_entropy_metrics_split_masked_tokens() -> None:
    entropy = t64([[1.0, 3.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    keep = torch.tensor([[True, False, True, False]])
    m = entropy_metrics(entropy, keep, mask)
    assert m["actor/entropy"].item() == pytest.approx(2.0)
    assert m["actor/entropy_masked"].item() == pytest.approx(3.0)


def test_log_ratio_histogram_counts_every_finite_valid_token() -> None:
    old = t64([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    inf = t64([[0.05, -0.3, -5.0, 2.0, math.inf, 0.0]])  # Δ = [−0.05, 0.3, 5, −2, −inf, 0]
    mask = torch.tensor([[True, True, True, True, True, False]])
    edges = torch.tensor([-1.0, -0.1, 0.1, 1.0])
    counts = log_ratio_histogram(log_ratio(old, inf, mask), mask, edges)
    # −2 → first bin (clamped), −0.05 → middle, 0.3 and 5 (clamped) → last; −inf and padding excluded
    assert counts.tolist() == [1, 1, 2]


def test_correction_masks_are_disjoint_and_explain_every_masked_token() -> None:
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(8, 9, generator=g, dtype=torch.float64) * 3
    inf = old + 1.5 * torch.randn(8, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 9, generator=g) < 0.8
    for name in ("icepop", "token-mis", "seq-mis", "geo-mask", "kpop"):
        c = correction_weights(name, old, inf, mask, ratio_low=0.5, ratio_high=2.0, kpop_threshold=0.05)
        assert not (c.low & c.high).any()
        assert torch.equal(c.low | c.high, mask & ~c.keep), name
        assert not (c.keep & ~mask).any() and torch.equal(
            c.weight[~c.keep], torch.zeros_like(c.weight[~c.keep])
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"correction": "ice"}, "correction='ice' is not one of"),
        ({"ratio_low": 5.0, "ratio_high": 5.0}, "ratio_low must satisfy"),
        ({"ratio_low": 6.0}, "ratio_low must satisfy"),
        ({"ratio_low": -0.1}, "ratio_low must satisfy"),
        ({"clip_low": 1.0}, "clip_low must be in"),
        ({"clip_high": -0.1}, "clip_high must be"),
        ({"agg": "sum"}, "agg='sum' is not one of"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_argument(kwargs: dict, message: str) -> None:
    x = t64([[-1.0, -1.0]])
    with pytest.raises(ValueError, match=message):
        policy_loss(x, x, x, x, torch.ones(1, 2, dtype=torch.bool), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "grpo"}, "objective='grpo' is not one of"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"kpop_threshold": 0.0}, "kpop_threshold must be > 0"),
        (
            {"correction": "icepop-online", "objective": "gspo"},
            "cannot combine with correction='icepop-online'",
        ),
        ({"kl_estimator": "k4"}, "kl_estimator='k4' is not one of"),
        ({"max_response_length": 0}, "max_response_length must be >= 1"),
    ],
)
def test_invalid_loss_options_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyLossOptions(**kwargs)


def test_kl_without_reference_log_probs_is_refused() -> None:
    x = t64([[-1.0]])
    with pytest.raises(ValueError, match=r"kl_coef=0\.1 needs ref_logprobs"):
        pg_loss(x, x, x, x, torch.ones(1, 1, dtype=torch.bool), PolicyLossOptions(kl_coef=0.1))


def test_mismatched_shapes_raise_value_error_naming_the_tensor() -> None:
    x, mask = t64([[-1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="rollout_logprobs must have the shape"):
        policy_loss(x, x, t64([[-1.0, -1.0, -1.0]]), x, mask)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        policy_loss(x, x, x, t64([1.0]), mask)
    with pytest.raises(ValueError, match="response_mask must be a bool"):
        policy_loss(x, x, x, x, torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
        policy_loss(t64([-1.0]), t64([-1.0]), t64([-1.0]), t64([-1.0]), torch.ones(1, dtype=torch.bool))


def test_importing_the_loss_library_pulls_in_no_heavy_framework() -> None:
    code = (
        "import sys, icepop.algo\n"
        "heavy = {'ray', 'vllm', 'deepspeed', 'transformers'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
