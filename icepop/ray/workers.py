"""Worker groups: vLLM engines and DeepSpeed trainer ranks as Ray actors on their bundles.

The actors are thin: each holds one plain object (a `RolloutEngine` or a `TrainerBackend`) built
inside the actor's process, and forwards calls to it (colocated, a trainer rank's holds an engine
too). Group methods that return object refs are named `async_*`; the RL loop does the `ray.get`, so
every blocking point is visible there.

Constructing a group starts its actors and their set-up (imports, model loading) without waiting:
`wait_ready(*groups)` waits for all of them at once, so engines and trainer ranks start in parallel.
"""

from __future__ import annotations

from typing import Any

import torch

from icepop.config import Config
from icepop.ray import cluster
from icepop.ray.cluster import Placement
from icepop.ray.hosts import EngineHost, ReferenceHost, RewardModelHost, TrainerHost
from icepop.ray.placement import gpu_requests
from icepop.rollout.base import engine_class
from icepop.rollout.episodes import EpisodeLimits, EpisodeSettings
from icepop.trainer.base import backend_class
from icepop.types import Completion, PreferenceBatch, Prompt, RLBatch, SamplingSettings, SFTBatch, blocks

WAIT_SLICE_SECONDS = 0.5


def wait_ready(*groups: Any) -> None:
    """Block until every actor of these groups (None entries are skipped) has finished its set-up."""
    gather([ref for group in groups if group is not None for ref in group.pending])


def gather(refs: list[Any]) -> list[Any]:
    """`ray.get` of several refs that raises as soon as one fails. A plain `ray.get` waits for all of
    them first, and the survivors of a dead trainer rank wait in a collective until its timeout."""
    import ray

    pending = list(refs)
    while pending:
        # In short waits, so that a Ctrl-C or SIGTERM is noticed within one of them. ray.wait swallows a
        # KeyboardInterrupt raised while it blocks and turns a SystemExit into SystemExit(1): raise what
        # the signal asked for instead.
        try:
            done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SLICE_SECONDS)
        except SystemExit:
            cluster.raise_if_stopping()
            raise
        cluster.raise_if_stopping()
        ray.get(done)
    return ray.get(refs)


def _actor(host: type, index: int, placement_group: Any, cpus: int, gpus: float, name: str) -> Any:
    """A `host` actor on bundle `index`, named "<name>-<index>-<placement group>"."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return (
        ray.remote(host)
        .options(
            num_cpus=cpus,
            num_gpus=gpus,
            name=f"{name}-{index}-{id(placement_group):x}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=index
            ),
        )
        .remote()
    )


def _actors(host: type, count: int, placement_group: Any, cpus: int, gpus: float, name: str) -> list[Any]:
    return [_actor(host, i, placement_group, cpus, gpus, name) for i in range(count)]


def actor_index(actors: list[Any], error: Exception) -> int | None:
    """Which of `actors` a RayActorError is about (None: another actor, or not known)."""
    actor_id = getattr(error, "actor_id", None)
    ids = [a._actor_id.hex() for a in actors]
    return ids.index(actor_id) if actor_id in ids else None


def engine_settings(config: Config, model_path: str) -> dict[str, Any]:
    """The keyword arguments every rollout engine of the run is built with (icepop.rollout.base). An
    engine colocated in a trainer rank uses the rank's CPUs or GPU, and sleeps while the rank trains."""
    rollout, colocated = config.rollout, config.cluster.colocated
    hosts = config.trainer if colocated else None
    cpus = hosts.cpus_per_rank if hosts else rollout.cpus_per_engine
    gpus = hosts.gpus_per_rank if hosts else rollout.gpus_per_engine
    return {
        "model_path": model_path,
        "dtype": rollout.dtype,
        "seed": config.run.seed,
        "max_model_len": rollout.context_length(config.data.max_prompt_tokens),
        "enforce_eager": rollout.enforce_eager,
        "kv_cache_bytes": int(rollout.kv_cache_gib * 2**30),
        "gpu_memory_utilization": rollout.gpu_memory_utilization,
        "enable_sleep_mode": colocated and gpus > 0,
        # On CPU vLLM's worker pins its own thread count; more threads than the bundle's cores stall it.
        "cpu_threads": cpus if gpus == 0 else None,
    }


def episode_settings(config: Config, model_path: str) -> EpisodeSettings:
    """What the engines' actors need to run the run's multi-turn episodes (rollout.environment)."""
    rollout, data = config.rollout, config.data
    assert rollout.environment is not None
    limits = EpisodeLimits(rollout.max_turns, rollout.response_tokens(), rollout.environment_timeout_seconds)
    return EpisodeSettings(rollout.environment, limits, model_path, data.system_prompt,
                           tuple(sorted(data.chat_template_kwargs.items())),
                           rollout.context_length(data.max_prompt_tokens))  # fmt: skip


class RolloutGroup:
    """N vLLM engines; prompts are split across them in contiguous blocks (a group never splits).

    hosts: the trainer ranks' actors, one engine to be built in each (cluster.placement=colocated);
    None: each engine gets an actor of its own on a rollout bundle."""

    def __init__(
        self, config: Config, model_path: str, placement: Placement, hosts: list | None = None
    ) -> None:
        rollout = config.rollout
        self.colocated = hosts is not None
        self._resources = (placement.rollout, rollout.cpus_per_engine, rollout.gpus_per_engine)
        self.restarts = 0
        self._kwargs = engine_settings(config, model_path)
        self._engine = engine_class(rollout.backend)
        self.episodes = episode_settings(config, model_path) if rollout.environment is not None else None
        if hosts is None:
            self.actors = _actors(EngineHost, rollout.engines, *self._resources, "rollout")
            self.pending = [a.setup.remote(self._engine, self._kwargs) for a in self.actors]
        else:  # queued behind each rank's own set-up, which forms the process group vLLM joins
            self.actors = list(hosts)
            self.pending = [a.setup_engine.remote(self._engine, self._kwargs) for a in self.actors]

    def _call(self, actor: Any) -> Any:
        """The actor method that forwards a call to its engine."""
        return actor.call_engine if self.colocated else actor.call

    def dead_engines(self) -> list[int]:
        """Indices of the engines whose actor has died (a live but busy one answers within 60 s); none
        when colocated: there the actor is a trainer rank's, whose death ends the run."""
        import ray

        dead = []
        for index, actor in enumerate([] if self.colocated else self.actors):
            try:
                ray.get(actor.pid.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                dead.append(index)
            except ray.exceptions.GetTimeoutError:
                pass
        return dead

    def restart(self, index: int) -> None:
        """Replace engine `index` (dead, or to be killed) by a new one on its bundle, with the starting
        weights: re-sync it (WeightSync.reconnect, then push) before using it."""
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.restarts += 1
        self.actors[index] = _actor(EngineHost, index, *self._resources, f"rollout-restart{self.restarts}")
        ray.get(self.actors[index].setup.remote(self._engine, self._kwargs))

    def async_generate(
        self, prompts: list[Prompt], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[Any]:
        """One ref per engine, each resolving to list[list[Completion]] for its block of prompts: one
        reply each, or with rollout.environment an episode each (run in the engine's actor)."""
        shares = zip(self.actors, blocks(len(prompts), len(self.actors)), strict=True)
        if self.episodes is not None:
            return [actor.episodes.remote(self.episodes, prompts[rows], samples_per_prompt, sampling)
                    for actor, rows in shares if rows.stop > rows.start]  # fmt: skip
        ids = [p.prompt_ids for p in prompts]
        return [
            self._call(actor).remote("generate", ids[rows], samples_per_prompt, sampling)
            for actor, rows in shares
            if rows.stop > rows.start
        ]

    @staticmethod
    def merge(results: list[list[list[Completion]]]) -> list[list[Completion]]:
        return [group for block in results for group in block]

    def async_score(self, shares: list[list[list[int]]], prompt_len: int) -> list[Any]:
        """One ref per engine: its log-probs of its share of the sequences (RolloutEngine.score)."""
        return [
            self._call(a).remote("score", s, prompt_len) for a, s in zip(self.actors, shares, strict=True)
        ]

    def async_call(self, method: str, *args: Any) -> list[Any]:
        """The same call on every engine."""
        return [self._call(a).remote(method, *args) for a in self.actors]

    def async_sleep(self) -> list[Any]:
        """Colocated: the engines free their devices for the trainer until the next weight push wakes
        them (vLLM sleep mode on GPUs; only marked asleep on CPU). Nothing to do otherwise."""
        return self.async_call("sleep") if self.colocated else []


class TrainerGroup:
    """DeepSpeed ranks forming one torch.distributed group; rank 0's node hosts the rendezvous."""

    def __init__(
        self,
        config: Config,
        model_path: str,
        placement: Placement,
        total_steps: int,
        lr: float,
        warmup_steps: int,
        temperature: float,
        model_kind: str = "policy",
    ) -> None:
        import ray

        trainer = config.trainer
        gpus, _ = gpu_requests(config)  # the rest of the bundle's GPU is the reference policy's
        cpus = trainer.cpus_per_rank
        self.actors = _actors(TrainerHost, trainer.ranks, placement.trainer, cpus, gpus, "trainer")
        master_addr, master_port = ray.get(self.actors[0].node_address.remote())
        backend = backend_class(trainer.backend)
        common = {
            "model_path": model_path,
            "world_size": trainer.ranks,
            "master_addr": master_addr,
            "master_port": master_port,
            "zero_stage": trainer.zero_stage,
            "offload": trainer.offload,
            "dtype": config.model.dtype,
            "lr": lr,
            "weight_decay": trainer.weight_decay,
            "betas": tuple(trainer.betas),
            "warmup_steps": warmup_steps,
            "lr_schedule": trainer.lr_schedule,
            "total_steps": total_steps,
            "grad_clip": trainer.grad_clip,
            "micro_batch_size": trainer.micro_batch_size,
            "micro_batch_tokens": trainer.micro_batch_tokens,
            "cpu_threads": trainer.cpus_per_rank if trainer.gpus_per_rank == 0 else None,
            "gradient_checkpointing": config.model.gradient_checkpointing,
            "seed": config.run.seed,
            "temperature": temperature,  # the sampling temperature: ℓ under the processed distribution
            "model_kind": model_kind,
            "lora": trainer.lora.adapter_options() if trainer.lora.enabled else None,
        }
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
    GPUs it reserves a share of rank 0's GPU (icepop.ray.placement.gpu_requests), on CPU nothing."""

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
        self.actors = _actors(
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
