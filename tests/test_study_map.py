"""The mismatch map's protocol (icepop.study_map: degraded, collapsed, separated) and its drawing, on
synthetic arms written the way studies/mismatch_map.py keeps them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icepop.report import main as report_main
from icepop.stages.summary import write_summary
from icepop.study_map import CORRECTIONS, SOURCES, arm_name, read_map, separates, table, verdict


def write_arm(
    root: Path, source: str, correction: str, seed: int, accuracy: list[float], reward: tuple[float, float],
    steps: int = 10,
) -> None:  # fmt: skip
    """An arm whose held-out accuracy goes through `accuracy` and whose reward moves linearly."""
    arm = root / arm_name(source, correction, seed)
    arm.mkdir(parents=True)
    meta = {"commit": "0" * 40, "source": source, "correction": correction, "seed": seed, "overrides": []}
    (arm / "arm.json").write_text(json.dumps(meta))
    rows = [
        {"step": s + 1, "reward/mean": reward[0] + (reward[1] - reward[0]) * s / (steps - 1),
         "mismatch/abs_logp_diff_mean": 0.01 * (1 + s), "mismatch/abs_logp_diff_max": 0.5,
         "icepop/mask_frac": 0.02, "actor/entropy": 0.7, "actor/grad_norm": 1.0 + s}
        for s in range(steps)
    ]  # fmt: skip
    (arm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"step": 5 * i, "eval/accuracy": a} for i, a in enumerate(accuracy)]
    (arm / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    write_summary(arm, "rlvr", steps, 1.0, "held-out greedy accuracy", accuracy[0], accuracy[-1], None)


@pytest.fixture
def arms(tmp_path: Path) -> Path:
    for seed, end in ((0, 0.20), (1, 0.18)):
        write_arm(tmp_path, "fp32", "none", seed, [0.08, 0.15, end], (0.1, 0.2))
    # Noise 0.3: no correction degrades on both seeds; IcePop holds on both (separates, better); TIS
    # separates on seed 0 only; KPop has one seed; seed 1 of TRM collapses (reward halves).
    for seed, end in ((0, 0.10), (1, 0.09)):
        write_arm(tmp_path, "noise-0.3", "none", seed, [0.08, 0.10, end], (0.1, 0.12))
    for seed, end in ((0, 0.19), (1, 0.17)):
        write_arm(tmp_path, "noise-0.3", "icepop", seed, [0.08, 0.14, end], (0.1, 0.2))
    write_arm(tmp_path, "noise-0.3", "tis", 0, [0.08, 0.16, 0.17], (0.1, 0.2))
    write_arm(tmp_path, "noise-0.3", "tis", 1, [0.08, 0.10, 0.11], (0.1, 0.2))
    write_arm(tmp_path, "noise-0.3", "kpop", 0, [0.08, 0.16, 0.19], (0.1, 0.2))
    write_arm(tmp_path, "noise-0.3", "trm", 0, [0.08, 0.10, 0.08], (0.1, 0.1))
    write_arm(tmp_path, "noise-0.3", "trm", 1, [0.08, 0.05, 0.02], (0.2, 0.05))
    return tmp_path


def test_the_protocol_reads_degraded_collapsed_and_separated(arms: Path) -> None:
    found = read_map(arms)
    assert found["fp32", "none", 0].outcome == pytest.approx((0.15 + 0.20) / 2)  # the last two evals
    assert found["fp32", "none", 0].start == 0.08
    assert verdict(found["fp32", "none", 0], found) == "held"
    assert [verdict(found["noise-0.3", "none", s], found) for s in (0, 1)] == ["degraded", "degraded"]
    assert verdict(found["noise-0.3", "icepop", 1], found) == "held"
    assert verdict(found["noise-0.3", "trm", 1], found) == "collapsed"  # below its start, reward quartered
    assert verdict(found["noise-0.3", "trm", 0], found) == "degraded"
    assert separates("noise-0.3", "icepop", found) == "better"
    assert separates("noise-0.3", "tis", found) == "not separated"  # seed 1 differs by 0.01 only
    assert separates("noise-0.3", "kpop", found) == "one seed"
    assert separates("noise-0.3", "trm", found) == "not separated"  # 0.09 → 0.035 vs 0.095 → 0.095
    write_arm(arms, "fp16", "none", 2, [0.1, 0.1, 0.1], (0.1, 0.1))
    assert verdict(read_map(arms)["fp16", "none", 2], read_map(arms)) == "no reference"


def test_worse_needs_every_seed(arms: Path) -> None:
    for seed in (0, 1):
        write_arm(arms, "noise-0.3", "opsm", seed, [0.08, 0.02, 0.0], (0.1, 0.1))
    assert separates("noise-0.3", "opsm", read_map(arms)) == "worse"


def test_the_report_draws_the_map_and_the_curves_of_a_completed_level(arms: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report_main(["--map", str(arms), "--out", str(out)])
    text = (out / "map.md").read_text()
    assert "(11 arms; commits 0000000000)" in text
    row = next(line for line in text.splitlines() if line.startswith("| injected noise 0.3 | icepop |"))
    assert "| 2 | 0.080 → 0.165, 0.080 → 0.155 |" in row and "| better |" in row
    assert "held, held" in row and "0.015 → 0.095" in row  # mismatch grew over the run: first → last fifth
    assert (out / "map.png").stat().st_size > 10_000
    assert (out / "curves-noise-0.3.png").is_file() and not (out / "curves-fp32.png").exists()


def test_every_arm_is_a_valid_run() -> None:
    assert all(s.reference in SOURCES and not SOURCES[s.reference].mismatch for s in SOURCES.values())
    assert all(o.split("=")[0] in {"algo.correction", "algo.ratio_low", "algo.ratio_high"}
               for options in CORRECTIONS.values() for o in options)  # fmt: skip
    with pytest.raises(SystemExit, match="no arms"):
        report_main(["--map", str(Path(__file__).parent)])


def test_the_kept_map_is_what_docs_show() -> None:
    """studies/map's arms (each with the commit it ran on) give docs/study/map/map.md's table: a new arm
    or a protocol change without `python -m icepop.report --map studies/map` fails here."""
    root = Path(__file__).resolve().parent.parent
    arms = read_map(root / "studies" / "map")
    assert arms and all(len(json.loads((root / "studies" / "map" / arm_name(*key) / "arm.json").read_text())
                                ["commit"]) == 40 for key in arms)  # fmt: skip
    assert table(arms) in (root / "docs" / "study" / "map" / "map.md").read_text()
