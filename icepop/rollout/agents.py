"""Unmodified agents as episodes (rollout.agent): the user's `agent(row, client)` talks to the engine
through an OpenAI-compatible endpoint (icepop.rollout.agent_server) and icepop keeps the tokens.

Key design choice: token in, token out, as for an environment's episodes (icepop.rollout.episodes).
Each episode has a key (the client's API key) and a session: the token ids so far, each model token
with its ℓ_inf. A chat request whose messages extend the session's conversation (the replies the
endpoint gave, as it gave them, then new messages) reuses those ids exactly and renders only the new
messages, to the tokens that follow the model's end-of-turn token. A request that rewrites the history
(an edited or dropped message, other tools, a reply cut at its token limit) starts a new branch: its
messages are rendered afresh as the branch's prompt, never scored as the model's, and the episode's
`branches` count says so. The episode trains on its last branch. `/v1/completions` works alike on text
or token-id prompts. (That bookkeeping: icepop.rollout.agent_sessions. With rollout.agent_tool_parser,
a chat reply's function calls are read out of its text by vLLM's parser: icepop.rollout.tool_calls.)

All episodes' agents run at once, each in its own thread (an async agent in its own event loop); their
requests are batched into the engine from the actor's own thread: a batch goes when every running agent
is waiting on one, or `BATCH_WINDOW_SECONDS` after its first request. A round is one actor call, so no
weight push falls inside it: every request of a round is served at the round's weights.

An agent that raises, returns something that is not a number, or outlives rollout.agent_timeout_seconds
ends its episode with reward 0 (episode/errors, episode/timeouts); its key is refused from then on, as
is any key that is not one of the round's episodes'.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from icepop.rollout.agent_server import CHAT, AgentServer, ApiError, Message, Request, Served
from icepop.rollout.agent_sessions import Session, add_turn, agent_row, commit, context
from icepop.rollout.base import RolloutEngine
from icepop.rollout.episodes import EpisodeRunner, EpisodeSettings
from icepop.rollout.tool_calls import ToolCalls
from icepop.types import Completion, Prompt, SamplingSettings

BATCH_WINDOW_SECONDS = 0.05
"""How long a batch waits for more requests once its first has come (unless every agent has asked)."""


@dataclass
class _Pending:
    session: Session
    ids: list[int]
    max_tokens: int
    since: float
    ready: threading.Event = field(default_factory=threading.Event)
    output: Completion | None = None
    message: Message | None = None
    """A chat turn's message as served (its tool calls read out of it where the run has a parser)."""


class AgentRunner:
    """A run's agent, its chat tokenizer and its endpoint (started once per actor), and `run` for each
    call: one episode per sample, every agent at once, their requests batched into the engine."""

    def __init__(self, settings: EpisodeSettings, max_batch: int | None = None) -> None:
        from icepop.rewards.verifiers import resolve_callable

        assert settings.agent is not None
        self.settings, self.max_batch = settings, max_batch
        """max_batch: the most requests per engine call (None: no limit; 1: one at a time, bench/)."""
        self.agent: Callable[..., Any] = resolve_callable(settings.agent, "agent")
        self.tokenizer = settings.chat_tokenizer()
        parser = settings.agent_tool_parser
        self.tool_calls = None if parser is None else ToolCalls(parser, self.tokenizer.tokenizer)
        self.lock = threading.Condition()
        """Guards the sessions and the pending requests; the batching loop waits on it."""
        self.sessions: dict[str, Session] = {}
        self.pending: list[_Pending] = []
        self.sampling = SamplingSettings()
        self.warned: set[str] = set()
        self.server = AgentServer(self)

    def run(
        self,
        engine: RolloutEngine,
        prompts: list[Prompt],
        samples_per_prompt: int,
        sampling: SamplingSettings,
    ) -> list[list[Completion]]:
        """`samples_per_prompt` episodes per prompt, result[i] holding prompt i's in order."""
        deadline = time.monotonic() + self.settings.limits.step_timeout_seconds
        with self.lock:
            self.sampling = sampling
            self.sessions = {secrets.token_hex(16): Session(p, deadline)
                             for p in prompts for _ in range(samples_per_prompt)}  # fmt: skip
            keys = list(self.sessions)
        for key in keys:
            threading.Thread(target=self._episode, args=(key,), daemon=True, name="agent").start()
        try:
            self._drive(engine)
        finally:
            with self.lock:
                sessions = [self.sessions[k] for k in keys]
                self.sessions = {}  # every key is refused from now on
                for pending in self.pending:
                    pending.ready.set()
                self.pending = []
        done = [s.completion(self.tokenizer) for s in sessions]
        return [done[i * samples_per_prompt : (i + 1) * samples_per_prompt] for i in range(len(prompts))]

    # The agents' side: each in its own thread, its requests through the endpoint (`serve`).

    def _episode(self, key: str) -> None:
        session = self.sessions[key]
        outcome, reward = "errors", 0.0
        try:
            result = self._call_agent(agent_row(session.prompt), key)
            if result is None:  # the row's verifier scores the model's last reply
                from icepop.rewards.verifiers import verify

                result = verify(session.prompt.task, session.reply, session.prompt.answer)
            if isinstance(result, bool) or not isinstance(result, int | float) or not math.isfinite(result):
                self._warn(
                    "result", f"agent {self.settings.agent} returned {result!r:.80}: a reward is a number"
                )
            else:
                outcome, reward = "done", float(result)
        except Exception as error:  # the agent's failure ends its episode, not the run
            if session.stats["refused"] and getattr(error, "status_code", None) == 400:
                outcome = "refused"  # it did not catch a refusal past its budget: counted there already
            self._warn(type(error).__name__, f"agent {self.settings.agent} raised {error!r:.300}")
        with self.lock:
            if session.outcome is None:  # not already ended by its deadline
                session.outcome, session.reward = outcome, reward
                if outcome == "errors":
                    session.stats[outcome] += 1
                self.lock.notify_all()

    def _call_agent(self, row: dict[str, Any], key: str) -> Any:
        import openai

        timeout = self.settings.limits.step_timeout_seconds
        base_url = self.server.base_url
        if inspect.iscoroutinefunction(self.agent):

            async def run() -> Any:
                async with openai.AsyncOpenAI(
                    base_url=base_url, api_key=key, max_retries=0, timeout=timeout
                ) as c:
                    return await self.agent(row, c)

            return asyncio.run(run())
        with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout) as client:
            return self.agent(row, client)

    def serve(self, key: str, request: Request) -> Served:
        """One model turn for the episode `key` (an endpoint thread): its context, then the engine."""
        with self.lock:
            session = self.sessions.get(key)
            if session is None or session.outcome is not None:
                why = "has ended" if session is not None else "is not one of this run's episodes"
                raise ApiError(401, f"the API key {why}", "authentication_error")
            if session.kind not in (None, request.kind):
                raise ApiError(400, f"this episode began with {session.kind} requests; keep to one kind")
            pending = self._admit(session, request)
            self.pending.append(pending)
            self.lock.notify_all()
        pending.ready.wait()
        output, message = pending.output, pending.message
        if output is None:
            raise ApiError(408, "the episode ended before its turn was generated", "timeout")
        text = output.text if message is None else message["content"]
        calls = None if message is None else message.get("tool_calls")
        return Served(text, output.finish_reason, len(pending.ids), len(output.token_ids), calls)

    def _admit(self, session: Session, request: Request) -> _Pending:
        """The request's turn with its room checked and the session advanced (under the lock)."""
        limits, sampling = self.settings.limits, self.sampling
        session.stats["requests"] += 1
        if session.stats["requests"] > limits.max_turns:
            session.stats["refused"] += 1
            raise ApiError(400, f"the episode's {limits.max_turns} turns are spent (rollout.max_turns)")
        prompt_ids, new = context(session, request, self.tokenizer)
        # After the prompt: the kept tokens and the new ones; a branch's are its prompt.
        used, start = (len(session.tokens) + len(new), len(prompt_ids)) if prompt_ids else (0, len(new))
        room = min(limits.max_episode_tokens - used, self.settings.context_length - start - used)
        if room < 1:
            session.stats["refused"] += 1
            raise ApiError(
                400,
                f"the episode's token budget is spent ({limits.max_episode_tokens} tokens after its prompt, "
                "rollout.max_episode_tokens, within the engine's context)",
            )
        self._clamp(session, request)
        commit(session, request, prompt_ids, new)
        session.kind = request.kind
        tokens = min(room, sampling.max_new_tokens, request.max_tokens or sampling.max_new_tokens)
        return _Pending(session, session.prompt_ids + session.tokens, tokens, time.monotonic())

    def _clamp(self, session: Session, request: Request) -> None:
        """Sampling settings other than the run's are not honoured (the trainer scores the run's): count
        and warn once."""
        s = self.sampling
        asked = {
            "temperature": (request.temperature, s.temperature),
            "top_p": (request.top_p, s.top_p),
            "max_tokens": (
                request.max_tokens and max(request.max_tokens, s.max_new_tokens),
                s.max_new_tokens,
            ),
        }
        for name, (value, run) in asked.items():  # fmt: skip
            if value is not None and value != run:
                session.stats["clamped"] += 1
                self._warn(name, f"an agent asked for {name}={value}; the run samples with {name}={run}")

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self.warned:
            self.warned.add(topic)
            print(f"icepop: {message} (said once per engine)", flush=True)

    # The engine's side: the actor's own thread batches the waiting requests.

    def _drive(self, engine: RolloutEngine) -> None:
        """Until every episode has ended: wait for a batch, generate it, hand each turn back."""
        batches = 0
        while True:
            with self.lock:
                batch = self._next_batch()
                if batch is None:
                    return
            self._generate(engine, batch, batches)
            batches += 1

    def _next_batch(self) -> list[_Pending] | None:
        """The next requests to generate, once due; None when every episode has ended (under the lock)."""
        while True:
            now = time.monotonic()
            for session in self.sessions.values():
                if session.outcome is None and now > session.deadline:
                    session.outcome, session.reward = "timeouts", 0.0
                    session.stats["timeouts"] += 1
            for gone in [p for p in self.pending if p.session.outcome is not None]:
                self.pending.remove(gone)
                gone.ready.set()
            running = sum(s.outcome is None for s in self.sessions.values())
            if running == 0:
                return None
            limit = self.max_batch or len(self.pending)
            due = self.pending and now - self.pending[0].since >= BATCH_WINDOW_SECONDS
            if self.pending and (due or len(self.pending) >= min(limit, running)):
                batch, self.pending = self.pending[:limit], self.pending[limit:]
                return batch
            # Woken by a request or an agent's end; else until the window closes, or to check deadlines.
            self.lock.wait(BATCH_WINDOW_SECONDS - (now - self.pending[0].since) if self.pending else 0.5)

    def _message(self, output: Completion, tools: list[Any] | None) -> Message:
        """A chat turn's assistant message: its text, with the tool calls rollout.agent_tool_parser reads."""
        if self.tool_calls is None:
            return {"role": "assistant", "content": output.text}
        return self.tool_calls.message(output.token_ids, output.text, tools)

    def _generate(self, engine: RolloutEngine, batch: list[_Pending], index: int) -> None:
        """The batch's turns, one engine call per token budget (usually one), each turn recorded. An
        engine that fails wakes every waiting agent (its request fails) before the error goes up."""
        try:
            for group, tokens in enumerate(sorted({p.max_tokens for p in batch})):
                share = [p for p in batch if p.max_tokens == tokens]
                seed = self.sampling.seed
                seed = None if seed is None else seed + 7919 * index + 104_729 * group
                settings = replace(self.sampling, max_new_tokens=tokens, seed=seed)
                outputs = engine.generate([p.ids for p in share], 1, settings)
                with self.lock:
                    for pending, (output,) in zip(share, outputs, strict=True):
                        session = pending.session
                        if session.outcome is None:
                            message = self._message(output, session.tools) if session.kind == CHAT else None
                            add_turn(session, output, message)
                            pending.output, pending.message = output, message
                        pending.ready.set()
        finally:
            with self.lock:
                for pending in batch:
                    pending.ready.set()


def episode_runner(settings: EpisodeSettings) -> EpisodeRunner | AgentRunner:
    """What runs the episodes `settings` describe: an agent's runner (rollout.agent), or an
    environment's."""
    return AgentRunner(settings) if settings.agent is not None else EpisodeRunner(settings)
