"""`stage: compare` (`+recipe=mismatch`): arms of one RL stage composed as if run alone, run one after
the other on one cluster, then one report; refusals before Ray; a rerun skips the finished arms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_helpers import QUICK_SFT, SMALL, Run, icepop_train, run_icepop
from test_config import compose_config

from icepop.config import CompareConfig
from icepop.tracking import read_metrics


def test_the_mismatch_recipe_has_two_arms_that_differ_in_their_correction_only() -> None:
    config = compose_config("+recipe=mismatch")
    assert config.stage == "compare" and config.compare.recipe == "rlvr"
    assert config.compare.arms == {"none": ["algo.correction=none"], "icepop": ["algo.correction=icepop"]}
    assert "rollout.max_staleness=4" in config.compare.overrides  # the map's clearest setting


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["~compare.arms.icepop"], "compare.arms names 1 arm(s): a comparison needs two or more"),
        (["compare.recipe=sft"], "compare.recipe='sft' is not one of rlvr, rlhf"),
    ],
)
def test_a_comparison_that_cannot_run_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose_config("+recipe=mismatch", *overrides)


def test_an_arm_name_is_a_folder_name() -> None:
    with pytest.raises(ValueError, match=r"the name '\.\./up' is a folder name"):
        CompareConfig(arms={"none": [], "../up": []})


def test_a_wrong_arm_is_named_before_anything_starts(tmp_path: Path) -> None:
    result = run_icepop(tmp_path, "+recipe=mismatch", 'compare.arms.icepop=["algo.correction=icepopp"]')
    assert result.returncode != 0
    assert "correction='icepopp' is not one of" in result.stderr
    assert "(arm compare.arms.icepop)" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("runs/compare-*/none"))  # no arm started


ARMS = 'compare.overrides=["rollout.mismatch_noise=1.0","train.steps=2","train.eval_every=0"]'


@pytest.mark.slow
@pytest.mark.ray
def test_both_arms_run_from_one_start_and_are_reported_side_by_side(
    tmp_path: Path, shared_cache: Path, tiny_default_run: Run
) -> None:
    """Takes `tiny_default_run` only to come after it (it builds the shared SFT warm-up)."""
    given = ["+recipe=mismatch", *QUICK_SFT, *SMALL, ARMS, "run.dir=cmp"]
    result = icepop_train(tmp_path, *given, cache=shared_cache)
    root = tmp_path / "cmp"
    masked = {arm: [r["icepop/mask_frac"] for r in read_metrics(root / arm)] for arm in ("none", "icepop")}
    assert masked["none"] == [0.0, 0.0] and max(masked["icepop"]) > 0  # noise 1.0: IcePop masks some
    first = {arm: read_metrics(root / arm)[0] for arm in ("none", "icepop")}
    assert first["none"]["reward/mean"] == first["icepop"]["reward/mean"]  # same start, same samples
    report = (root / "report" / "report.md").read_text()
    assert "none: none, noise 1.0" in report and "icepop: icepop [0.5, 5.0], noise 1.0" in report
    assert (root / "report" / "metrics.png").is_file()
    assert [s["stage"] for s in json.loads((root / "compare.json").read_text())] == [
        "rlvr none",
        "rlvr icepop",
    ]
    assert "rlvr none: held-out greedy accuracy" in result.stdout
    again = icepop_train(tmp_path, *given, cache=shared_cache)
    assert again.stdout.count("is complete in") == 2 and len(read_metrics(root / "none")) == 2
