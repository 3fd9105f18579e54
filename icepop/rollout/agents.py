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
or token-id prompts.

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

from icepop.data.prompts import chat_ids
from icepop.rollout.agent_server import CHAT, AgentServer, ApiError, Message, Request
from icepop.rollout.base import RolloutEngine
from icepop.rollout.episodes import EpisodeRunner, EpisodeSettings, observation_ids
from icepop.types import Completion, Prompt, SamplingSettings

BATCH_WINDOW_SECONDS = 0.05
"""How long a batch waits for more requests once its first has come (unless every agent has asked)."""
STATS = ("turns", "requests", "branches", "observation_tokens", "errors", "timeouts", "refused", "clamped")


def agent_row(prompt: Prompt) -> dict[str, Any]:
    """What an agent receives for its episode: the data row's fields (`messages`: the row's chat,
    `answer`, `task`, and the rest of the row as it was loaded)."""
    return {**prompt.meta, "messages": list(prompt.meta.get("messages") or []), "answer": prompt.answer,
            "task": prompt.task}  # fmt: skip


@dataclass
class Session:
    """One episode's tokens, as the engine sampled them, and the conversation they render."""

    prompt: Prompt
    deadline: float
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_mask: list[bool] = field(default_factory=list)
    kind: str | None = None
    """"chat" or "completion", set by the first request; the other kind is then refused."""
    messages: list[Message] = field(default_factory=list)
    """chat: the conversation the tokens render, the model's replies as the endpoint gave them."""
    tools: list[Any] | None = None
    text: str = ""
    """completion: the prompt's text and the model's, as sent and served."""
    finish_reason: str = "stop"
    reply: str = ""
    """The model's last turn's text (what the verifier scores when the agent returns None)."""
    reward: float = 0.0
    outcome: str | None = None
    """None while the agent runs; then "done", "errors", "timeouts" or "refused" (it raised on a request
    refused past rollout.max_turns or the token budget: reward 0, counted as refused, not as an error)."""
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS, 0.0))

    def completion(self, tokenizer: Any) -> Completion:
        if not self.tokens:  # the agent asked nothing: a row with no model token, reward 0 or its own
            ids = self.prompt_ids or self.prompt.prompt_ids
            return Completion(
                [tokenizer.eos_token_id], [0.0], "stop", "", [False], ids, self.reward, self.stats
            )
        return Completion(self.tokens, self.logprobs, self.finish_reason, tokenizer.decode(self.tokens),
                          self.model_mask, self.prompt_ids, self.reward, self.stats)  # fmt: skip


def context(session: Session, request: Request, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, new context ids) of the turn `request` asks for: the session's ids kept as they
    are with the new messages' (or text's) tokens after them, or, where the request rewrites the
    history, a new branch: ([], the whole request rendered). Changes nothing."""
    ended = bool(session.tokens) and session.finish_reason == "stop"  # the model's turn is closed
    if request.kind == CHAT:
        assert request.messages is not None
        known = len(session.messages)
        extends = ended and known > 0 and request.tools == session.tools
        new = request.messages[known:]
        if extends and request.messages[:known] == session.messages and new:
            if all(m["role"] != "assistant" for m in new):
                return session.prompt_ids, observation_ids(tokenizer, new)
        kwargs = {"tools": request.tools} if request.tools else {}
        return [], _rendered(tokenizer, request.messages, kwargs)
    prompt = request.prompt
    whole = session.prompt_ids + session.tokens
    if isinstance(prompt, list):
        if whole and prompt[: len(whole)] == whole:
            return session.prompt_ids, prompt[len(whole) :]
        return [], list(prompt)
    assert isinstance(prompt, str)
    if whole and session.text and prompt.startswith(session.text):
        return session.prompt_ids, tokenizer.encode(prompt[len(session.text) :], add_special_tokens=False)
    return [], tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.eos_token_id]


def _rendered(tokenizer: Any, messages: list[Message], kwargs: dict[str, Any]) -> list[int]:
    if kwargs:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs)
        return [int(i) for i in ids]
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def commit(session: Session, request: Request, prompt_ids: list[int], new: list[int]) -> None:
    """Record `context`'s answer in the session: the new ids as context (no ℓ_inf, not the model's),
    or a new branch."""
    if not prompt_ids:  # a branch (or the first request): the request's rendering is the prompt
        session.stats["branches"] += bool(session.prompt_ids)
        session.prompt_ids, session.tokens, session.logprobs, session.model_mask = new, [], [], []
        session.stats["turns"] = 0.0
        session.messages, session.text = [], ""
        new = []
    session.tokens += new
    session.logprobs += [0.0] * len(new)
    session.model_mask += [False] * len(new)
    session.stats["observation_tokens"] += len(new)
    if request.kind == CHAT:
        assert request.messages is not None
        session.messages, session.tools = list(request.messages), request.tools
    else:
        session.text = request.prompt if isinstance(request.prompt, str) else ""


def add_turn(session: Session, output: Completion, kind: str) -> None:
    """The model's turn, as the engine sampled it, ℓ_inf with every token."""
    session.tokens += output.token_ids
    session.logprobs += output.logprobs
    session.model_mask += [True] * len(output.token_ids)
    session.finish_reason, session.reply = output.finish_reason, output.text
    session.stats["turns"] += 1
    if kind == CHAT:
        session.messages.append({"role": "assistant", "content": output.text})
    elif session.text:
        session.text += output.text


@dataclass
class _Pending:
    session: Session
    ids: list[int]
    max_tokens: int
    since: float
    ready: threading.Event = field(default_factory=threading.Event)
    output: Completion | None = None


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

    def serve(self, key: str, request: Request) -> tuple[str, str, int, int]:
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
        if pending.output is None:
            raise ApiError(408, "the episode ended before its turn was generated", "timeout")
        return (
            pending.output.text,
            pending.output.finish_reason,
            len(pending.ids),
            len(pending.output.token_ids),
        )

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
                        if pending.session.outcome is None:
                            add_turn(pending.session, output, pending.session.kind or CHAT)
                            pending.output = output
                        pending.ready.set()
        finally:
            with self.lock:
                for pending in batch:
                    pending.ready.set()


def episode_runner(settings: EpisodeSettings) -> EpisodeRunner | AgentRunner:
    """What runs the episodes `settings` describe: an agent's runner (rollout.agent), or an
    environment's."""
    return AgentRunner(settings) if settings.agent is not None else EpisodeRunner(settings)
