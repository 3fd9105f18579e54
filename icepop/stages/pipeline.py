"""SFT → reward model → RLVR → RLHF (→ eval) as one command (`+recipe=pipeline`), and the stage dispatcher.

Key design choice: each stage of a pipeline is composed exactly as if it were run alone — its own
recipe, then the pipeline command's overrides, then `pipeline.overrides.<stage>`, then the paths the
earlier stages produced (`model.path`, `reward.model_path`) — and runs in its own sub-directory. A
stage whose summary.json exists is complete and is skipped, so re-running a crashed pipeline with the
same `run.dir` resumes at the stage it stopped in.
"""

from __future__ import annotations

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
    assert config.stage == "pipeline" and compose is not None
    return run_pipeline(config, run_dir, compose)


def run_pipeline(config: Config, run_dir: Path, compose: Composer) -> list[Summary]:
    """Run (or resume) the stages in order; prints and saves the table of their before/after measures."""
    from omegaconf import OmegaConf

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
                stage_config = compose(overrides)
                stage_dir.mkdir(parents=True, exist_ok=True)
                OmegaConf.save(OmegaConf.structured(stage_config), stage_dir / "config.yaml")
                result = run_stage(stage_config, stage_dir)
                assert isinstance(result, Summary)
                summary = result
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
