"""The reward of an RL step: a rule reward (verifier or custom function, in the process pool) and a
reward-model score (Ray actors), each weighted; RLVR uses the first, RLHF the second or both.

Key design choice: reward-model scores are whitened over the step's batch (`reward.normalize`)
before they are weighted, so that a mix with 0/1 rule rewards does not depend on the arbitrary
offset and scale a Bradley–Terry model learns. The raw scores are what evaluation reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from icepop.algo import whiten
from icepop.config import RewardConfig
from icepop.ray.actors import gather
from icepop.rewards.model import prompt_messages
from icepop.rewards.pool import Scores
from icepop.rewards.verifiers import lenient_correct, strict_correct
from icepop.types import Completion, Prompt


class Rewards:
    """`score(prompts, texts)` for the RL loop, `measures(prompts, texts)` for evaluation."""

    def __init__(self, config: RewardConfig, rule: Any | None, model: Any | None) -> None:
        """rule: a RewardPool (None when reward.rule_weight is 0); model: a RewardModelGroup or None."""
        self.config, self.rule, self.model = config, rule, model

    def model_scores(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> torch.Tensor:
        """Raw reward-model scores, one per (prompt, response)."""
        assert self.model is not None
        refs = self.model.async_score([prompt_messages(p) for p in prompts], list(texts))
        return torch.tensor([s for block in gather(refs) for s in block], dtype=torch.float32)

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> Scores:
        """rule_weight · rule + model_weight · (whitened) reward-model score, with their means in stats."""
        total = torch.zeros(len(texts))
        stats: dict[str, float] = {}
        first_error = None
        if self.rule is not None:
            scored = self.rule.score(prompts, texts)
            first_error = scored.first_error
            rule = torch.tensor(scored.rewards, dtype=torch.float32)
            total += self.config.rule_weight * rule
            stats.update(scored.stats)
            stats["reward/rule_mean"] = float(rule.mean())
        if self.model is not None:
            raw = self.model_scores(prompts, texts)
            stats["reward/model_score_mean"] = float(raw.mean())
            total += self.config.model_weight * (whiten(raw) if self.config.normalize else raw)
        return Scores(total.tolist(), stats, first_error)

    def score_rollouts(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> Scores:
        """`score` of the completions' texts; multi-turn episodes (rollout.environment) carry their
        environment's reward, which is theirs instead."""
        if completions and completions[0].reward is not None:
            return Scores([float(c.reward or 0.0) for c in completions], {})
        return self.score(prompts, [c.text for c in completions])

    def measures(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> dict[str, float]:
        """What evaluation reports: rule accuracy (mean rule reward) with its lenient reading (the last
        number is the answer, whatever the format) and its strict one (exactly the requested format),
        and the mean raw model score; for episodes, the environment's mean reward ("accuracy")."""
        if completions and completions[0].reward is not None:
            return {"accuracy": sum(self.score_rollouts(prompts, completions).rewards) / len(completions)}
        texts = [c.text for c in completions]
        out = {}
        if self.rule is not None:
            rewards = self.rule.score(prompts, texts).rewards
            out["accuracy"] = sum(rewards) / len(texts)
            for name, reading in (("lenient", lenient_correct), ("strict", strict_correct)):
                right = [reading(p.task, text, p.answer) for p, text in zip(prompts, texts, strict=True)]
                out[f"accuracy_{name}"] = sum(
                    r >= 1.0 if judged is None else judged for judged, r in zip(right, rewards, strict=True)
                ) / len(texts)
        if self.model is not None:
            out["model_score"] = float(self.model_scores(prompts, texts).mean())
        return out
