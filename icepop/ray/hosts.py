"""The Ray actor classes: each builds one plain object in its own process and forwards calls to it.

Their class names name the roles in `ps` ("ray::EngineHost.call") and in Ray's listings. An engine's
actor also runs multi-turn episodes on its engine (`episodes`), so that every turn is a local call and
the environments step next to the engine.
"""

from __future__ import annotations

import os
from typing import Any

from icepop.rollout.episodes import EpisodeRunner, EpisodeSettings
from icepop.types import Completion, Prompt, SamplingSettings


class _Host:
    """The Ray actor class: builds its object in `setup` (inside the actor's own process, so heavy
    imports happen there) and forwards `call(method, ...)` to it."""

    def __init__(self) -> None:
        self.obj: Any = None
        self.episode_runner: EpisodeRunner | None = None  # an engine's, once it runs episodes

    def node_address(self) -> tuple[str, int]:
        import ray

        from icepop.ray.cluster import free_port

        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def pid(self) -> int:
        return os.getpid()

    def setup(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.obj = cls(**kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def rollout_engine(self) -> Any:
        """The actor's RolloutEngine."""
        return self.obj

    def episodes(
        self,
        settings: EpisodeSettings,
        prompts: list[Prompt],
        samples_per_prompt: int,
        sampling: SamplingSettings,
    ) -> list[list[Completion]]:
        """Multi-turn episodes on the actor's engine, its environments stepping in this process."""
        if self.episode_runner is None or self.episode_runner.settings != settings:
            self.episode_runner = EpisodeRunner(settings)
        return self.episode_runner.run(self.rollout_engine(), prompts, samples_per_prompt, sampling)


class EngineHost(_Host):
    """A rollout engine's actor; the class names the role in `ps` ("ray::EngineHost.call") and Ray."""


class TrainerHost(_Host):
    """A trainer rank's actor; under cluster.placement=colocated it also hosts a rollout engine, built
    after the rank (vLLM then adopts the rank's process group) and reached through `call_engine`."""

    engine: Any = None

    def setup_engine(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.engine = cls(**kwargs)

    def call_engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.engine, method)(*args, **kwargs)

    def rollout_engine(self) -> Any:
        return self.engine

    def push_to_engine(self, noise: tuple[float, int] | None) -> None:
        """Hand the rank's full weights to its engine in this process (woken first, if asleep);
        collective over the ranks under ZeRO-3."""
        self.engine.wake()
        self.engine.load_tensors(self.obj.weight_tensors(), noise)


class ReferenceHost(_Host):
    """The frozen reference policy's actor."""


class RewardModelHost(_Host):
    """A reward-model scoring actor."""
