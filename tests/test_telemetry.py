"""Mismatch telemetry on synthetic inputs: ESS and masked tokens per sequence, the staleness/mismatch
split, the per-step histogram file, and both alerts on metric streams that must and must not fire."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from icepop.algo import PolicyLossOptions, abs_log_ratio_by_position, staleness_metrics, weight_metrics
from icepop.telemetry import HISTOGRAM_EDGES, MismatchAlerts, Telemetry, read_histograms


def test_ess_and_masked_tokens_per_sequence_by_hand() -> None:
    # Two sequences, 3 + 2 valid tokens; Δ = log k: k = 1, 1, e² (7.39 > 5: masked), 2, 1/e (< 0.5: masked).
    delta = torch.tensor([[0.0, 0.0, 2.0], [math.log(2.0), -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    corr = PolicyLossOptions().correction_weights(delta, torch.zeros_like(delta), mask)  # IcePop [0.5, 5]
    metrics = weight_metrics(corr, mask)
    # kept weights w = 1, 1, 2 (masked ones 0): ESS/n = (1+1+2)² / (5 · (1+1+4)) = 16/30
    assert float(metrics["icepop/ess_frac"]) == pytest.approx(16 / 30)
    assert float(metrics["icepop/masked_tokens_per_seq"]) == pytest.approx(1.0)  # one each
    assert float(metrics["icepop/masked_seq_frac"]) == pytest.approx(1.0)
    # Nothing masked and k ≡ 1: ESS/n = 1.
    same = PolicyLossOptions().correction_weights(torch.zeros(2, 3), torch.zeros(2, 3), mask)
    assert float(weight_metrics(same, mask)["icepop/ess_frac"]) == pytest.approx(1.0)


def test_staleness_and_mismatch_split_add_up() -> None:
    mask = torch.tensor([[True, True, False]])
    rollout = torch.tensor([[-1.0, -2.0, 9.0]])
    old = torch.tensor([[-1.1, -1.8, 9.0]])  # mismatch |Δ| = 0.1, 0.2
    current = torch.tensor([[-0.6, -2.0, 9.0]])  # staleness |ℓ_θ − ℓ_old| = 0.5, 0.2
    metrics = staleness_metrics(current, old, rollout, mask)
    assert float(metrics["staleness/update_drift_abs_log_ratio_mean"]) == pytest.approx(0.35)
    assert float(metrics["staleness/rollout_gap_abs_log_ratio_mean"]) == pytest.approx(0.15)
    assert float(metrics["staleness/total_abs_log_ratio_mean"]) == pytest.approx((0.4 + 0.0) / 2)
    on_policy = staleness_metrics(old, old, rollout, mask)  # θ = θ_old: no staleness
    assert float(on_policy["staleness/update_drift_abs_log_ratio_mean"]) == 0.0


def stream(mask: list[float], kl: list[float], rel: float = 0.01) -> list[dict[str, float]]:
    return [
        {"icepop/mask_frac": m, "mismatch/kl_k3": k, "mismatch/rel_prob_diff_mean": rel}
        for m, k in zip(mask, kl, strict=True)
    ]


def alerts_of(metrics: list[dict[str, float]], **kwargs: float) -> list[dict]:
    alerts = MismatchAlerts(**kwargs)
    return [event for step, m in enumerate(metrics, start=1) for event in alerts.update(step, m)]


def test_mismatch_threshold_alert_fires_on_crossing_and_rearms() -> None:
    levels = [0.01, 0.03, 0.06, 0.08, 0.04, 0.07]
    metrics = [
        {"icepop/mask_frac": 0.01, "mismatch/kl_k3": 1e-3, "mismatch/rel_prob_diff_mean": r} for r in levels
    ]
    events = alerts_of(metrics, threshold=0.05, window=4)
    assert [(e["step"], e["alert"]) for e in events] == [
        (3, "mismatch_above_threshold"),  # crossed upwards
        (6, "mismatch_above_threshold"),  # again after falling back below at step 5
    ]
    assert not alerts_of(metrics[:2], threshold=0.05, window=4)


def test_kpop_signature_fires_when_mask_falls_while_kl_rises_and_not_otherwise() -> None:
    ramp = [i / 9 for i in range(10)]
    falling_mask = [0.02 - 0.015 * t for t in ramp]
    rising_kl = [1e-3 + 4e-3 * t for t in ramp]
    events = alerts_of(stream(falling_mask, rising_kl), window=10)
    assert [e["alert"] for e in events] == ["mask_falls_while_kl_rises"] and events[0]["step"] == 10
    # Must not fire: both rising (IcePop doing its job), mask falling with flat KL, KL rising below
    # the noise floor, flat noise, and a window not yet full.
    assert not alerts_of(stream([0.01 + 0.01 * t for t in ramp], rising_kl), window=10)
    assert not alerts_of(stream(falling_mask, [2e-3] * 10), window=10)
    assert not alerts_of(stream(falling_mask, [1e-6 + 1e-5 * t for t in ramp]), window=10)
    assert not alerts_of(stream([0.01, 0.011] * 5, [2e-3, 2.1e-3] * 5), window=10)
    assert not alerts_of(stream(falling_mask[:9], rising_kl[:9]), window=10)
    # Nor on a steady mismatch whose mask fraction and KL only fluctuate from step to step (as under
    # injected noise redrawn every step): halves of a window differ by chance, not by a trend.
    noise = torch.Generator().manual_seed(0)
    mask = (0.003 * (1 + 0.5 * torch.randn(300, generator=noise))).clamp(min=0).tolist()
    kl = (2e-3 * (1 + 0.5 * torch.randn(300, generator=noise))).clamp(min=0).tolist()
    assert not alerts_of(stream(mask, kl), window=10)
    # It fires once per episode: a longer ramp does not repeat it every step.
    long_ramp = [i / 19 for i in range(20)]
    events = alerts_of(
        stream([0.02 - 0.015 * t for t in long_ramp], [1e-3 + 4e-3 * t for t in long_ramp]), window=10
    )
    assert len(events) == 1


def test_telemetry_writes_a_histogram_per_step_and_alert_events(tmp_path: Path) -> None:
    telemetry = Telemetry(tmp_path, threshold=0.05, window=4)
    delta = torch.tensor([[0.05, -0.25, 10.0], [-10.0, 0.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, True]])
    lines = telemetry.record(1, delta, mask, stream([0.1], [1e-3], rel=0.2)[0])
    assert len(lines) == 1 and "mismatch_above_threshold" in lines[0]
    telemetry.record(2, delta, mask, stream([0.1], [1e-3], rel=0.2)[0])
    edges, rows = read_histograms(tmp_path)
    assert edges == HISTOGRAM_EDGES.tolist() and [r["step"] for r in rows] == [1, 2]
    counts = rows[0]["counts"]
    assert sum(counts) == 5  # the NaN is not counted; ±10 land in the end bins
    assert counts[0] == 1 and counts[-1] == 1 and counts[30] == 2 and counts[27] == 1  # 0.0/0.05; −0.25
    # mean |log k| by position: (0.05+10)/2, (0.25+0)/2, and 10 alone (the NaN is not a token)
    assert rows[0]["abs_by_position"] == pytest.approx([5.025, 0.125, 10.0])
    assert rows[0]["tokens_by_position"] == [2, 2, 1]
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 1  # still above: no repeat


def test_mismatch_by_position_counts_from_each_response_start() -> None:
    # Row 0's response starts at column 1, row 1's at column 3 (after a longer prompt); padding after.
    delta = torch.tensor([[9.0, 0.1, -0.3, 0.5, 9.0], [9.0, 9.0, 9.0, -0.2, 0.4]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, False, True, True]])
    by_position, tokens = abs_log_ratio_by_position(delta, mask)
    assert by_position.tolist() == pytest.approx([0.15, 0.35, 0.5])  # (0.1+0.2)/2, (0.3+0.4)/2, 0.5
    assert tokens.tolist() == [2, 2, 1]


def test_a_run_with_no_learning_signal_raises_one_alert_that_says_what_to_change() -> None:
    base = {"icepop/mask_frac": 0.0, "mismatch/kl_k3": 0.0, "mismatch/rel_prob_diff_mean": 0.0}
    dead = {**base, "reward/zero_variance_group_frac": 1.0, "actor/grad_norm": 0.5, "reward/mean": 0.0}
    zero_grad = {**base, "reward/zero_variance_group_frac": 0.5, "actor/grad_norm": 0.0}
    alive = {**base, "reward/zero_variance_group_frac": 0.5, "actor/grad_norm": 0.5}
    stream = [dead, dead, zero_grad, alive, dead, dead, dead, dead, dead, dead]
    events = alerts_of(stream, threshold=0.05, window=4)
    assert [(e["step"], e["alert"]) for e in events] == [(8, "no_learning_signal")]  # once, after 4 in a row
    assert "algo.dynamic_sampling" in events[0]["hint"] and events[0]["reward_mean"] == 0.0
    assert not alerts_of([alive] * 10, threshold=0.05, window=4)
