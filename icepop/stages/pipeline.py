"""SFT → reward model → RLVR → RLHF (→ eval) as one command (`+recipe=pipeline`), arms of one RL stage
side by side (`stage: compare`, e.g. `+recipe=mismatch`), and the stage dispatcher.

Key design choice: each stage of a pipeline is composed exactly as if it were run alone — its own
recipe, then the pipeline command's overrides, then `pipeline.overrides.<stage>`, then the paths the
earlier stages produced (`model.path`, `reward.model_path`) — and runs in its own sub-directory. A
stage whose summary.json exists is complete and is skipped, so re-running a crashed pipeline with the
same `run.dir` resumes at the stage it stopped in.

A comparison's arm is composed the same way — `+recipe=<compare.recipe>`, the command's own overrides,
`compare.overrides`, then the arm's — and runs in run.dir/<arm>. Every arm is composed and its inputs
checked before Ray starts, so a wrong arm stops the command before the first one runs; a complete arm
is skipped on a rerun. The arms share one cluster; icepop.report compares them in run.dir/report.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from icepop.config import Config
from icepop.ray import cluster
from icepop.stages.summary import Summary, read_summary

RM_USERS = ("rlhf", "eval")  # stages that get the pipeline's reward model as reward.model_path


class Composer(Protocol):
    """Hydra overrides → the composed, checked config of one stage (icepop.train supplies it); with
    check=False only the settings are checked, not the model, data and reward (for sizing)."""

    def __call__(self, overrides: list[str], check: bool = True) -> Config: ...


def run_stage(config: Config, run_dir: Path, compose: Composer | None = None) -> Summary | list[Summary]:
    """Run the stage the config names; `compose` is needed by the pipeline only."""
    if config.stage == "sft":
        from icepop.stages.sft import run_sft

        return run_sft(config, run_dir)
    elif config.stage == "rm":
        from icepop.stages.rm import run_rm

        return run_rm(config, run_dir)
    elif config.stage in ("rlvr", "rlhf"):
        from icepop.stages.rl import run_rl

        return run_rl(config, run_dir)
    elif config.stage == "eval":
        from icepop.stages.evaluate import run_eval

        return run_eval(config, run_dir)
    assert config.stage in ("pipeline", "compare") and compose is not None
    if config.stage == "compare":
        return run_compare(config, run_dir, compose)
    return run_pipeline(config, run_dir, compose)


def run_in(config: Config, stage_dir: Path) -> Summary:
    """One stage of a pipeline or arm of a comparison, in its own directory with its config saved."""
    from omegaconf import OmegaConf

    stage_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(config), stage_dir / "config.yaml")
    result = run_stage(config, stage_dir)
    assert isinstance(result, Summary)
    return result


def run_pipeline(config: Config, run_dir: Path, compose: Composer) -> list[Summary]:
    """Run (or resume) the stages in order; prints and saves the table of their before/after measures."""
    # Every stage composed once up front: a wrong stage override stops the pipeline before its first
    # stage, and the one cluster the stages share is sized for the largest of them.
    stand_in = {"reward.model_path": "pipeline-reward-model"}  # its path once the rm stage has run
    sizes = [compose(stage_overrides(config, stage, run_dir, stand_in if stage in RM_USERS else {}),
                     check=False) for stage in config.pipeline.stages]  # fmt: skip
    policy: str | None = None  # the latest policy checkpoint: where the next policy stage starts
    reward_model: str | None = None
    summaries = []
    with cluster.kept(config, sizes):
        for index, stage in enumerate(config.pipeline.stages, start=1):
            stage_dir = run_dir / f"{index}-{stage}"
            summary = read_summary(stage_dir)
            if summary is not None:
                print(f"icepop pipeline: stage {index} ({stage}) is complete in {stage_dir}; skipping it")
            else:
                given = {"model.path": policy} if policy else {}
                given |= {"reward.model_path": reward_model} if stage in RM_USERS and reward_model else {}
                overrides = stage_overrides(config, stage, run_dir, given)
                print(f"icepop pipeline: stage {index} ({stage}): {' '.join(overrides)}")
                summary = run_in(compose(overrides), stage_dir)
            summaries.append(summary)
            if stage == "rm":
                reward_model = summary.checkpoint
            elif stage != "eval":
                policy = summary.checkpoint
    table = summary_table(summaries)
    print(table)
    (run_dir / "pipeline.md").write_text(table + "\n")
    (run_dir / "pipeline.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return summaries


def stage_overrides(config: Config, stage: str, run_dir: Path, paths: dict[str, str]) -> list[str]:
    """A stage's command line: its recipe, pipeline.overrides.<stage>, its run directory, and the paths
    earlier stages produced."""
    index = config.pipeline.stages.index(stage) + 1
    return [
        f"+recipe={stage}",
        *config.pipeline.overrides.get(stage, []),
        f"run.dir={run_dir / f'{index}-{stage}'}",
        *(f"{key}={value}" for key, value in paths.items()),
    ]


def summary_table(summaries: list[Summary]) -> str:
    """A Markdown table: per stage, its steps, wall time, measure, and the measure before and after."""
    lines = [
        "| stage | steps | minutes | measure | before | after |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for s in summaries:
        before = "" if s.before is None else f"{s.before:.3f}"
        lines.append(
            f"| {s.stage} | {s.steps} | {s.seconds / 60:.1f} | {s.measure} | {before} | {s.after:.3f} |"
        )
    return "\n".join(lines)


def arm_overrides(config: Config, name: str, run_dir: Path) -> list[str]:
    """An arm's command line: its recipe, the comparison's overrides, its own, its run directory."""
    compare = config.compare
    return [f"+recipe={compare.recipe}", *compare.overrides, *compare.arms[name], f"run.dir={run_dir / name}"]


def arm_configs(config: Config, run_dir: Path, compose: Composer) -> dict[str, Config]:
    """Every arm's composed config, its inputs checked (none for a stage that is not a comparison)."""
    if config.stage != "compare":
        return {}
    arms = {}
    for name in config.compare.arms:
        try:
            arms[name] = compose(arm_overrides(config, name, run_dir))
        except SystemExit as error:  # a wrong setting: say which arm has it
            raise SystemExit(f"{error} (arm compare.arms.{name})") from None
    return arms


def run_compare(config: Config, run_dir: Path, compose: Composer) -> list[Summary]:
    """Run (or resume) every arm, then write the report; returns the arms' summaries, named by arm."""
    from icepop.report import report

    arms = arm_configs(config, run_dir, compose)
    summaries = []
    with cluster.kept(config, list(arms.values())):
        for name, arm in arms.items():
            summary = read_summary(run_dir / name)
            if summary is not None:
                print(f"icepop compare: arm {name} is complete in {run_dir / name}; skipping it")
            else:
                print(f"icepop compare: arm {name}: {' '.join(arm_overrides(config, name, run_dir))}")
                summary = run_in(arm, run_dir / name)
            summaries.append(dataclasses.replace(summary, stage=f"{summary.stage} {name}"))
    path = report([run_dir / name for name in arms], run_dir / "report")
    print(f"icepop compare: the arms side by side in {path} (metrics.png, histograms.png)")
    (run_dir / "compare.json").write_text(json.dumps([dataclasses.asdict(s) for s in summaries], indent=2))
    return summaries
