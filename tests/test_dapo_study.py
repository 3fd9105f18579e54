"""The DAPO-against-GRPO study on SmolLM2 (studies/dapo_vs_grpo.py): its kept runs give the table in
docs/study/dapo/table.md and the numbers in README, and its per-minute axis adds up step times."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def study(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "studies"))  # the script imports its neighbours, as when run
    return importlib.import_module("dapo_vs_grpo")


def test_minutes_are_the_steps_wall_time_so_far(study: Any) -> None:
    metrics = [{"step": 1, "perf/step_seconds": 60.0}, {"step": 2, "perf/step_seconds": 30.0},
               {"step": 3, "perf/step_seconds": 90.0}]  # fmt: skip
    assert study.minutes_at(metrics, [0, 2, 3]) == [0.0, 1.5, 3.0]
    assert study.rollout_seconds({"timing/generate_seconds": 2.0, "timing/reward_seconds": 0.5}) == 2.5
    assert (
        study.rollout_seconds({"timing/generate_seconds": 2.0, "timing/dynamic_sampling_seconds": 4.0}) == 6.0
    )


def test_the_kept_runs_are_what_docs_and_readme_show(study: Any) -> None:
    """A new run, or a change to the table, without redrawing (`python studies/dapo_vs_grpo.py draw`) and
    updating README's table fails here."""
    rows = study.arm_rows(ROOT / "studies" / "dapo")
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        (a, s) for a in sorted(study.ARMS) for s in (0, 1, 2)
    ]
    assert all(len(r["commit"]) == 40 and r["steps"] == [0, 3, 6, 9, 12] for r in rows)
    assert study.table(rows) in (ROOT / "docs" / "study" / "dapo" / "table.md").read_text()
    runs = {(r["arm"], r["seed"]): r for r in rows}
    readme = (ROOT / "README.md").read_text()
    for seed in (0, 1, 2):
        grpo, dapo = runs["grpo", seed], runs["dapo", seed]
        at = {arm: dict(zip(r["steps"], r["accuracy"], strict=True)) for arm, r in (("g", grpo), ("d", dapo))}
        assert at["g"][0] == at["d"][0]  # the same model, the same held-out problems per seed
        line = (f"| {seed} | {at['g'][0]:.1%} | {at['g'][6]:.1%} / {at['g'][12]:.1%} | {at['d'][6]:.1%} / "
                f"{at['d'][12]:.1%} | {grpo['step_seconds']:.1f} | {dapo['step_seconds']:.1f} |")  # fmt: skip
        assert line in readme, line
