"""Property tests: pg_loss against the independent float64 reference (tests/reference.py) on random
inputs, for every correction and aggregation; poisoned padding; micro-batch equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_loss, t64

from icepop.algo import AGGREGATIONS, CORRECTIONS, PolicyLossOptions, pg_loss

BOUNDS = {  # (ratio_low, ratio_high) that make each correction mask a fair share of tokens
    "none": (0.5, 5.0),
    "tis": (0.5, 2.0),
    "token-mis": (0.5, 2.0),
    "icepop": (0.5, 5.0),
    "icepop-online": (0.5, 2.0),
    "seq-tis": (0.5, 3.0),
    "seq-mis": (0.5, 3.0),
    "geo-mask": (0.7, 1.4),
    "kpop": (0.5, 5.0),
    "dppo-tv": (0.5, 5.0),  # the trust-region corrections mask by their own default δ, not by the band
    "dppo-kl": (0.5, 5.0),
    "opsm": (0.5, 5.0),
    "trm": (0.5, 5.0),
}


@st.composite
def batches(draw: st.DrawFn) -> dict:
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    mismatch = draw(st.sampled_from([0.0, 0.3, 1.5]))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 4 - 1e-3
    return {
        "old": old,
        "lp": old + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64),
        "inf": old + mismatch * torch.randn(rows, cols, generator=g, dtype=torch.float64),
        "adv": torch.randn(rows, cols, generator=g, dtype=torch.float64),
        "mask": torch.rand(rows, cols, generator=g) < 0.75,
    }


def as_lists(x: torch.Tensor) -> list:
    return x.tolist()


@settings(max_examples=40, deadline=None)
@given(batch=batches(), correction=st.sampled_from(CORRECTIONS), agg=st.sampled_from(AGGREGATIONS))
def test_matches_float64_reference(batch: dict, correction: str, agg: str) -> None:
    lo, hi = BOUNDS[correction]
    lp = batch["lp"].clone().requires_grad_(True)
    loss, metrics, _ = pg_loss(
        lp,
        batch["old"],
        batch["inf"],
        batch["adv"],
        batch["mask"],
        PolicyLossOptions(correction=correction, ratio_low=lo, ratio_high=hi, agg=agg),
    )
    loss.backward()
    ref = reference_loss(
        as_lists(batch["lp"]),
        as_lists(batch["old"]),
        as_lists(batch["inf"]),
        as_lists(batch["adv"]),
        batch["mask"].tolist(),
        correction=correction,
        lo=lo,
        hi=hi,
        agg=agg,
    )
    assert loss.item() == pytest.approx(ref.loss, abs=1e-6)
    torch.testing.assert_close(lp.grad, t64(ref.grad), atol=1e-6, rtol=0)
    if correction not in ("none", "tis", "seq-tis"):  # these keep tokens with weight < 1 rather than mask
        assert metrics["icepop/mask_frac"].item() == pytest.approx(ref.mask_frac, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    batch=batches(),
    correction=st.sampled_from(CORRECTIONS),
    agg=st.sampled_from(AGGREGATIONS),
    poison=st.sampled_from([math.nan, math.inf, -math.inf, 1e30]),
)
def test_poisoned_padding_never_leaks(batch: dict, correction: str, agg: str, poison: float) -> None:
    lo, hi = BOUNDS[correction]
    mask = batch["mask"]

    def run(fill: float | None) -> tuple[float, torch.Tensor, dict]:
        tensors = [batch[k].clone() for k in ("lp", "old", "inf", "adv")]
        if fill is not None:
            for x in tensors:
                x[~mask] = fill
        lp = tensors[0].requires_grad_(True)
        options = PolicyLossOptions(correction=correction, ratio_low=lo, ratio_high=hi, agg=agg)
        loss, metrics, _ = pg_loss(lp, *tensors[1:], mask, options)
        loss.backward()
        return loss.item(), lp.grad, {k: v.item() for k, v in metrics.items()}

    clean, poisoned = run(None), run(poison)
    assert poisoned[0] == clean[0]
    assert torch.equal(poisoned[1], clean[1])
    assert torch.equal(poisoned[1][~mask], torch.zeros_like(poisoned[1][~mask]))
    assert poisoned[2] == clean[2]


@settings(max_examples=25, deadline=None)
@given(
    batch=batches(),
    correction=st.sampled_from(CORRECTIONS),
    agg=st.sampled_from(AGGREGATIONS),
    cut=st.integers(0, 4),
)
def test_micro_batches_sum_to_full_batch(batch: dict, correction: str, agg: str, cut: int) -> None:
    lo, hi = BOUNDS[correction]
    rows, cols = batch["mask"].shape
    cut = min(cut, rows)
    options = PolicyLossOptions(
        correction=correction, ratio_low=lo, ratio_high=hi, agg=agg, max_response_length=cols
    )
    full_lp = batch["lp"].clone().requires_grad_(True)
    full, _, _ = pg_loss(full_lp, batch["old"], batch["inf"], batch["adv"], batch["mask"], options)
    full.backward()

    lp = batch["lp"].clone().requires_grad_(True)
    n_tokens, n_seqs = batch["mask"].sum(), (batch["mask"].sum(-1) > 0).sum()
    total = 0.0
    for part in (slice(0, cut), slice(cut, rows)):
        if part.stop == part.start:
            continue
        loss, _, _ = pg_loss(
            lp[part],
            batch["old"][part],
            batch["inf"][part],
            batch["adv"][part],
            batch["mask"][part],
            options,
            global_token_count=n_tokens,
            global_seq_count=n_seqs,
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(lp.grad, full_lp.grad, atol=1e-12, rtol=0)
