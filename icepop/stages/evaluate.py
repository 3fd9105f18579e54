"""Evaluation through the rollout engines: held-out measures during RL, and `+recipe=eval` on its own.

During RL, `evaluate` scores greedy replies of the engines' current weights (rule accuracy, and the
reward model's mean score when there is one). `run_eval` scores a checkpoint with k samples per
problem: avg@k (mean reward over all samples) and pass@k (problems with at least one correct sample),
as reported for reasoning models (e.g. DeepSeek-R1's pass@1 over k samples, arXiv 2501.12948 §3).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from icepop.config import Config
from icepop.errors import input_errors
from icepop.ray import cluster
from icepop.ray.actors import wait_ready
from icepop.ray.engines import Engines
from icepop.ray.workers import RewardModelGroup
from icepop.stages import setup, warmup
from icepop.stages.rewards import Rewards
from icepop.stages.summary import Summary, write_summary
from icepop.types import Prompt, SamplingSettings


def evaluate(run: Any, prompts: list[Prompt], step: int) -> dict[str, float]:
    """Greedy measures of the engines' current weights on held-out prompts; appended to eval.jsonl."""
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=run.config.rollout.max_new_tokens, seed=0)
    groups = run.engines.generate(prompts, 1, sampling)
    measures = run.rewards.measures(prompts, [group[0] for group in groups])
    shown = ", ".join(f"{k} {v:.3f}" for k, v in measures.items())
    run.tracker.log_eval(
        step, {**measures, "problems": len(prompts)}, f"held-out greedy {shown} on {len(prompts)} problems"
    )
    return measures


def sample_measures(rewards: Rewards, prompts: list[Prompt], groups: list[list[Any]]) -> dict[str, float]:
    """avg@k and pass@k of the rule reward, or of an environment's (a sample is correct when its reward is
    ≥ 1), and the mean reward-model score, over k samples per prompt."""
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    completions = [c for group in groups for c in group]
    texts = [c.text for c in completions]
    k = len(groups[0])
    out: dict[str, float] = {}
    episodes = completions[0].reward is not None  # multi-turn: the environment's reward
    if episodes or rewards.rule is not None:
        scored = rewards.score_rollouts(flat_prompts, completions) if episodes else rewards.rule.score(
            flat_prompts, texts)  # fmt: skip
        scores = scored.rewards
        per_prompt = [scores[i * k : (i + 1) * k] for i in range(len(prompts))]
        out[f"avg@{k}"] = sum(scores) / len(scores)
        out[f"pass@{k}"] = sum(max(s) >= 1.0 for s in per_prompt) / len(prompts)
    if rewards.model is not None:
        out["model_score"] = float(rewards.model_scores(flat_prompts, texts).mean())
    return out


def run_eval(config: Config, run_dir: Path) -> Summary:
    """Score `model.path` on the held-out problems with eval.samples_per_prompt samples each."""
    start = time.perf_counter()
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    with input_errors(f"data.source={config.data.source!r}"):  # before any warm-up or engine starts
        _, prompts = setup.prompt_streams(config, tokenizer)
    setup.check_held_out_row(config, tokenizer, prompts[0])
    model_path = warmup.policy_path(config, run_dir)
    k = 1 if config.eval.temperature == 0 else config.eval.samples_per_prompt
    sampling = SamplingSettings(
        temperature=config.eval.temperature,
        max_new_tokens=config.rollout.max_new_tokens,
        seed=config.run.seed,
    )
    with cluster.session(config):
        placement = cluster.reserve(config, trainer=False)
        engines = Engines(config, model_path, placement)
        model = RewardModelGroup(config, placement) if config.reward.model_path is not None else None
        wait_ready(engines, model)
        with setup.reward_pool(config) as pool:
            rewards = Rewards(config.reward, pool if config.reward.rule_weight else None, model)
            groups = engines.generate(prompts, k, sampling)
            measures = sample_measures(rewards, prompts, groups)
        engines.close()
    shown = ", ".join(f"{key} {value:.3f}" for key, value in measures.items())
    print(f"icepop eval: {model_path} on {len(prompts)} held-out problems of {config.data.source}: {shown}")
    (run_dir / "eval.json").write_text(
        json.dumps({"model": model_path, "problems": len(prompts), **measures})
    )
    headline = next(iter(measures))
    return write_summary(
        run_dir, "eval", 0, time.perf_counter() - start, headline, None, measures[headline], None
    )
