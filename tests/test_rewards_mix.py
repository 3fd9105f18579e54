"""The RL step's reward with a reward model: Ray actors on their own placement bundles score the
(prompt, reply) conversations with the reward model's own tokenizer, exactly as transformers does; the
scores are whitened over the batch and mixed with the rule reward by the configured weights. (Also: the
cluster's workers run at the driver's priority.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch
from test_config import compose_config
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from icepop.algo import whiten
from icepop.data.prompts import load_prompts
from icepop.models.tiny import build_tiny_model
from icepop.ray import cluster
from icepop.ray.actors import dead_actor, wait_ready
from icepop.ray.workers import RewardModelGroup
from icepop.rewards.pool import RewardPool
from icepop.stages.rewards import Rewards

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a Ray cluster with reward-model actors


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-label classifier on the tiny model's body (its score head freshly initialised)."""
    root = tmp_path_factory.mktemp("rm")
    base = build_tiny_model(root / "base", "dense")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id
    model.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "rm")
    return root / "rm"


def test_reward_model_actors_score_like_transformers_and_mix_with_the_rule(reward_model: Path) -> None:
    config = compose_config(
        "+recipe=rlhf", f"reward.model_path={reward_model}", "reward.model_workers=2",
        "reward.rule_weight=0.5", "reward.model_weight=2.0", "reward.workers=1", "trainer.ranks=1",
        "cluster.num_cpus=5",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    prompts = load_prompts("arithmetic", tokenizer, 256, count=3, seed=0).prompts
    texts = [prompts[0].meta["reference"], "no idea", prompts[2].meta["reference"] + "9"]
    cluster.start(config)
    try:
        placement = cluster.reserve(config)
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)  # not Ray's niceness 15
        assert placement.reward is not None and placement.reward.bundle_count == 2  # its own bundles
        group = RewardModelGroup(config, placement)
        wait_ready(group)
        with RewardPool(None, num_workers=1, timeout_s=10.0) as pool:
            rewards = Rewards(config.reward, pool, group)
            raw = rewards.model_scores(prompts, texts)
            scored = rewards.score(prompts, texts)
            rule = torch.tensor(pool.score(prompts, texts).rewards)
        # A dead actor is found whichever error came first (a survivor's collective can fail before Ray
        # reports the death): dead_actor, which the RL stage asks about its trainer ranks.
        assert dead_actor(group.actors, RuntimeError("Connection reset by peer"), wait_s=0.0) is None
        ray.kill(group.actors[1], no_restart=True)  # asynchronous: the actor may still answer a call at once
        assert dead_actor(group.actors, RuntimeError("Connection reset by peer")) == 1
    finally:
        cluster.shutdown()
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    with torch.no_grad():
        for prompt, text, score in zip(prompts, texts, raw.tolist(), strict=True):
            conversation = [*prompt.meta["messages"], {"role": "assistant", "content": text}]
            ids = torch.tensor([tokenizer.apply_chat_template(conversation, return_dict=False)])
            assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)
    assert rule.tolist() == [1.0, 0.0, 0.0]  # the verifier: only the first reply is the right number
    expected = 0.5 * rule + 2.0 * whiten(raw)
    torch.testing.assert_close(torch.tensor(scored.rewards), expected, atol=1e-5, rtol=0)
    assert scored.stats["reward/model_score_mean"] == pytest.approx(float(raw.mean()), abs=1e-6)
    assert scored.stats["reward/rule_mean"] == pytest.approx(1 / 3)
