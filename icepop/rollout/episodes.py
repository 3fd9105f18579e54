"""Multi-turn episodes, token-in/token-out: the model's tokens are never re-tokenized.

Key design choice: an episode is one growing list of token ids. Each model turn is generated from the
ids so far (`RolloutEngine.generate` takes ids, not text) and appended as the engine sampled it, with
its ℓ_inf; an environment's observation is rendered by the chat template once, to the tokens that
follow the model's end-of-turn token, and appended with model_mask False. Decoding the model's text
and encoding it again can give other tokens (BPE merges across the boundary, whitespace, special
tokens), and the trainer would then score tokens the engine never sampled: the IcePop ratio would be
noise. tests/test_episodes.py checks trainer ℓ against engine ℓ_inf over whole episodes.

All live episodes' next turns go to the engine in one `generate` call (continuous batching inside
it); their environments then step in parallel threads, each with a deadline: an environment that
raises or hangs ends its episode with reward 0, counted in episode/errors or episode/timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from icepop.data.prompts import chat_ids
from icepop.envs.base import Environment, Message, Turn, started
from icepop.rollout.base import RolloutEngine
from icepop.types import Completion, Prompt, SamplingSettings

NEUTRAL_HISTORY: list[Message] = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
"""The conversation an observation is rendered after: only the tokens after its end-of-turn are used."""


@dataclass(frozen=True)
class EpisodeLimits:
    """When an episode ends besides the environment saying so (rollout.max_turns, ...)."""

    max_turns: int
    """Model turns per episode."""
    max_episode_tokens: int
    """Model and observation tokens per episode, after the prompt."""
    step_timeout_seconds: float
    """Longest an environment's `step` (an agent's whole episode) may take; past it the episode ends
    with reward 0."""


@dataclass(frozen=True)
class EpisodeSettings:
    """What an engine's actor needs to run a run's episodes (built once per actor: `EpisodeRunner`)."""

    environment: str | None
    """rollout.environment: a built-in name or a dotted path (None: an agent's episodes)."""
    limits: EpisodeLimits
    model_path: str
    """Where the tokenizer is (the policy's folder)."""
    system_prompt: str | None
    """data.system_prompt, for conversations that start without one."""
    template_kwargs: tuple[tuple[str, Any], ...]
    """data.chat_template_kwargs, as pairs."""
    context_length: int
    """The engine's context (prompt + episode)."""
    agent: str | None = None
    """rollout.agent: a dotted path (icepop.rollout.agents), instead of an environment."""
    agent_tool_parser: str | None = None
    """rollout.agent_tool_parser: vLLM's tool parser that reads tool calls out of an agent's replies."""

    def chat_tokenizer(self) -> Any:
        """The run's chat tokenizer (its system prompt and template options), from the policy's folder."""
        from transformers import AutoTokenizer

        from icepop.data.prompts import ChatTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return ChatTokenizer(tokenizer, self.system_prompt, dict(self.template_kwargs))


class EpisodeRunner:
    """The environment factory and the chat tokenizer of a run, loaded once, and `run` for each call."""

    def __init__(self, settings: EpisodeSettings) -> None:
        from icepop.envs.factory import environment_factory

        assert settings.environment is not None
        self.settings = settings
        self.make_env = environment_factory(settings.environment)
        self.tokenizer = settings.chat_tokenizer()

    def run(
        self,
        engine: RolloutEngine,
        prompts: list[Prompt],
        samples_per_prompt: int,
        sampling: SamplingSettings,
    ) -> list[list[Completion]]:
        """`run_episodes` with this run's environment, tokenizer and limits."""
        s = self.settings
        return run_episodes(engine, self.make_env, self.tokenizer, prompts, samples_per_prompt, sampling,
                            s.limits, s.context_length)  # fmt: skip


@dataclass
class _Episode:
    env: Environment
    prompt_ids: list[int]
    messages: list[Message]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_mask: list[bool] = field(default_factory=list)
    reward: float = 0.0
    finish_reason: str = "stop"
    done: bool = False
    stats: dict[str, float] = field(
        default_factory=lambda: {"turns": 0.0, "observation_tokens": 0.0, "errors": 0.0, "timeouts": 0.0}
    )

    def room(self, limits: EpisodeLimits, context_length: int) -> int:
        """Tokens the episode may still add: within its budget and the engine's context."""
        return min(
            limits.max_episode_tokens - len(self.tokens),
            context_length - len(self.prompt_ids) - len(self.tokens),
        )

    def add_turn(self, output: Completion) -> None:
        """Append a model turn as the engine sampled it."""
        self.tokens += output.token_ids
        self.logprobs += output.logprobs
        self.model_mask += [True] * len(output.token_ids)
        self.finish_reason = output.finish_reason
        self.stats["turns"] += 1
        self.messages.append({"role": "assistant", "content": output.text})

    def completion(self, tokenizer: Any) -> Completion:
        text = tokenizer.decode(self.tokens)
        return Completion(self.tokens, self.logprobs, self.finish_reason, text, self.model_mask,
                          self.prompt_ids, self.reward, self.stats)  # fmt: skip


def observation_ids(tokenizer: Any, observation: list[Message]) -> list[int]:
    """The tokens that follow a model turn's end-of-turn token when `observation` is appended and the
    model's next turn opened (ChatML: "\\n<|im_start|>tool\\n…<|im_end|>\\n<|im_start|>assistant\\n")."""
    before = chat_ids(tokenizer, NEUTRAL_HISTORY, add_generation_prompt=False)
    after = chat_ids(tokenizer, [*NEUTRAL_HISTORY, *observation], add_generation_prompt=True)
    eos = tokenizer.eos_token_id
    if eos not in before:
        raise ValueError("the chat template ends an assistant turn without the tokenizer's EOS token")
    cut = len(before) - before[::-1].index(eos)  # just after the assistant turn's end-of-turn token
    if after[:cut] != before[:cut]:
        raise ValueError("the chat template renders the conversation before an observation differently")
    return after[cut:]


def _step_all(episodes: list[_Episode], replies: list[str], timeout: float) -> list[Turn | str]:
    """Every episode's `env.step(reply)` in its own thread; "error" or "timeout" where it failed."""
    results: list[Turn | str] = ["timeout"] * len(episodes)

    def run(index: int) -> None:
        try:
            turn = episodes[index].env.step(replies[index])
            results[index] = turn if isinstance(turn, Turn) else "error"
        except Exception:  # the environment's failure ends its episode, not the run
            results[index] = "error"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(episodes))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:  # a hung thread is left behind (daemon): Python cannot stop it
        thread.join(max(0.0, deadline - time.monotonic()))
    return list(results)  # a copy: a late thread must not turn its "timeout" into a Turn afterwards


def start_episodes(
    make_env: Callable[[], Environment], tokenizer: Any, prompts: list[Prompt], samples_per_prompt: int
) -> list[_Episode]:
    """`samples_per_prompt` episodes per prompt, in prompt order, each with its own environment and the
    templated ids of the conversation that environment starts with."""
    episodes = []
    for prompt in prompts:
        for _ in range(samples_per_prompt):
            env = make_env()
            messages = started(env, prompt)
            episodes.append(
                _Episode(env, chat_ids(tokenizer, messages, add_generation_prompt=True), messages)
            )
    return episodes


def run_episodes(
    engine: RolloutEngine,
    make_env: Callable[[], Environment],
    tokenizer: Any,
    prompts: list[Prompt],
    samples_per_prompt: int,
    sampling: SamplingSettings,
    limits: EpisodeLimits,
    context_length: int,
) -> list[list[Completion]]:
    """`samples_per_prompt` episodes per prompt, result[i] holding prompt i's in order. sampling's
    max_new_tokens bounds each turn; context_length (the engine's) bounds prompt + episode."""
    episodes = start_episodes(make_env, tokenizer, prompts, samples_per_prompt)
    for turn in range(limits.max_turns):
        live = [e for e in episodes if not e.done]
        room = [min(sampling.max_new_tokens, e.room(limits, context_length)) for e in live]
        for episode, tokens in zip(live, room, strict=True):
            episode.done = tokens < 1  # no room for a turn: ended by its token budget
        for group, tokens in enumerate(
            sorted(set(t for t in room if t >= 1))
        ):  # usually one: every turn's budget
            batch = [e for e, t in zip(live, room, strict=True) if t == tokens]
            seed = None if sampling.seed is None else sampling.seed + 7919 * turn + 104_729 * group
            settings = replace(sampling, max_new_tokens=tokens, seed=seed)
            outputs = engine.generate([e.prompt_ids + e.tokens for e in batch], 1, settings)
            for episode, (output,) in zip(batch, outputs, strict=True):
                episode.add_turn(output)
        stepping = [e for e in live if not e.done]
        results = _step_all(
            stepping, [e.messages[-1]["content"] for e in stepping], limits.step_timeout_seconds
        )
        for episode, result in zip(stepping, results, strict=True):
            last = turn == limits.max_turns - 1
            _apply(episode, result, tokenizer, 0 if last else episode.room(limits, context_length))
    return [
        [e.completion(tokenizer) for e in episodes[i * samples_per_prompt : (i + 1) * samples_per_prompt]]
        for i in range(len(prompts))
    ]


def _apply(episode: _Episode, result: Turn | str, tokenizer: Any, room: int) -> None:
    """The environment's answer to a turn: its reward and counts, and the observation's tokens when the
    episode goes on: not done, not cut at the turn's token limit (no end-of-turn token), and with
    `room` for the observation and at least one more model token."""
    if isinstance(result, str):  # "error" or "timeout": reward 0 for the whole episode
        episode.stats[f"{result}s"] += 1
        episode.reward, episode.done = 0.0, True
        return
    episode.reward += float(result.reward)
    for key, value in result.info.items():
        episode.stats[key] = episode.stats.get(key, 0.0) + float(value)
    episode.done = result.done or episode.finish_reason == "length" or not result.observation
    if episode.done:
        return
    ids = observation_ids(tokenizer, result.observation)
    if len(ids) >= room:  # the turn or token budget is spent: the episode ends on the model's turn
        episode.done = True
        return
    episode.tokens += ids
    episode.logprobs += [0.0] * len(ids)
    episode.model_mask += [False] * len(ids)
    episode.stats["observation_tokens"] += len(ids)
    episode.messages += result.observation
