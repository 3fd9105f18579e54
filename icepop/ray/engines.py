"""The inference side of a run as one object: `Engines`.

What an RL step asks of it, in order: `rollouts(step)` (the step's batch, a stale one when
rollout.max_staleness > 0: icepop.ray.staleness), `sleep()` (colocated: the engines free the devices for
training), `push(version)` (the trainer's new weights into every engine by the placement's transport,
checked on the probe sequences — a difference beyond the engine dtype's noise stops the run — then,
for the mismatch stress test only, a noisy copy; returns the probe's difference). Evaluation asks
`at_exact_weights`. Behind each of these an engine that died is restarted on its bundle, every engine
re-synced and the call retried, at most rollout.max_restarts times in a run.

Where the engines live, how they are started and reached and how weights travel is the placement's
(icepop.ray.engine_placement, chosen once); nothing here asks which placement it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from icepop import weights
from icepop.config import Config
from icepop.errors import RunStopped
from icepop.ray.actors import gather
from icepop.ray.engine_placement import EnginePlacement, engine_placement
from icepop.ray.staleness import Rollouts, StaleRolloutQueue
from icepop.ray.workers import TrainerGroup
from icepop.rollout.episodes import EpisodeLimits, EpisodeSettings
from icepop.rollout.noise import Noise
from icepop.types import Completion, Prompt, SamplingSettings, blocks

T = TypeVar("T")


def episode_settings(config: Config, model_path: str) -> EpisodeSettings:
    """What the engines' actors need to run the run's multi-turn episodes (rollout.environment or
    rollout.agent; an agent's timeout is its whole episode's)."""
    rollout, data = config.rollout, config.data
    assert rollout.episodic
    timeout = rollout.environment_timeout_seconds if rollout.agent is None else rollout.agent_timeout_seconds
    limits = EpisodeLimits(rollout.max_turns, rollout.response_tokens(), timeout)
    return EpisodeSettings(rollout.environment, limits, model_path, data.system_prompt,
                           tuple(sorted(data.chat_template_kwargs.items())),
                           rollout.context_length(data.max_prompt_tokens), rollout.agent,
                           rollout.agent_tool_parser)  # fmt: skip


@dataclass
class EngineHooks:
    """How the engines report to the run: a line for the console, an event for events.jsonl, and the
    sentence that says which checkpoint to resume from (in a RunStopped's message)."""

    log: Callable[[str], None]
    event: Callable[..., None]
    resume_hint: Callable[[], str]


class Engines:
    """The run's rollout engines: generation (and the queue of stale rollouts), weights, probe, noise,
    sleep, restarts and closing, over the placement `engine_placement(config)` chooses.

    trainer: the trainer ranks (None for evaluation alone: nothing to push or probe); data: the prompt
    stream the RL steps draw from (None: no `rollouts`); probe: the sequences both sides score after
    every push (icepop.weights.probe_sequences); prompt_tokens: the longest prompt the engines will see,
    which sizes their KV cache under rollout.kv_cache_gib=null (None: data.max_prompt_tokens)."""

    def __init__(
        self,
        config: Config,
        model_path: str,
        bundles: Any,
        trainer: TrainerGroup | None = None,
        *,
        weights_file: str = "",
        data: Any = None,
        probe: list[list[int]] | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        self.config = config
        self.placement: EnginePlacement = engine_placement(config, trainer is not None)(
            config, model_path, bundles, trainer, weights_file, prompt_tokens
        )
        self.trainer = trainer
        self.episodes = episode_settings(config, model_path) if config.rollout.episodic else None
        self.queue = StaleRolloutQueue(config, self, data) if data is not None else None
        self.probe_sequences = probe or []
        self.restarts = 0
        self.hooks: EngineHooks | None = None
        """Set by the run once its tracker and telemetry exist; restarts need them."""

    @property
    def pending(self) -> list[Any]:
        """The engines' set-up calls (`icepop.ray.actors.wait_ready`)."""
        return self.placement.pending

    @property
    def count(self) -> int:
        return len(self.placement.actors)

    def connect(self) -> str:
        """Once the engines are ready: form what the weights travel by; returns the one-line description."""
        self.placement.connect()
        return self.placement.describe()

    # Generation and scoring.

    def async_generate(
        self, prompts: list[Prompt], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[Any]:
        """One ref per engine, each resolving to list[list[Completion]] for its contiguous block of prompts
        (a group never splits): one reply each, or with rollout.environment an episode each (run in the
        engine's actor, its environments stepping there)."""
        actors = self.placement.actors
        shares = [(actor, rows) for actor, rows in zip(actors, blocks(len(prompts), len(actors)), strict=True)
                  if rows.stop > rows.start]  # fmt: skip
        if self.episodes is not None:
            return [actor.episodes.remote(self.episodes, prompts[rows], samples_per_prompt, sampling)
                    for actor, rows in shares]  # fmt: skip
        ids = [p.prompt_ids for p in prompts]
        call = self.placement.call
        return [
            call(actor).remote("generate", ids[rows], samples_per_prompt, sampling) for actor, rows in shares
        ]

    def generate(
        self, prompts: list[Prompt], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """`async_generate`, waited for: result[i] holds prompt i's samples."""
        return [
            group
            for block in gather(self.async_generate(prompts, samples_per_prompt, sampling))
            for group in block
        ]

    def async_score(self, shares: list[list[list[int]]], prompt_len: int) -> list[Any]:
        """One ref per engine: its log-probs of its share of the sequences (RolloutEngine.score)."""
        call = self.placement.call
        return [
            call(a).remote("score", s, prompt_len) for a, s in zip(self.placement.actors, shares, strict=True)
        ]

    def async_call(self, method: str, *args: Any) -> list[Any]:
        """The same call on every engine."""
        return [self.placement.call(actor).remote(method, *args) for actor in self.placement.actors]

    def rollouts(self, step: int) -> Rollouts:
        """Step `step`'s batch with its completions: issued now (rollout.max_staleness = 0) or earlier,
        and the batches of the steps ahead issued meanwhile."""
        assert self.queue is not None, "Engines(data=...) for rollouts"
        self.queue.top_up(step)
        return self.queue.take(step, lambda collect: self.retrying(step, collect))

    # Weights.

    def sleep(self) -> None:
        """Free the engines' devices for the trainer until the next push wakes them (colocated)."""
        gather(self.placement.sleep())

    def push(self, version: int, lap: Callable[[str], None] | None = None) -> weights.ProbeDifference:
        """The trainer's weights after step `version` into every engine, once the generations in flight
        have finished (`lap("wait_rollouts")`), then (`lap("sync_push")`) the probe, checked, and for the
        stress test the noisy copy of step `version`; returns the probe's difference."""
        if self.queue is not None:
            self.queue.wait()
        if lap is not None:
            lap("wait_rollouts")
        return self.retrying(version, lambda: self._sync(version, lap))

    def at_exact_weights(self, step: int, action: Callable[[], T]) -> T:
        """action() with the engines holding the trainer's weights after `step` exactly: under mismatch
        injection they get them for it, and step's noisy copy back afterwards."""

        def exact() -> T:
            if self.config.rollout.mismatch_noise:
                self.placement.push(None)
            result = action()
            self._inject(step)
            return result

        return self.retrying(step + 1, exact)

    def probe(self) -> weights.ProbeDifference:
        """Both sides score the probe sequences (after their first token): each engine its share, at once,
        then the trainer all of them. One after the other: on a CPU machine engines and ranks share the
        cores, and their thread pools side by side oversubscribe them (SmolLM2-135M: 5.5 s instead of 2)."""
        assert self.trainer is not None, "Engines(trainer=...) to probe"
        sequences = self.probe_sequences
        shares = weights.probe_shares(len(sequences), self.count)
        per_engine = gather(self.async_score([[sequences[i] for i in share] for share in shares], 1))
        ids, mask = weights.probe_rows(sequences, self.trainer.ranks)
        trainer_scores = torch.cat(gather(self.trainer.async_logprobs(ids, mask, 1.0)))
        return weights.probe_difference(shares, per_engine, trainer_scores)

    def _sync(self, version: int, lap: Callable[[str], None] | None = None) -> weights.ProbeDifference:
        self.placement.push(None)  # blocks until every engine holds the new weights
        if self.queue is not None:
            self.queue.engine_version = version
        if lap is not None:
            lap("sync_push")
        difference = self.probe()
        weights.check_probe(difference, self.config.rollout, self.config.model.dtype, version)
        self._inject(version)
        return difference

    def _inject(self, step: int) -> None:
        """Stress test (rollout.mismatch_noise): push again, the engines adding seeded noise on the way
        in (the noise of step s is seeded by run.seed + s)."""
        level = self.config.rollout.mismatch_noise
        if level:
            noise: Noise = (level, self.config.run.seed + step)
            self.placement.push(noise)

    # Faults and the end.

    def retrying(self, step: int, action: Callable[[], T]) -> T:
        """action(); when an engine has died meanwhile, restart it on its bundle, re-sync every engine with
        the weights they held before this step (θ, plus step − 1's noise) and retry. An error with every
        engine alive (a trainer rank died, a bad probe) is raised as is."""
        import ray

        while True:
            try:
                return action()
            except ray.exceptions.RayError:
                dead = self.placement.dead()
                if not dead:
                    raise
                self._restart(dead, step)

    def _restart(self, dead: list[int], step: int) -> None:
        assert self.hooks is not None, "Engines.hooks are set before the engines are used"
        limit = self.config.rollout.max_restarts
        if self.restarts + len(dead) > limit:
            raise RunStopped(
                f"rollout engines {dead} died at step {step} after {self.restarts} restart(s); "
                f"rollout.max_restarts={limit} is used up. {self.hooks.resume_hint()}"
            ) from None
        for index in dead:
            self.hooks.log(
                f"icepop: rollout engine {index} died at step {step}; restarting it, re-syncing the "
                f"weights and retrying ({self.restarts + 1}/{limit} restarts)"
            )
            self.restarts += 1
            self.placement.restart(index, self.restarts)
            self.hooks.event(step, "engine_restarted", engine=index, restarts=self.restarts)
        self.placement.connect()
        if self.queue is not None:
            self.queue.reissue_later()
        self._sync(step - 1)

    def close(self) -> None:
        """Close every engine (before the trainer: a colocated engine's close ends its rank's group)."""
        gather(self.async_call("close"))
