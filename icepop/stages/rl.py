"""The RL stages (RLVR, RLHF): GRPO with the IcePop correction on vLLM rollouts and DeepSpeed ranks.

`rl_step` is the whole algorithm and reads top to bottom: generate → reward → advantages → old
log-probs (a separate pass only when a step makes several updates) → train → sync weights → log →
checkpoint, with every blocking `ray.get` in plain sight.
`run_rl` sets up the cluster, workers, data and rewards around it and tears them down whatever
happens (success, error, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from icepop import weights
from icepop.algo import log_ratio, token_advantages
from icepop.config import Config
from icepop.data.prompts import ShuffledBatches
from icepop.errors import RunStopped, input_errors
from icepop.ray import cluster
from icepop.ray.actors import dead_actor, gather, wait_ready
from icepop.ray.engines import EngineHooks, Engines
from icepop.ray.workers import ReferenceGroup, RewardModelGroup, TrainerGroup
from icepop.stages import checkpoint, dynamic_sampling, setup, warmup
from icepop.stages.batch import (
    concat_rows,
    overlong_shaping,
    rescored_logprobs,
    rl_batch,
    select_rows,
    sequence_count,
    split_rows,
)
from icepop.stages.rewards import Rewards
from icepop.stages.rl_run import (
    RLRun,
    count_nonfinite,
    count_reward_failures,
    evaluate_exact,
    resume,
    save_checkpoint,
)
from icepop.stages.step_metrics import (
    episode_statistics,
    mean_over_ranks,
    mismatch_statistics,
    reward_metrics,
    staleness_split,
    staleness_statistics,
)
from icepop.stages.summary import Summary, read_summary, write_summary
from icepop.telemetry import Telemetry
from icepop.tracking import Tracker
from icepop.types import Prompt


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

    # 1. Generate: every sampled token carries ℓ_inf under the processed sampling distribution. With
    # rollout.max_staleness = N the engines generate the batch of step + N meanwhile (icepop.ray.staleness).
    rollouts = run.engines.rollouts(step)
    prompts, groups = rollouts.prompts, rollouts.groups
    run.engines.sleep()  # colocated: the engines free the devices until the push
    lap("generate")

    # 2. Reward: verifiers in worker processes (per-sample timeout) and/or reward-model actors.
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    completions = [c for group in groups for c in group]
    scored = run.rewards.score_rollouts(flat_prompts, completions)  # multi-turn: the environment's reward
    count_reward_failures(run, step, scored, len(completions))
    rewards, sampled = torch.tensor(scored.rewards, dtype=torch.float32), {}
    lap("reward")
    if algo.dynamic_sampling:  # only groups with something to learn, topped up with extra rounds
        filled = dynamic_sampling.fill(run, step, prompts, groups, scored, rollouts.sampling)
        prompts, groups, rewards, sampled = filled.prompts, filled.groups, filled.rewards, filled.stats
        completions = [c for group in groups for c in group]
        rollouts.rescored = None if filled.changed else rollouts.rescored  # rescored the batch as issued
        lap("dynamic_sampling")  # the extra rounds: generating and scoring them

    # 3. The padded, label-aligned batch; the advantages, group-relative, on its model tokens (after
    # DAPO's overlong shaping: a penalty near the length limit, truncated replies out of the loss).
    group_ids = torch.arange(len(prompts)).repeat_interleave(algo.samples_per_prompt)
    batch = rl_batch(prompts, groups, torch.zeros(len(completions)), run.pad_id)
    limit = config.rollout.response_tokens()
    shaped = rewards + overlong_shaping(algo.overlong_buffer, algo.overlong_penalty, completions, limit)
    batch.advantages = token_advantages(algo.advantage, shaped, group_ids, batch.response_mask)
    if algo.mask_truncated:
        batch.response_mask &= ~torch.tensor([c.finish_reason == "length" for c in completions])[:, None]

    # 4. ℓ_old: the trainer's log-probs at the rollout weights θ_old, before any update. With one update
    # per step the trainer's θ is θ_old, so the training forward's own detached ℓ_θ is ℓ_old (fetched
    # after step 5: no separate pass); a later update of the same step needs them first.
    single_pass = algo.updates_per_step == 1
    if not single_pass:
        refs = run.trainer.async_logprobs(batch.input_ids, batch.attention_mask, config.rollout.temperature)
        batch.old_logprobs = concat_rows(gather(refs), batch.response_mask.shape[1])
    if run.reference is not None:  # kl_coef ≠ 0: log π_ref of the frozen starting policy
        ref = run.reference.async_logprobs(batch.input_ids, batch.attention_mask, config.rollout.temperature)
        batch.ref_logprobs = gather([ref])[0]  # at the sampling temperature, like ℓ_old and ℓ_θ
    if step in config.train.inject_nonfinite_steps:  # fault injection: a NaN loss, whose update is skipped
        batch.advantages = torch.where(batch.response_mask, torch.nan, batch.advantages)
    lap("old_logprobs")

    # 5. Train: `updates_per_step` optimizer steps, each over all ranks with the mini-batch's global counts.
    options = algo.loss_options(max_response_length=config.rollout.response_tokens())
    rows = batch.input_ids.shape[0] // algo.updates_per_step
    train_metrics = []
    for update in range(algo.updates_per_step):
        mini = select_rows(batch, slice(update * rows, (update + 1) * rows))
        counts = {  # at least 1: algo.mask_truncated may leave an update no token (then its loss is 0)
            "global_token_count": max(1, int(mini.response_mask.sum())),
            "global_seq_count": max(1, sequence_count(mini.response_mask)),
        }
        shards = split_rows(mini, run.trainer.ranks)
        train_metrics += gather(run.trainer.async_train_rl(shards, options=options, **counts))
    if single_pass:  # each rank's rows in order: the contiguous blocks of split_rows
        batch.old_logprobs = concat_rows(
            gather(run.trainer.async_call("last_old_logprobs")), mini.response_mask.shape[1]
        )
    lap("train")

    # 6. Push the new weights into every engine once they finished what is in flight, check engine and
    # trainer agree on the probe, and (stress test only) give the engines a noisy copy.
    probe_diff = run.engines.push(step, lap)
    lap("sync_probe")
    timings["timing/sync_seconds"] = sum(timings[f"timing/sync_{part}_seconds"] for part in ("push", "probe"))

    # 7. Log: the ranks' means first, then exact whole-batch mismatch and mask statistics over them.
    lengths = batch.response_mask.sum(dim=1, dtype=torch.float32)  # the model's tokens only
    step_seconds = time.perf_counter() - start
    metrics = {
        **mean_over_ranks(train_metrics),
        **mismatch_statistics(batch, options, by_turn=completions[0].model_mask is not None),
        **reward_metrics(rewards, group_ids, scored.stats),
        **sampled,
        **({"reward/shaped_mean": float(shaped.mean())} if algo.overlong_buffer else {}),
        "response_length/mean": float(lengths.mean()),
        "response_length/truncated_frac": sum(c.finish_reason == "length" for c in completions)
        / len(completions),
        "sync/probe_abs_logp_diff": probe_diff.max,
        "sync/probe_abs_logp_diff_mean": probe_diff.mean,
        "inject/mismatch_noise": config.rollout.mismatch_noise,
        "fault/engine_restarts": run.engines.restarts,
        "perf/step_seconds": step_seconds,
        "perf/tokens_per_second": float(lengths.sum()) / step_seconds,
        **timings,
        **staleness_statistics(batch, rollouts.behind, config.rollout.max_staleness),
        **episode_statistics(completions),
    }
    if not config.rollout.max_staleness:  # stale rollouts: the batch took no time of this step
        metrics["perf/rollout_tokens_per_second"] = float(lengths.sum()) / timings["timing/generate_seconds"]
    if rollouts.rescored is not None:  # the engines' log-probs at the trainer's weights: the split
        engine_now = rescored_logprobs(prompts, groups, gather(rollouts.rescored), run.pad_id)
        metrics.update(staleness_split(batch, engine_now, options))
    shown = metrics.get("reward/model_score_mean", metrics["reward/mean"])  # RLHF: the raw RM score
    run.tracker.log(step, metrics, status=f"reward {shown:.3f}  {step_seconds:.1f} s/step")
    delta = log_ratio(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask)
    for alert in run.telemetry.record(step, delta, batch.response_mask, metrics):
        run.tracker.print(alert)
    count_nonfinite(run, step, skipped=metrics["actor/nonfinite_skipped"] > 0)

    # 8. Checkpoint.
    every = config.train.checkpoint_every
    if step == config.train.steps or (every and step % every == 0):
        save_checkpoint(run, step)
    return metrics


def run_rl(config: Config, run_dir: Path) -> Summary:
    """Run an RL stage — rlvr (rule rewards) or rlhf (a reward model, optionally mixed with rules) —
    and return its summary (the final checkpoint, and the held-out measure before and after)."""
    started = time.perf_counter()
    # The data first: a bad source or field fails here, before any warm-up, engine or rank starts.
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    with input_errors(f"data.source={config.data.source!r}"):
        data = setup.prompt_streams(config, tokenizer)
    setup.check_held_out_row(config, tokenizer, data[1][0])
    start = checkpoint.prepare_resume(run_dir, config.train.steps)
    done = read_summary(run_dir)
    if start.complete and done is not None:
        print(f"icepop {config.stage}: {run_dir} is complete ({start.step} steps); nothing to do")
        return done
    model_path = warmup.policy_path(config, run_dir)
    print(f"icepop {config.stage}: model {config.model.path} ({model_path}); {config.describe_batches()}")
    weights_dir = Path(tempfile.mkdtemp(prefix="icepop-weights-", dir=weights.shm_dir()))
    step = start.step
    run: RLRun | None = None
    try:
        with cluster.session(config), contextlib.ExitStack() as stack:
            run, eval_prompts = _set_up(config, run_dir, model_path, (*data, tokenizer.pad_token_id),
                                        weights_dir, stack)  # fmt: skip
            if start.path is not None:
                resume(run, step, start.path)
            else:  # (with mismatch injection, this also gives the engines step 0's noisy copy)
                run.before = evaluate_exact(run, eval_prompts, step=0)
            while step < config.train.steps:
                step += 1
                rl_step(step, run)
                every = config.train.eval_every
                if every and step % every == 0 and step != config.train.steps:
                    evaluate_exact(run, eval_prompts, step)
            after = evaluate_exact(run, eval_prompts, step)
            run.engines.close()  # first: a colocated engine's close ends the ranks' group
            gather(run.trainer.async_call("close"))
    except ray.exceptions.RayError as error:  # a dead rank's, or a survivor's collective failing first
        rank = None if run is None else dead_actor(run.trainer.actors, error)
        if run is None or rank is None:
            raise
        raise RunStopped(
            f"trainer rank {rank} died at step {step} ({type(error).__name__}); the run stopped, since the "
            f"other ranks cannot go on without its ZeRO shard. {checkpoint.resume_hint(run.run_dir)}"
        ) from error
    finally:
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
    config: Config,
    run_dir: Path,
    model_path: str,
    data: tuple[Any, list[Prompt], int],
    weights_dir: Path,
    stack: contextlib.ExitStack,
) -> tuple[RLRun, list[Prompt]]:
    """Workers on their bundles, rewards and the tracker (closed by `stack`) of one RL run, around its
    data: the prompt stream, the held-out prompts and the pad id."""
    prompts, eval_prompts, pad_id = data
    started = time.perf_counter()
    placement = cluster.reserve(config)
    trainer = TrainerGroup(config, model_path, placement, "rl")
    engines = Engines(  # colocated: built in the ranks, after them
        config,
        model_path,
        placement,
        trainer,
        weights_file=str(weights_dir / "weights.safetensors"),
        data=prompts,
        probe=weights.probe_sequences(eval_prompts, config.rollout, config.model.dtype),
        prompt_tokens=max(len(p.prompt_ids) for p in [*prompts.items, *eval_prompts]),  # the KV cache's
    )
    reference = ReferenceGroup(config, model_path, placement) if config.algo.kl_coef != 0.0 else None
    reward_model = RewardModelGroup(config, placement) if config.reward.model_path is not None else None
    rule = config.reward.rule_weight and not config.rollout.episodic  # else: the episodes carry their reward
    pool = stack.enter_context(setup.reward_pool(config)) if rule else None  # starts meanwhile
    wait_ready(engines, trainer, reference, reward_model)
    transport = engines.connect()
    print(f"icepop {config.stage}: workers ready in {time.perf_counter() - started:.1f} s; {transport}")
    tracker = stack.enter_context(Tracker(config, run_dir, config.train.steps, config.stage))
    telemetry = Telemetry(run_dir, config.logger.mismatch_alert, config.logger.alert_window)
    engines.hooks = EngineHooks(tracker.print, telemetry.event, lambda: checkpoint.resume_hint(run_dir))
    rewards = Rewards(config.reward, pool, reward_model)
    run = RLRun(config, run_dir, engines, trainer, reference, prompts, rewards, pad_id, tracker, telemetry)
    if config.algo.dynamic_sampling:
        seed = config.run.seed + dynamic_sampling.EXTRA_SEED_OFFSET
        run.extras = ShuffledBatches(prompts.items, config.algo.prompts_per_step, seed)
    if config.rollout.mismatch_noise:
        print(
            "icepop: mismatch injection on: every sync gives the engines noise of "
            f"{config.rollout.mismatch_noise} × each weight's std"
        )
    return run, eval_prompts
