"""Held-out evaluation through the rollout engines: greedy accuracy on problems never trained on."""

from __future__ import annotations

import json
from typing import Any

import ray

from icepop.ray.workers import RolloutGroup
from icepop.types import Prompt, SamplingSettings


def evaluate(run: Any, prompts: list[Prompt], step: int) -> float:
    """Greedy accuracy (mean verifier score) of the engines' current weights; appended to eval.jsonl."""
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=run.config.rollout.max_new_tokens, seed=0)
    groups = RolloutGroup.merge(ray.get(run.rollout.async_generate(prompts, 1, sampling)))
    scores = run.rewards.score(prompts, [group[0].text for group in groups]).rewards
    accuracy = sum(scores) / len(scores)
    with (run.run_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "eval/accuracy": accuracy, "eval/problems": len(scores)}) + "\n")
    run.tracker.print(f"step {step}: held-out greedy accuracy {accuracy:.3f} on {len(scores)} problems")
    return accuracy
