"""The RL stages (RLVR, RLHF): GRPO with the IcePop correction on vLLM rollouts and DeepSpeed ranks.

`rl_step` is the whole algorithm and reads top to bottom: generate → reward → advantages → old
log-probs → train → sync weights → log → checkpoint, with every blocking `ray.get` in plain sight.
`run_rl` sets up the cluster, workers, data and rewards around it and tears them down whatever
happens (success, error, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch

from icepop import weights
from icepop.algo import (
    PolicyLossOptions,
    correction_metrics,
    dr_grpo_advantages,
    grpo_advantages,
    log_ratio,
    mismatch_metrics,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from icepop.config import Config
from icepop.derived import derived
from icepop.ray import cluster
from icepop.ray.workers import (
    ReferenceGroup,
    RewardModelGroup,
    RolloutGroup,
    TrainerGroup,
    WeightSync,
    actor_index,
    gather,
)
from icepop.stages import checkpoint, setup
from icepop.stages.batch import concat_rows, rl_batch, select_rows, sequence_count, split_rows
from icepop.stages.evaluate import evaluate
from icepop.stages.rewards import Rewards
from icepop.stages.summary import Summary, read_summary, write_summary
from icepop.telemetry import Telemetry
from icepop.tracking import Tracker
from icepop.types import Prompt, RLBatch

T = TypeVar("T")


class RunStopped(RuntimeError):
    """The run cannot go on (a trainer rank died, too many non-finite steps, engines keep dying); the
    message says why and which checkpoint to resume from."""


@dataclass
class RLRun:
    """Everything one RL step touches."""

    config: Config
    run_dir: Path
    rollout: RolloutGroup
    trainer: TrainerGroup
    reference: ReferenceGroup | None
    data: Any  # a prompt stream with next_batch(n) (icepop.data.prompts)
    rewards: Rewards
    pad_id: int
    probe: list[list[int]]
    weight_sync: WeightSync
    tracker: Tracker
    telemetry: Telemetry
    before: dict[str, float] | None = None
    """The held-out measures before training (kept in checkpoints: a resumed run does not redo them)."""
    nonfinite_streak: int = 0
    """Steps in a row whose update was skipped for a non-finite loss or gradient."""


def rl_step(step: int, run: RLRun) -> dict[str, float]:
    """One RL step; returns its metrics (also logged)."""
    config, algo = run.config, run.config.algo
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[f"timing/{name}_seconds"] = now - clock
        clock = now

    # 1. Generate: every sampled token carries ℓ_inf under the processed sampling distribution.
    prompts: list[Prompt] = run.data.next_batch(algo.prompts_per_step)
    sampling = setup.sampling_settings(config, seed=config.run.seed * 100_003 + step)

    def generate() -> list[Any]:
        return gather(run.rollout.async_generate(prompts, algo.samples_per_prompt, sampling))

    groups = RolloutGroup.merge(_with_engines(run, step, generate))
    lap("generate")

    # 2. Reward: verifiers in worker processes (per-sample timeout) and/or reward-model actors.
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    texts = [c.text for group in groups for c in group]
    scored = run.rewards.score(flat_prompts, texts)
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)
    lap("reward")

    # 3. Advantages, group-relative; then the padded, label-aligned batch.
    group_ids = torch.arange(len(prompts)).repeat_interleave(algo.samples_per_prompt)
    batch = rl_batch(prompts, groups, _sequence_advantages(algo.advantage, rewards, group_ids), run.pad_id)
    if algo.advantage == "reinforce_pp":  # REINFORCE++-baseline: whiten over the batch's valid tokens
        batch.advantages = reinforce_pp_baseline_advantages(rewards, group_ids, batch.response_mask)

    # 4. ℓ_old: the trainer's log-probs at the rollout weights θ_old, before any update.
    refs = run.trainer.async_logprobs(batch.input_ids, batch.attention_mask, config.rollout.temperature)
    batch.old_logprobs = concat_rows(gather(refs), batch.response_mask.shape[1])
    if run.reference is not None:  # kl_coef ≠ 0: log π_ref of the frozen starting policy
        batch.ref_logprobs = ray.get(run.reference.async_logprobs(batch.input_ids, batch.attention_mask))
    if step in config.train.inject_nonfinite_steps:  # fault injection: a NaN loss, whose update is skipped
        batch.advantages = torch.where(batch.response_mask, torch.nan, batch.advantages)
    lap("old_logprobs")

    # 5. Train: `updates_per_step` optimizer steps, each over all ranks with the mini-batch's global counts.
    options = algo.loss_options(max_response_length=config.rollout.max_new_tokens)
    rows = batch.input_ids.shape[0] // algo.updates_per_step
    train_metrics = []
    for update in range(algo.updates_per_step):
        mini = select_rows(batch, slice(update * rows, (update + 1) * rows))
        counts = {
            "global_token_count": int(mini.response_mask.sum()),
            "global_seq_count": sequence_count(mini.response_mask),
        }
        shards = split_rows(mini, run.trainer.ranks)
        train_metrics += gather(run.trainer.async_train_rl(shards, options=options, **counts))
    lap("train")

    # 6. Sync the new weights into every engine, check engine and trainer agree on the probe, and
    # (stress test only) give the engines a noisy copy.
    probe_diff = _with_engines(run, step, lambda: _sync(run, step))
    lap("sync")

    # 7. Log: the ranks' means first, then exact whole-batch mismatch and mask statistics over them.
    lengths = torch.tensor([len(c.token_ids) for group in groups for c in group], dtype=torch.float32)
    step_seconds = time.perf_counter() - start
    metrics = {
        **_mean_over_ranks(train_metrics),
        **_mismatch_statistics(batch, options),
        **_reward_metrics(rewards, group_ids, scored.stats),
        "response_length/mean": float(lengths.mean()),
        "response_length/truncated_frac": sum(c.finish_reason == "length" for g in groups for c in g)
        / len(texts),
        "sync/probe_abs_logp_diff": probe_diff.max,
        "sync/probe_abs_logp_diff_mean": probe_diff.mean,
        "inject/mismatch_noise": config.rollout.mismatch_noise,
        "fault/engine_restarts": run.rollout.restarts,
        "perf/step_seconds": step_seconds,
        "perf/rollout_tokens_per_second": float(lengths.sum()) / timings["timing/generate_seconds"],
        **timings,
    }
    shown = metrics.get("reward/model_score_mean", metrics["reward/mean"])  # RLHF: the raw RM score
    run.tracker.log(step, metrics, status=f"reward {shown:.3f}  {step_seconds:.1f} s/step")
    delta = log_ratio(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask)
    for alert in run.telemetry.record(step, delta, batch.response_mask, metrics):
        run.tracker.print(alert)
    _count_nonfinite(run, step, skipped=metrics["actor/nonfinite_skipped"] > 0)

    # 8. Checkpoint.
    every = config.train.checkpoint_every
    if step == config.train.steps or (every and step % every == 0):
        checkpoint.save(run, step)
    return metrics


def _sync(run: RLRun, step: int) -> weights.ProbeDifference:
    """Push the trainer's weights into every engine and check them on the probe; then, for stress
    tests, push a noisy copy (the noise of step s is seeded by run.seed + s)."""
    run.weight_sync.push()  # blocks until every engine holds the new weights
    probe_diff = weights.probe_difference(run.rollout, run.trainer, run.probe)
    weights.check_probe(probe_diff, run.config.rollout, step)
    _inject_mismatch(run, step)
    return probe_diff


def _evaluate(run: RLRun, prompts: list[Prompt], step: int) -> dict[str, float]:
    """Held-out measures of the trainer's weights after `step`: under mismatch injection the engines
    get the exact weights for it, then their noisy copy back."""

    def exact() -> dict[str, float]:
        if run.config.rollout.mismatch_noise:
            run.weight_sync.push()
        measures = evaluate(run, prompts, step)
        _inject_mismatch(run, step)
        return measures

    return _with_engines(run, step + 1, exact)


def _inject_mismatch(run: RLRun, step: int) -> None:
    """Stress test (rollout.mismatch_noise): sync again, the engines adding seeded noise on the way in."""
    if run.config.rollout.mismatch_noise:
        run.weight_sync.push(noise=(run.config.rollout.mismatch_noise, run.config.run.seed + step))


def _with_engines(run: RLRun, step: int, action: Callable[[], T]) -> T:
    """action(), which uses the engines; when one of them has died, restart it on its bundle, re-sync
    every engine with the trainer's current weights and retry (at most rollout.max_restarts restarts
    in a run). An error with every engine alive (a trainer rank died, a bad probe) is raised as is."""
    while True:
        try:
            return action()
        except ray.exceptions.RayError:
            dead = run.rollout.dead_engines()
            limit = run.config.rollout.max_restarts
            if not dead:
                raise
            if run.rollout.restarts + len(dead) > limit:
                raise RunStopped(
                    f"rollout engines {dead} died at step {step} after {run.rollout.restarts} restart(s); "
                    f"rollout.max_restarts={limit} is used up. {checkpoint.resume_hint(run.run_dir)}"
                ) from None
            for index in dead:
                run.tracker.print(
                    f"icepop: rollout engine {index} died at step {step}; restarting it, re-syncing the "
                    f"weights and retrying ({run.rollout.restarts + 1}/{limit} restarts)"
                )
                run.rollout.restart(index)
                run.telemetry.event(step, "engine_restarted", engine=index, restarts=run.rollout.restarts)
            run.weight_sync.reconnect()
            _sync(run, step - 1)  # the engines as they were before this step: θ, plus step − 1's noise


def _count_nonfinite(run: RLRun, step: int, skipped: bool) -> None:
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


def _resume(run: RLRun, step: int, path: Path) -> None:
    """Continue from checkpoint `path` of step `step`; the engines get its weights (and step's noise)."""
    checkpoint.restore(run, path)
    _sync(run, step)
    print(f"icepop: resumed from {path.resolve()} (step {step} of {run.config.train.steps})")


def _sequence_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """One advantage per response (REINFORCE++ is only centred here; it is whitened per token later)."""
    if name == "grpo":
        return grpo_advantages(rewards, group_ids)
    elif name == "rloo":
        return rloo_advantages(rewards, group_ids)
    return dr_grpo_advantages(rewards, group_ids)  # "dr_grpo", and the centring of "reinforce_pp"


def _mismatch_statistics(batch: RLBatch, options: PolicyLossOptions) -> dict[str, float]:
    """Train/inference mismatch and the correction's mask fractions over every token of the batch."""
    old, rollout, mask = batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
    assert old is not None
    corr = options.correction_weights(old, rollout, mask)
    stats = {
        **mismatch_metrics(old, rollout, mask),
        **correction_metrics(corr, log_ratio(old, rollout, mask), mask),
    }
    return {key: float(value) for key, value in stats.items()}


def _mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Trainer metrics averaged over ranks and updates (every rank holds the same number of rows)."""
    return {key: sum(m[key] for m in per_rank) / len(per_rank) for key in per_rank[0]}


def _reward_metrics(
    rewards: torch.Tensor, group_ids: torch.Tensor, stats: dict[str, float]
) -> dict[str, float]:
    """Reward mean/std, and the fraction of groups whose rewards are all equal (no learning signal)."""
    groups = rewards.view(-1, int((group_ids == 0).sum()))
    zero_variance = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean()
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/zero_variance_group_frac": float(zero_variance),
        **{k: float(v) for k, v in stats.items()},
    }


def run_rl(config: Config, run_dir: Path) -> Summary:
    """Run an RL stage — rlvr (rule rewards) or rlhf (a reward model, optionally mixed with rules) —
    and return its summary (the final checkpoint, and the held-out measure before and after)."""
    if config.reward.model_path is None and (config.stage == "rlhf" or config.reward.rule_weight == 0):
        raise ValueError(
            f"the {config.stage} stage has no reward: set reward.model_path to a reward model (train one "
            "with +recipe=rm) or a non-zero reward.rule_weight"
        )
    started = time.perf_counter()
    resumed = checkpoint.latest(run_dir)
    done = read_summary(run_dir)
    if done is not None and resumed is not None and resumed[0] >= config.train.steps:
        print(f"icepop {config.stage}: {run_dir} is complete ({resumed[0]} steps); nothing to do")
        return done
    if resumed is not None:  # steps after the checkpoint are redone: drop what they logged
        checkpoint.remove_partials(run_dir)
        checkpoint.truncate_logs(run_dir, resumed[0])
    model_path = setup.resolve_model(config, run_dir)
    print(
        f"icepop {config.stage}: model {config.model.path} ({model_path}); {derived(config).describe(config)}"
    )
    weights_dir = Path(tempfile.mkdtemp(prefix="icepop-weights-", dir=weights.shm_dir()))
    cluster.start(config)
    step = resumed[0] if resumed else 0
    run: RLRun | None = None
    try:
        with contextlib.ExitStack() as stack:
            run, eval_prompts = _set_up(config, run_dir, model_path, weights_dir, stack)
            if resumed:
                _resume(run, *resumed)
            else:  # (with mismatch injection, this also gives the engines step 0's noisy copy)
                run.before = _evaluate(run, eval_prompts, step=0)
            while step < config.train.steps:
                step += 1
                rl_step(step, run)
                every = config.train.eval_every
                if every and step % every == 0 and step != config.train.steps:
                    _evaluate(run, eval_prompts, step)
            after = _evaluate(run, eval_prompts, step)
            gather(run.trainer.async_call("close"))
            gather(run.rollout.async_call("close"))
    except ray.exceptions.RayActorError as error:
        rank = None if run is None else actor_index(run.trainer.actors, error)
        if run is None or rank is None:
            raise
        raise RunStopped(
            f"trainer rank {rank} died at step {step} ({type(error).__name__}); the run stopped, since the "
            f"other ranks cannot go on without its ZeRO shard. {checkpoint.resume_hint(run.run_dir)}"
        ) from error
    finally:
        cluster.shutdown()
        shutil.rmtree(weights_dir, ignore_errors=True)
    key = "model_score" if config.stage == "rlhf" else "accuracy"
    assert run is not None and run.before is not None
    return write_summary(
        run_dir,
        config.stage,
        config.train.steps,
        time.perf_counter() - started,
        f"held-out greedy {key.replace('_', ' ')}",
        run.before[key],
        after[key],
        str(checkpoint.step_dir(run_dir, config.train.steps)),
    )


def _set_up(
    config: Config, run_dir: Path, model_path: str, weights_dir: Path, stack: contextlib.ExitStack
) -> tuple[RLRun, list[Prompt]]:
    """Workers on their bundles, data, rewards and the tracker (closed by `stack`) of one RL run."""
    placement = cluster.reserve(config)
    rollout = RolloutGroup(config, model_path, placement)
    trainer = TrainerGroup(
        config,
        model_path,
        placement,
        total_steps=config.train.steps * config.algo.updates_per_step,
        lr=config.trainer.lr,
        warmup_steps=config.trainer.warmup_steps,
        temperature=config.rollout.temperature,
    )
    reference = ReferenceGroup(config, model_path, placement) if config.algo.kl_coef != 0.0 else None
    reward_model = RewardModelGroup(config, placement) if config.reward.model_path is not None else None
    tokenizer = setup.load_tokenizer(model_path)
    data, eval_prompts = setup.prompt_streams(config, tokenizer)
    pool = stack.enter_context(setup.reward_pool(config)) if config.reward.rule_weight else None
    run = RLRun(
        config,
        run_dir,
        rollout,
        trainer,
        reference,
        data,
        Rewards(config.reward, pool, reward_model),
        tokenizer.pad_token_id,
        weights.probe_sequences(eval_prompts),
        WeightSync(config.rollout.weight_sync, trainer, rollout, str(weights_dir / "weights.safetensors")),
        stack.enter_context(Tracker(config, run_dir, config.train.steps, config.stage)),
        Telemetry(run_dir, config.logger.mismatch_alert, config.logger.alert_window),
    )
    if config.rollout.mismatch_noise:
        print(
            "icepop: mismatch injection on: every sync gives the engines noise of "
            f"{config.rollout.mismatch_noise} × each weight's std"
        )
    return run, eval_prompts
