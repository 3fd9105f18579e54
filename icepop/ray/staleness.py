"""Stale rollouts (rollout.max_staleness = N, docs/algorithm.md "Stale rollouts"), generated while the
trainer trains: the batch of step s is issued to the engines at the start of step s − N, when they hold
the weights of step s − N − 1, so it is generated while steps s − N … s − 1 train and reaches the loss
at most N weight versions behind the trainer. N = 0 is the serial loop: issued and collected in step s.

The engines run one call after another, so a weight push (queued behind the generations in flight)
never changes the weights under a running generation: every generation finishes at the version it was
issued with, which its batch records. Beyond N = 1 the trainer waits at each push for the generations
queued ahead of it; N = 1 already overlaps one generation with one training step.

A resumed run regenerates the batches that were in flight at its checkpoint, from the prompts they had
(the checkpoint keeps the prompt stream's position before them), at the checkpoint's weights.

The queue belongs to the run's `Engines` (icepop.ray.engines), which asks it for each step's batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from icepop.config import Config
from icepop.ray.actors import gather
from icepop.types import Completion, Prompt, SamplingSettings, blocks

Retry = Callable[[Callable[[], list[list[Completion]]]], list[list[Completion]]]
"""Runs an action that uses the engines, restarting dead ones and re-syncing them (Engines.retrying)."""


class Generating(Protocol):
    """What the queue asks of the engines (icepop.ray.engines.Engines)."""

    def async_generate(
        self, prompts: list[Prompt], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[Any]: ...

    def async_score(self, shares: list[list[list[int]]], prompt_len: int) -> list[Any]: ...

    @property
    def count(self) -> int: ...


def batch_sampling(config: Config, step: int) -> SamplingSettings:
    """How step `step`'s batch is sampled: the rollout settings, seeded by the run's seed and the step."""
    return config.rollout.sampling(seed=config.run.seed * 100_003 + step)


@dataclass
class Rollouts:
    """The batch of one step, as issued to the engines."""

    step: int
    prompts: list[Prompt]
    sampling: SamplingSettings
    version: int
    """The weights that generate it: those after step `version` (0: the starting weights)."""
    data_state: dict[str, int]
    """The prompt stream's position before these prompts were drawn (what a checkpoint keeps)."""
    refs: list[Any] | None = None
    """One per engine; None when (re-)issuing is due."""
    groups: list[list[Completion]] = field(default_factory=list)
    """The completions, once collected."""
    behind: int = 0
    """Weight versions between it and the trainer that trains on it, once collected."""
    rescored: list[Any] | None = None
    """Refs to the engines' log-probs of it at the trainer's weights (`rescore`), when it is stale."""


class StaleRolloutQueue:
    """The batches issued and not yet trained on, oldest first, and the engines' weight version."""

    def __init__(self, config: Config, engines: Generating, data: Any) -> None:
        self.config, self.engines, self.data = config, engines, data  # data: a prompt stream
        self.max_staleness = config.rollout.max_staleness
        self.pending: deque[Rollouts] = deque()
        self.issued = 0
        """The last step whose batch was issued."""
        self.engine_version = 0
        """The weights the engines hold (or will, once the generations queued before it finish): those
        after this step. Set at each push (Engines.push)."""

    def top_up(self, step: int) -> None:
        """Issue the batches of steps up to step + N (and the run's last), at the engines' weights."""
        config = self.config
        self.issued = max(self.issued, step - 1)  # a resumed run: its earlier steps are done
        while self.issued < min(step + self.max_staleness, config.train.steps):
            self.issued += 1
            state = self.data.state_dict()
            prompts = self.data.next_batch(config.algo.prompts_per_step)
            sampling = batch_sampling(config, self.issued)
            self.pending.append(Rollouts(self.issued, prompts, sampling, self.engine_version, state))
            self._issue(self.pending[-1])

    def _issue(self, batch: Rollouts) -> None:
        """Send the batch's prompts to the engines, at the weights they hold (or will, in queue order)."""
        batch.version = self.engine_version
        batch.refs = self.engines.async_generate(
            batch.prompts, self.config.algo.samples_per_prompt, batch.sampling
        )

    def take(self, step: int, retry: Retry) -> Rollouts:
        """Step `step`'s batch, its completions collected: when an engine died meanwhile, `retry`
        restarts and re-syncs it, and the batch is re-issued at the weights the engines then hold. A
        stale batch is sent for rescoring at the trainer's weights, which the engines hold now, when
        the sampling temperature is 1 (vLLM scores at temperature 1)."""
        batch = self.pending.popleft()
        if batch.step != step:
            raise RuntimeError(f"the rollout queue holds step {batch.step}'s batch where {step}'s is due")

        def collect() -> list[list[Completion]]:
            if batch.refs is None:
                self._issue(batch)
            try:
                return [group for block in gather(batch.refs or []) for group in block]
            except ray.exceptions.RayError:
                batch.refs = None  # re-issued after the restart
                raise

        batch.groups = retry(collect)
        batch.behind = (step - 1) - batch.version
        if not 0 <= batch.behind <= self.max_staleness:  # the schedule guarantees it; never train on older
            raise RuntimeError(
                f"step {step}'s rollouts come from the weights of step {batch.version}, {batch.behind} "
                f"versions behind the trainer; rollout.max_staleness={self.max_staleness}"
            )
        if batch.behind and self.config.rollout.temperature == 1.0:
            batch.rescored = rescore(self.engines, batch)
        return batch

    def reissue_later(self) -> None:
        """After an engine restart: the batches in flight may have been on it; each is re-issued when it is
        due, at the weights the engines hold then."""
        for batch in self.pending:
            batch.refs = None

    def wait(self) -> None:
        """Until every generation in flight has finished (before a weight push: the engines are idle)."""
        refs = [ref for batch in self.pending for ref in batch.refs or []]
        if refs:
            ray.wait(refs, num_returns=len(refs))

    def data_state(self) -> dict[str, int]:
        """The prompt stream's position a checkpoint keeps: before the batches in flight."""
        return self.pending[0].data_state if self.pending else self.data.state_dict()


def rescore(engines: Generating, batch: Rollouts) -> list[Any]:
    """Refs to the engines' log-probs of the batch's sequences at the weights they hold now (the
    trainer's, the proximal policy): with ℓ_inf at the batch's version they split log(π_prox/π_inf)
    into staleness and engine mismatch. One share of the sequences per engine."""
    pairs = zip(batch.prompts, batch.groups, strict=True)
    sequences = [(c.prompt_ids or prompt.prompt_ids) + c.token_ids for prompt, group in pairs for c in group]
    return engines.async_score([sequences[rows] for rows in blocks(len(sequences), engines.count)], 1)
