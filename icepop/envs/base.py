"""The `Environment` seam: what a multi-turn rollout needs from a task with tools, nothing more.

An environment is made fresh for every episode (one sample of one prompt). It gives the conversation
to begin with, then reads each model turn as text and answers with a `Turn`: messages to append (a
tool's output), a reward contribution, and whether the episode is over. The episode runner
(icepop.rollout.episodes) keeps the tokens: it never re-tokenizes the model's text, so an environment
only ever sees and writes text.

Built-in environments are named ("python_tool", "code_repair"); any other is a dotted path to a
callable that returns one (`rollout.environment=my_pkg.envs:Make`, a class will do): see
icepop.envs.factory. That callable may also carry a `demonstration(problem)` (a static method of the
class will do) writing a whole conversation for a built-in task's problem: the tiny models' SFT warm-up
then learns the environment's exchange from it (`Demonstration`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from icepop.types import Problem, Prompt

Message = dict[str, str]
"""A chat message: {"role": ..., "content": ...}."""


@dataclass
class Turn:
    """What an environment answers to one model turn."""

    observation: list[Message] = field(default_factory=list)
    """Messages appended after the model's turn (e.g. {"role": "tool", "content": stdout}); the model
    then takes another turn. Ignored when `done`."""
    reward: float = 0.0
    """This turn's contribution; the episode's reward is their sum."""
    done: bool = False
    """The episode ends here (it also ends at rollout.max_turns or when its token budget is spent)."""
    info: dict[str, float] = field(default_factory=dict)
    """Counts to log, summed over the episode and averaged over episodes as episode/<key>_mean (e.g.
    episode/tool_calls_mean)."""


class Environment(Protocol):
    """One episode's environment."""

    def start(self, prompt: Prompt) -> list[Message]:
        """The conversation the episode begins with (the model answers it), made from the data row:
        `prompt.meta["messages"]` (the row's chat), `prompt.answer`, `prompt.task`, `prompt.meta`."""
        ...

    def step(self, reply: str) -> Turn:
        """Read the model's turn (its text, end-of-turn token excluded) and answer it."""
        ...


Demonstration = Callable[[Problem], list[Message]]
"""What an environment's optional `demonstration(problem)` is: the whole conversation, tool messages
included, that the SFT warm-up trains on for one generated problem (e.g. icepop.envs.python_tool)."""


def started(env: Environment, prompt: Prompt) -> list[Message]:
    """`env.start(prompt)`, checked: a non-empty list of {"role": str, "content": str} messages, the last
    one not the assistant's (the model answers it). A ValueError says what came back otherwise."""
    messages = env.start(prompt)
    well_formed = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not messages or not well_formed or messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{type(env).__name__}.start() returned {messages!r:.200}; it must return the conversation the "
            'model answers: a non-empty list of {"role": str, "content": str}, not ending with the assistant'
        )
    return messages
