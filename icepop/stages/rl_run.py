"""The state of one RL run and what keeps it going between steps: held-out evaluation of the exact
weights, the streaks of non-finite updates and failed rewards, and saving/restoring the driver's state.
(The engines — weight sync, probe, noise, restarts — are `icepop.ray.engines.Engines`.)

`rl_step` (icepop.stages.rl) calls these; none of them calls it, so a step still reads top to bottom
in one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icepop.config import Config
from icepop.errors import RunStopped
from icepop.ray.engines import Engines
from icepop.ray.workers import ReferenceGroup, TrainerGroup
from icepop.rewards.pool import Scores
from icepop.stages import checkpoint
from icepop.stages.evaluate import evaluate
from icepop.stages.rewards import Rewards
from icepop.telemetry import Telemetry
from icepop.tracking import Tracker, read_metrics
from icepop.types import Prompt


@dataclass
class RLRun:
    """Everything one RL step touches."""

    config: Config
    run_dir: Path
    engines: Engines
    """The rollout engines, with the batches issued to them and not yet trained on."""
    trainer: TrainerGroup
    reference: ReferenceGroup | None
    data: Any  # a prompt stream with next_batch(n) (icepop.data.prompts)
    rewards: Rewards
    pad_id: int
    tracker: Tracker
    telemetry: Telemetry
    before: dict[str, float] | None = None
    """The held-out measures before training (kept in checkpoints: a resumed run does not redo them)."""
    nonfinite_streak: int = 0
    """Steps in a row whose update was skipped for a non-finite loss or gradient."""
    reward_error_streak: int = 0
    """Steps in a row in which the rule reward failed (raised or timed out) on every sample."""
    extras: Any = None
    """With algo.dynamic_sampling, the stream of extra prompts (icepop.stages.dynamic_sampling)."""


def evaluate_exact(run: RLRun, prompts: list[Prompt], step: int) -> dict[str, float]:
    """Held-out measures of the trainer's weights after `step` (under mismatch injection the engines get
    the exact weights for it, then their noisy copy back)."""
    return run.engines.at_exact_weights(step, lambda: evaluate(run, prompts, step))


def count_nonfinite(run: RLRun, step: int, skipped: bool) -> None:
    """Count steps whose update was skipped (non-finite loss or gradient); stop after too many in a row."""
    run.nonfinite_streak = run.nonfinite_streak + 1 if skipped else 0
    if not skipped:
        return
    limit = run.config.train.max_nonfinite_steps
    run.telemetry.event(step, "nonfinite_update_skipped", in_a_row=run.nonfinite_streak, limit=limit)
    run.tracker.print(
        f"icepop: step {step}: the loss or gradient was NaN/inf; the update was skipped "
        f"({run.nonfinite_streak} in a row, train.max_nonfinite_steps={limit})"
    )
    if run.nonfinite_streak >= limit:
        raise RunStopped(
            f"{run.nonfinite_streak} steps in a row (up to step {step}) had a NaN/inf loss or gradient "
            f"(train.max_nonfinite_steps={limit}); their updates were skipped, so the weights are still "
            f"those of step {step - run.nonfinite_streak}. {checkpoint.resume_hint(run.run_dir)}"
        )


def count_reward_failures(run: RLRun, step: int, scored: Scores, samples: int) -> None:
    """Stop, with the first error, after reward.max_error_steps steps in a row in which the rule reward
    raised or timed out on every sample: the run would otherwise train on all-zero rewards."""
    run.reward_error_streak = failure_streak(run.reward_error_streak, scored, samples)
    limit = run.config.reward.max_error_steps
    if run.reward_error_streak >= limit:
        raise RunStopped(f"{reward_failure(scored, limit, step)} {checkpoint.resume_hint(run.run_dir)}")


def failure_streak(streak: int, scored: Scores, samples: int) -> int:
    """Steps in a row in which every one of `samples` rewards raised or timed out, after this one."""
    failed = scored.stats.get("reward/errors", 0.0) + scored.stats.get("reward/timeouts", 0.0)
    return streak + 1 if failed >= samples else 0


def reward_failure(scored: Scores, limit: int, step: int) -> str:
    """Why a run whose rewards all failed for `limit` steps stops: the first error of the last step."""
    cause = scored.first_error or "every sample timed out (reward.timeout_seconds)"
    return (
        f"the rule reward failed on every sample of {limit} steps in a row (up to step {step}; "
        f"reward.max_error_steps={limit}), so the run would train on zeros. The first error of step "
        f"{step}:\n{cause.strip()}\n"
    )


def save_checkpoint(run: RLRun, step: int) -> Path:
    """A resumable checkpoint of the run at `step` (icepop.stages.checkpoint)."""
    assert run.engines.queue is not None
    state = {
        "data": run.engines.queue.data_state(),
        "before": run.before,
        "nonfinite_streak": run.nonfinite_streak,
        "reward_error_streak": run.reward_error_streak,
        **({"extras": run.extras.state_dict()} if run.extras is not None else {}),
    }
    return checkpoint.save(run.run_dir, step, run.trainer, state, run.config.train.keep_last)


def resume(run: RLRun, step: int, path: Path) -> None:
    """Continue a freshly set-up run from checkpoint `path` of step `step`: trainer state, data position,
    RNG, counters, the alerts' history (replayed from the metrics kept up to the checkpoint), and the
    engines get its weights (and step's noise)."""
    state = checkpoint.restore(path, run.trainer)
    run.data.load_state_dict(state["data"])
    run.before, run.nonfinite_streak = state["before"], state["nonfinite_streak"]
    run.reward_error_streak = state.get("reward_error_streak", 0)  # absent from older checkpoints
    if run.extras is not None and "extras" in state:
        run.extras.load_state_dict(state["extras"])
    run.telemetry.replay(read_metrics(run.run_dir))
    run.engines.push(step)
    print(f"icepop: resumed from {path.resolve()} (step {step} of {run.config.train.steps})")
