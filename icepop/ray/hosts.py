"""The Ray actor classes: each builds one plain object in its own process and forwards calls to it.

Their class names name the roles in `ps` ("ray::EngineHost.call") and in Ray's listings. An engine's
actor also runs multi-turn episodes on its engine (`episodes`), so that every turn is a local call and
the environments step next to the engine.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Any, cast

from icepop.rollout.agents import episode_runner
from icepop.rollout.base import RolloutEngine
from icepop.rollout.episodes import EpisodeSettings
from icepop.rollout.noise import Noise
from icepop.trainer.base import PolicyTrainer, RewardModelTrainer
from icepop.types import Completion, Prompt, SamplingSettings

FREE_PORTS = range(20000, 32768)
"""Where `free_port` looks: above Ray's worker ports (10002-19999 by default) and below Linux's
ephemeral range (32768-60999), from which every outgoing connection takes its local port. A port the
OS hands out for bind(0) lies in that range, so between our check and the server's bind any connection
on the machine (Ray's, another job's) could take it: "Address already in use" (seen under load)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` (the address the trainer group's rendezvous will listen on),
    picked at random in FREE_PORTS; the OS's choice if none of the tried ones binds."""
    rng = random.Random()  # seeded from the OS: processes picking at once do not follow one sequence
    for port in rng.sample(FREE_PORTS, 64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            with contextlib.suppress(OSError):
                s.bind((host, port))
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


WORKER_LOG_DIR = "ICEPOP_WORKER_LOG_DIR"
"""Environment variable naming the folder (the run directory's logs/, on storage every node shares) where
each actor writes its process's output, `<role>-<pid>.log`; unset, the output goes where Ray sends it."""


def output_to_log_file(role: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2: Python's, vLLM's and DeepSpeed's
    loggers, C++ warnings) to `<WORKER_LOG_DIR>/<role>-<pid>.log`, if the variable is set: third-party
    warnings stay in the run directory instead of the console. Exceptions still reach the driver."""
    import sys

    folder = os.environ.get(WORKER_LOG_DIR)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{role}-{os.getpid()}.log")
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


class _Host:
    """The Ray actor class: builds its object in `setup` (inside the actor's own process, so heavy
    imports happen there) and forwards `call(method, ...)` to it."""

    def __init__(self) -> None:
        output_to_log_file(type(self).__name__)
        self.obj: Any = None
        self.episode_runner: Any = None  # an engine's, once it runs episodes (an environment's or agent's)

    def node_address(self) -> tuple[str, int]:
        import ray

        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def pid(self) -> int:
        return os.getpid()

    def setup(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.obj = cls(**kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def rollout_engine(self) -> RolloutEngine:
        """The engine this actor's episodes run on (an engine's or a colocated trainer rank's)."""
        raise TypeError(f"{type(self).__name__} hosts no rollout engine")

    def episodes(
        self,
        settings: EpisodeSettings,
        prompts: list[Prompt],
        samples_per_prompt: int,
        sampling: SamplingSettings,
    ) -> list[list[Completion]]:
        """Multi-turn episodes on the actor's engine, its environments stepping in this process."""
        if self.episode_runner is None or self.episode_runner.settings != settings:
            self.episode_runner = episode_runner(settings)
        return self.episode_runner.run(self.rollout_engine(), prompts, samples_per_prompt, sampling)


class EngineHost(_Host):
    """A rollout engine's actor; the class names the role in `ps` ("ray::EngineHost.call") and Ray."""

    obj: RolloutEngine

    def rollout_engine(self) -> RolloutEngine:
        return self.obj


class TrainerHost(_Host):
    """A trainer rank's actor; under cluster.placement=colocated it also hosts a rollout engine, built
    after the rank (vLLM then adopts the rank's process group) and reached through `call_engine`."""

    obj: PolicyTrainer | RewardModelTrainer
    engine: RolloutEngine | None = None

    def setup_engine(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.engine = cls(**kwargs)

    def call_engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.rollout_engine(), method)(*args, **kwargs)

    def rollout_engine(self) -> RolloutEngine:
        if self.engine is None:
            raise TypeError("this trainer rank hosts no engine (cluster.placement=disaggregated)")
        return self.engine

    def push_to_engine(self, noise: Noise | None) -> None:
        """Hand the rank's full weights to its engine in this process (woken first, if asleep);
        collective over the ranks under ZeRO-3."""
        engine = self.rollout_engine()
        policy = cast(PolicyTrainer, self.obj)  # only a policy's ranks host an engine
        engine.wake()
        engine.load_tensors(policy.weight_tensors(), noise)


class ReferenceHost(_Host):
    """The frozen reference policy's actor (icepop.trainer.reference.ReferencePolicy)."""


class RewardModelHost(_Host):
    """A reward-model scoring actor (icepop.rewards.model.RewardModelScorer)."""
