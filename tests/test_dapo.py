"""DAPO's pieces (docs/algorithm.md §11): the soft overlong punishment, exactly; the groups dynamic
sampling keeps; the fill of a step's batch, with a scripted engine and reward standing in for the run's
(the real run with resume is in tests/test_rlvr_e2e.py); and the settings that cannot work."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import DETERMINISTIC, REFERENCE, Run, icepop_train
from test_config import compose_config

from icepop.algo import informative_groups, overlong_penalty
from icepop.config import Config
from icepop.data.prompts import ShuffledBatches
from icepop.rewards.pool import Scores
from icepop.stages import checkpoint, dynamic_sampling
from icepop.stages.batch import overlong_shaping
from icepop.stages.summary import SUMMARY
from icepop.tracking import read_metrics
from icepop.types import Completion, Prompt, SamplingSettings


def test_the_overlong_penalty_is_dapos_formula() -> None:
    lengths = torch.tensor([0, 12, 16, 17, 18, 20, 21])
    # L_max 20, buffer 4: 0 up to 16, then ((20 − 4) − L)/4 down to −1 at 20, −1 beyond; × factor.
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4).tolist() == expected
    assert overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [0.5 * e for e in expected]
    assert overlong_penalty(lengths, 20, 20).tolist()[:3] == [0.0, -0.6, -0.8]  # the whole length a ramp
    with pytest.raises(ValueError, match="buffer=21 must be in"):
        overlong_penalty(lengths, 20, 21)
    replies = [Completion([1] * n, [0.0] * n, "", "stop") for n in (10, 19)]
    assert overlong_shaping(4, 1.0, replies, 20).tolist() == [0.0, -0.75]
    assert overlong_shaping(0, 1.0, replies, 20).tolist() == [0.0, 0.0]  # off


def test_only_groups_whose_rewards_differ_are_informative() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, False]
    assert informative_groups(rewards, 4).tolist() == [True, True]


@dataclass
class Scripted:
    """Stands in for the run's engines and rule reward: a prompt whose first id is odd gets rewards
    0, 1, 0, 1, ... (informative), an even one all 1; it records the prompts it was asked for."""

    asked: list[list[int]] = field(default_factory=list)

    def generate(
        self, prompts: list[Prompt], size: int, sampling: SamplingSettings
    ) -> list[list[Completion]]:
        self.asked.append([p.prompt_ids[0] for p in prompts])
        return [[Completion([p.prompt_ids[0]], [0.0], "", "stop") for _ in range(size)] for p in prompts]

    def score_rollouts(self, prompts: list[Prompt], completions: list[Completion]) -> Scores:
        return Scores([float(i % 2) if p.prompt_ids[0] % 2 else 1.0 for i, p in enumerate(prompts)], {})


@dataclass
class ScriptedRun:
    config: Config
    extras: Any
    engines: Any
    rewards: Any
    printed: list[str] = field(default_factory=list)

    @property
    def tracker(self) -> Any:
        return self

    def print(self, message: str) -> None:
        self.printed.append(message)


def batch_of(ids: list[int], size: int) -> tuple[list[Prompt], list[list[Completion]], Scores]:
    prompts = [Prompt([i]) for i in ids]
    scripted = Scripted()
    groups = scripted.generate(prompts, size, SamplingSettings())
    return prompts, groups, scripted.score_rollouts([p for p in prompts for _ in range(size)], [])


def test_a_step_is_filled_with_informative_groups_from_the_extra_stream() -> None:
    config = compose_config("+recipe=rlvr", "algo.prompts_per_step=4", "algo.samples_per_prompt=2",
                            "algo.dynamic_sampling=true", "algo.max_sampling_rounds=3")  # fmt: skip
    scripted = Scripted()
    extras = ShuffledBatches([Prompt([i]) for i in range(100, 140)], 4, seed=0)
    run = ScriptedRun(config, extras, scripted, scripted)
    prompts, groups, scored = batch_of([1, 2, 4, 5], 2)  # two informative, two not
    filled = dynamic_sampling.fill(run, 1, prompts, groups, scored, SamplingSettings(seed=5))
    ids = [p.prompt_ids[0] for p in filled.prompts]
    assert ids[:2] == [1, 5] and all(i % 2 for i in ids) and len(ids) == 4 and filled.changed
    assert filled.rewards.tolist() == [0.0, 1.0] * 4
    # A shortfall of 2 at the first batch's yield of 1/2 asks for 4 prompts, then for what the yield says.
    asked = [len(a) for a in scripted.asked]
    assert asked[0] == 4 and len(asked) == filled.stats["dynamic_sampling/rounds"] - 1
    stats = filled.stats
    assert stats["dynamic_sampling/groups_trained"] == 4 and stats["dynamic_sampling/groups_informative"] >= 4
    assert stats["dynamic_sampling/groups_generated"] == 4 + sum(asked)
    assert extras.state_dict()["position"] == sum(asked)  # every extra drawn from the extra stream
    assert not run.printed


def test_a_step_that_cannot_be_filled_trains_on_what_splits_evenly_and_says_so() -> None:
    config = compose_config("+recipe=rlvr", "algo.prompts_per_step=4", "algo.samples_per_prompt=2",
                            "algo.dynamic_sampling=true", "algo.max_sampling_rounds=1")  # fmt: skip
    run = ScriptedRun(config, ShuffledBatches([Prompt([0])], 1, seed=0), Scripted(), Scripted())
    prompts, groups, scored = batch_of([1, 2, 4, 6], 2)  # one informative group: 2 samples over 2 ranks
    filled = dynamic_sampling.fill(run, 3, prompts, groups, scored, SamplingSettings())
    assert [p.prompt_ids[0] for p in filled.prompts] == [1] and filled.changed
    assert "training on 1 of algo.prompts_per_step=4" in run.printed[0]
    three = replace(config, trainer=replace(config.trainer, ranks=4))  # 2 samples cannot split over 4 ranks
    run = ScriptedRun(three, None, Scripted(), Scripted())
    filled = dynamic_sampling.fill(run, 3, prompts, groups, scored, SamplingSettings())
    assert filled.prompts == prompts and not filled.changed and "the batch as it was" in run.printed[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.overlong_buffer=40", "rollout.max_new_tokens=32"], "algo.overlong_buffer=40 is longer than"),
        (["algo.max_sampling_rounds=0"], "algo.max_sampling_rounds must be > 0"),
        (["algo.overlong_penalty=-1"], "algo.overlong_penalty must be >= 0"),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(Exception) as error:
        compose_config("+recipe=rlvr", *overrides)
    assert message in str(error.value) or message in str(error.value.__cause__)


DAPO = [*REFERENCE, "train.steps=4", "algo.dynamic_sampling=true",
        "reward.function=e2e_rewards:half_constant", "algo.overlong_buffer=4"]  # fmt: skip
"""The reference run with dynamic sampling and overlong shaping, on a reward that leaves about half the
groups with nothing to learn. Its tests take `tiny_default_run` only to come after it: that run must be
the one that builds the shared SFT warm-up (tests/test_rlvr_e2e.py checks it did)."""


@pytest.mark.slow
@pytest.mark.ray
def test_dynamic_sampling_fills_every_step_and_a_resumed_run_draws_the_same_extras(
    tmp_path: Path, shared_cache: Path, tiny_default_run: Run
) -> None:
    run_dir = tmp_path / "run"
    result = icepop_train(tmp_path, *DAPO, f"run.dir={run_dir}", cache=shared_cache)
    rows = read_metrics(run_dir)
    trained = [r["dynamic_sampling/groups_trained"] for r in rows]
    assert trained == [min(4.0, r["dynamic_sampling/groups_informative"]) for r in rows] and 4.0 in trained
    assert ("dynamic sampling found" in result.stdout) == (min(trained) < 4)  # an unfilled step says so
    assert all(r["reward/zero_variance_group_frac"] == 0.0 for r in rows)
    assert any(r["dynamic_sampling/rounds"] > 1 for r in rows)
    extra = [r["timing/dynamic_sampling_seconds"] for r in rows if r["dynamic_sampling/rounds"] > 1]
    assert min(extra) > 0  # the extra rounds' time on their own, not inside timing/reward_seconds
    assert all(r["reward/shaped_mean"] <= r["reward/mean"] for r in rows)  # a penalty, never a bonus
    uninterrupted = {r["step"]: r for r in rows}
    shutil.rmtree(checkpoint.step_dir(run_dir, 4))  # as if it had died in step 3 or 4
    (run_dir / SUMMARY).unlink()
    assert "extras" in checkpoint.read_state(checkpoint.step_dir(run_dir, 2))
    icepop_train(tmp_path, *DAPO, f"run.dir={run_dir}", cache=shared_cache)
    for row in read_metrics(run_dir)[2:]:  # the extras' stream resumed where it was: the same steps
        for key in (*DETERMINISTIC, "dynamic_sampling/rounds", "dynamic_sampling/groups_generated"):
            assert row[key] == pytest.approx(uninterrupted[row["step"]][key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
@pytest.mark.ray
def test_dynamic_sampling_with_stale_rollouts_and_truncated_replies_left_out(
    tmp_path: Path, shared_cache: Path, tiny_default_run: Run
) -> None:
    """Extra rounds generated while the next batch is in flight, and DAPO's overlong filtering."""
    given = [*DAPO, "train.steps=2", "rollout.max_staleness=1", "algo.mask_truncated=true", "run.dir=run"]
    icepop_train(tmp_path, *given, cache=shared_cache)
    rows = read_metrics(tmp_path / "run")
    assert [r["staleness/versions_behind_max"] for r in rows] == [0, 1]
    assert all(r["reward/zero_variance_group_frac"] == 0.0 for r in rows)
    assert all(math.isfinite(r["actor/loss"]) for r in rows)  # even when the cut replies were most of it
