"""Stale rollouts (rollout.max_staleness, docs/algorithm.md §8): the decoupled
objective from its definition, the staleness split and its alert on synthetic tensors; then real runs
with N = 1 — one version behind from step 2 on, step 1 bit for bit the serial loop's, the same numbers
twice, and a resume whose batch in flight is regenerated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import DETERMINISTIC, REFERENCE, Run, icepop_train
from hydra import compose, initialize_config_dir

from icepop.algo import PolicyLossOptions, pg_loss
from icepop.stages import checkpoint
from icepop.stages.step_metrics import staleness_split, staleness_statistics
from icepop.stages.summary import SUMMARY
from icepop.telemetry import MismatchAlerts
from icepop.tracking import read_metrics
from icepop.train import CONF_DIR, prepare
from icepop.types import RLBatch


def decoupled_loss(
    lp: torch.Tensor,
    prox: torch.Tensor,
    behaviour: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    low: float = 0.5,
    high: float = 5.0,
    eps: float = 0.2,
) -> torch.Tensor:
    """§8 written out token by token: M(π_prox/π_inf) · min(r·A, clip(r)·A), r = π_θ/π_prox, token-mean."""
    total = lp.new_zeros(())
    for i, t in mask.nonzero().tolist():
        k = float(torch.exp(prox[i, t] - behaviour[i, t]))
        if not low <= k <= high:
            continue
        r = torch.exp(lp[i, t] - prox[i, t])
        total = total + k * torch.minimum(r * adv[i, t], torch.clamp(r, 1 - eps, 1 + eps) * adv[i, t])
    return -total / mask.sum()  # fmt: skip


def test_the_loss_bands_the_proximal_over_behaviour_ratio_and_clips_against_the_proximal_policy() -> None:
    torch.manual_seed(0)
    prox = -torch.rand(4, 6, dtype=torch.float64) * 3
    behaviour = prox - torch.randn(4, 6, dtype=torch.float64) * 0.9  # staleness + mismatch: some k out
    theta = (prox + torch.randn(4, 6, dtype=torch.float64) * 0.3).requires_grad_()
    adv, mask = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6) < 0.8
    options = PolicyLossOptions(clip_low=0.2, clip_high=0.2)
    result = pg_loss(theta, prox, behaviour, adv, mask, options)
    (grad,) = torch.autograd.grad(result.loss, theta)
    expected_theta = theta.detach().clone().requires_grad_()
    expected = decoupled_loss(expected_theta, prox, behaviour, adv, mask)
    (expected_grad,) = torch.autograd.grad(expected, expected_theta)
    assert 0 < float(result.metrics["icepop/mask_frac"]) < 1  # the band is at work
    assert float(result.loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


def batch_of(prox: torch.Tensor, behaviour: torch.Tensor) -> RLBatch:
    rows, width = prox.shape
    ids = torch.zeros(rows, width + 1, dtype=torch.long)
    mask = torch.ones(rows, width, dtype=torch.bool)
    batch = RLBatch(ids, torch.ones_like(ids), mask, behaviour.float(), torch.zeros(rows, width))
    batch.old_logprobs = prox.float()
    return batch


def test_the_split_tells_staleness_from_engine_mismatch() -> None:
    engine_now = torch.full((2, 4), -1.0)  # the engine's log-probs at the trainer's weights
    prox = engine_now + 0.01  # engine mismatch: small, always inside the band
    behaviour = engine_now.clone()
    behaviour[0] = -4.0  # row 0: the weights moved since it was sampled, k = e^3.01 ≈ 20 > β
    split = staleness_split(batch_of(prox, behaviour), engine_now, PolicyLossOptions())
    assert split["staleness/engine_mismatch_abs_log_ratio_mean"] == pytest.approx(0.01, abs=1e-6)
    assert split["staleness/engine_drift_abs_log_ratio_mean"] == pytest.approx(1.5, abs=1e-6)
    assert split["staleness/mismatch_only_mask_frac"] == 0.0
    assert staleness_statistics(batch_of(prox, behaviour), behind=1, max_staleness=2) == {
        "staleness/versions_behind_mean": 1.0, "staleness/versions_behind_max": 1.0,
        "staleness/frac_0_behind": 0.0, "staleness/frac_1_behind": 1.0, "staleness/frac_2_behind": 0.0,
    }  # fmt: skip


def test_the_staleness_alert_fires_when_masking_is_staleness_not_mismatch() -> None:
    alerts = MismatchAlerts(threshold=0.05, window=20)

    def step(n: int, masked: float, alone: float | None) -> list[str]:
        metrics = {"mismatch/rel_prob_diff_mean": 0.01, "icepop/mask_frac": masked, "mismatch/kl_k3": 1e-6}
        if alone is not None:
            metrics["staleness/mismatch_only_mask_frac"] = alone
        return [event["alert"] for event in alerts.update(n, metrics)]

    assert step(1, 0.30, None) == []  # serial: no split, no alert
    assert step(2, 0.030, 0.020) == []  # staleness adds 1 point: within the margin
    assert step(3, 0.30, 0.20) == []  # mismatch masks most of it: the band's business
    assert step(4, 0.30, 0.02) == ["masking_driven_by_staleness"]
    assert step(5, 0.35, 0.02) == []  # once per episode
    assert step(6, 0.03, 0.02) == [] and step(7, 0.3, 0.02) == ["masking_driven_by_staleness"]


def test_colocated_engines_cannot_serve_stale_rollouts() -> None:
    overrides = [
        "+recipe=rlvr",
        "cluster.placement=colocated",
        "rollout.engines=2",
        "rollout.max_staleness=1",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(
            SystemExit, match=r"use cluster\.placement=disaggregated, or rollout\.max_staleness=0"
        ):
            prepare(cfg, overrides)


ASYNC = [*REFERENCE, "train.steps=4", "rollout.max_staleness=1"]
"""The reference run (bfloat16 engine, checkpoints every 2 steps) with rollouts one step ahead."""


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Run:
    tmp = tmp_path_factory.mktemp("async")
    return Run(tmp / "run", icepop_train(tmp, *ASYNC, "run.dir=run", cache=shared_cache).stdout)


def behind(rows: list[dict]) -> list[float]:
    return [row["staleness/versions_behind_max"] for row in rows]


@pytest.mark.slow
@pytest.mark.ray
def test_rollouts_one_step_ahead_are_one_version_behind_and_step_1_is_the_serial_loops(
    async_run: Run, reference_run: Run
) -> None:
    rows, serial = read_metrics(async_run.dir), read_metrics(reference_run.dir)
    assert behind(rows) == [0, 1, 1, 1] and behind(serial)[:4] == [0, 0, 0, 0]
    assert all(rows[0][key] == serial[0][key] for key in DETERMINISTIC)  # bit for bit: N = 0 at step 1
    assert rows[1]["actor/loss"] != serial[1]["actor/loss"]  # step 2 trained on other rollouts
    for row in rows[1:]:  # the split, measured where the batch is stale (temperature 1)
        assert row["staleness/engine_drift_abs_log_ratio_mean"] > 0
        assert row["staleness/mismatch_only_mask_frac"] <= row["icepop/mask_frac"]
    assert "staleness/engine_drift_abs_log_ratio_mean" not in rows[0]
    assert all(row["sync/probe_abs_logp_diff_mean"] < 0.1 for row in rows)  # every sync checked
    assert "perf/rollout_tokens_per_second" not in rows[1] and rows[1]["perf/tokens_per_second"] > 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_fixed_staleness_gives_the_same_numbers_twice(
    async_run: Run, tmp_path: Path, shared_cache: Path
) -> None:
    icepop_train(tmp_path, *ASYNC, "train.steps=3", "run.dir=again", cache=shared_cache)
    again, first = read_metrics(tmp_path / "again"), read_metrics(async_run.dir)
    assert [[row[key] for key in DETERMINISTIC] for row in again] == [
        [row[key] for key in DETERMINISTIC] for row in first[:3]
    ]


@pytest.mark.slow
@pytest.mark.ray
def test_a_resume_regenerates_the_batch_that_was_in_flight(
    async_run: Run, tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(async_run.dir, run_dir)
    shutil.rmtree(checkpoint.step_dir(run_dir, 4))  # as if it had died in step 3 or 4
    (run_dir / SUMMARY).unlink()
    state = checkpoint.read_state(checkpoint.step_dir(run_dir, 2))
    assert state["data"]["position"] == 2 * 4  # steps 1-2's prompts; step 3's were drawn, in flight
    result = icepop_train(tmp_path, *ASYNC, f"run.dir={run_dir}", cache=shared_cache)
    assert "(step 2 of 4)" in result.stdout
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and behind(rows) == [0, 1, 0, 1]
    assert rows[:2] == read_metrics(async_run.dir)[:2]  # kept as logged
