"""Worker groups: DeepSpeed trainer ranks, the reference policy and reward-model scorers as Ray actors
on their bundles (the rollout engines are `icepop.ray.engines.Engines`).

The actors are thin: each holds one plain object (a `PolicyTrainer`, ...) built inside the actor's
process, and forwards calls to it. Group methods that return object refs are named `async_*`; the
stage loops do the `ray.get`, so every blocking point is visible there.

Constructing a group starts its actors and their set-up (imports, model loading) without waiting:
`wait_ready(*groups)` (icepop.ray.actors) waits for all of them at once, so engines and trainer ranks
start in parallel.
"""

from __future__ import annotations

from typing import Any

import torch

from icepop.config import Config
from icepop.ray.actors import make_actors
from icepop.ray.bundles import gpu_requests
from icepop.ray.cluster import Placement
from icepop.ray.engine_placement import engine_placement
from icepop.ray.hosts import ReferenceHost, RewardModelHost, TrainerHost
from icepop.trainer.base import backend_class
from icepop.trainer.inputs import deep_merge
from icepop.trainer.settings import trainer_settings
from icepop.types import PreferenceBatch, RLBatch, SFTBatch, blocks


def rank_settings(config: Config, model_path: str, stage: str) -> dict[str, Any]:
    """`trainer_settings` of a stage's ranks, with what the engine placement needs of an RL stage's
    DeepSpeed config (`deepspeed_overrides`) merged under the user's own trainer.ds_config_overrides."""
    settings = trainer_settings(config, model_path, stage)
    if stage == "rl":
        needed = engine_placement(config).deepspeed_overrides(config)
        settings["ds_config_overrides"] = deep_merge(needed, settings["ds_config_overrides"])
    return settings


class TrainerGroup:
    """DeepSpeed ranks forming one torch.distributed group; rank 0's node hosts the rendezvous."""

    def __init__(self, config: Config, model_path: str, placement: Placement, stage: str) -> None:
        """`stage`: "rl", "sft" or "rm" (icepop.trainer.settings.trainer_settings)."""
        import ray

        trainer = config.trainer
        gpus, _ = gpu_requests(config)  # the rest of the bundle's GPU is the reference policy's
        cpus = trainer.cpus_per_rank
        self.actors = make_actors(TrainerHost, trainer.ranks, placement.trainer, cpus, gpus, "trainer")
        master_addr, master_port = ray.get(self.actors[0].node_address.remote())
        backend = backend_class(trainer.backend)
        common = rank_settings(config, model_path, stage)
        common |= {"master_addr": master_addr, "master_port": master_port}
        self.pending = [
            a.setup.remote(backend, {**common, "rank": rank}) for rank, a in enumerate(self.actors)
        ]

    @property
    def ranks(self) -> int:
        return len(self.actors)

    def async_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float
    ) -> list[Any]:
        """One ref per rank for its contiguous block of rows; concatenate the results in order."""
        parts = blocks(input_ids.shape[0], self.ranks)
        return [
            a.call.remote("logprobs", input_ids[rows], attention_mask[rows], temperature)
            for a, rows in zip(self.actors, parts, strict=True)
        ]

    def async_train_rl(self, shards: list[RLBatch], **kwargs: Any) -> list[Any]:
        return [
            a.call.remote("train_rl", shard, **kwargs) for a, shard in zip(self.actors, shards, strict=True)
        ]

    def async_train_sft(self, shards: list[SFTBatch], **kwargs: Any) -> list[Any]:
        return [
            a.call.remote("train_sft", shard, **kwargs) for a, shard in zip(self.actors, shards, strict=True)
        ]

    def async_train_rm(self, shards: list[PreferenceBatch], global_pair_count: int) -> list[Any]:
        return [
            a.call.remote("train_rm", shard, global_pair_count)
            for a, shard in zip(self.actors, shards, strict=True)
        ]

    def async_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Any]:
        """Reward-model scores: one ref per rank for its contiguous block of rows; concatenate them."""
        parts = blocks(input_ids.shape[0], self.ranks)
        return [
            a.call.remote("scores", input_ids[rows], attention_mask[rows])
            for a, rows in zip(self.actors, parts, strict=True)
        ]

    def async_call(self, method: str, *args: Any) -> list[Any]:
        """The same call on every rank (collectives such as export_weights, save, close)."""
        return [a.call.remote(method, *args) for a in self.actors]


class ReferenceGroup:
    """One actor holding the frozen starting policy (KL term), beside trainer rank 0 on its bundle: on
    GPUs it reserves a share of rank 0's GPU (icepop.ray.bundles.gpu_requests), on CPU nothing."""

    def __init__(self, config: Config, model_path: str, placement: Placement) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from icepop.trainer.reference import ReferencePolicy

        strategy = PlacementGroupSchedulingStrategy(placement.trainer, placement_group_bundle_index=0)
        _, gpus = gpu_requests(config)
        options = {"num_cpus": 0, "num_gpus": gpus, "scheduling_strategy": strategy}
        self.actor = ray.remote(ReferenceHost).options(**options).remote()
        kwargs = {
            "model_path": model_path,
            "dtype": config.model.dtype,
            "micro_batch_size": config.trainer.micro_batch_size,
        }
        self.pending = [self.actor.setup.remote(ReferencePolicy, kwargs)]

    def async_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float
    ) -> Any:
        """log π_ref at the sampling temperature (the policy's log-probs use the same one)."""
        return self.actor.call.remote("logprobs", input_ids, attention_mask, temperature)


class RewardModelGroup:
    """Reward-model actors on their own bundles; a batch of conversations is split across them."""

    def __init__(self, config: Config, placement: Placement) -> None:

        from icepop.rewards.model import RewardModelScorer

        reward = config.reward
        self.actors = make_actors(
            RewardModelHost,
            reward.model_workers,
            placement.reward,
            reward.cpus_per_model_worker,
            reward.gpus_per_model_worker,
            "reward-model",
        )
        kwargs = {
            "model_path": reward.model_path,
            "dtype": config.model.dtype,
            "batch_size": reward.model_batch_size,
        }
        self.pending = [a.setup.remote(RewardModelScorer, kwargs) for a in self.actors]

    def async_score(self, conversations: list[list[dict[str, str]]], responses: list[str]) -> list[Any]:
        """One ref per actor for its contiguous block; concatenate the lists in order."""
        parts = blocks(len(responses), len(self.actors))
        return [
            a.call.remote("score", conversations[rows], responses[rows])
            for a, rows in zip(self.actors, parts, strict=True)
            if rows.stop > rows.start
        ]
