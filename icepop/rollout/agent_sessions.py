"""An agent episode's tokens (icepop.rollout.agents): the session the endpoint keeps per episode, and
how each request advances it — the sampled ids kept and only new messages rendered, or a new branch.
Pure bookkeeping over a tokenizer: no engine, no threads (tests/test_agent_endpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from icepop.data.prompts import chat_ids
from icepop.rollout.agent_server import CHAT, Message, Request
from icepop.rollout.episodes import observation_ids
from icepop.rollout.tool_calls import template_messages
from icepop.types import Completion, Prompt

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
        return [], _rendered(tokenizer, request.messages, request.tools)
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


def _rendered(tokenizer: Any, messages: list[Message], tools: list[Any] | None) -> list[int]:
    """A branch's prompt: the conversation and its tools through the chat template, the assistant turn
    opened."""
    messages = template_messages(messages)
    if tools:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False, tools=tools
        )
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


def add_turn(session: Session, output: Completion, message: Message | None) -> None:
    """The model's turn, as the engine sampled it, ℓ_inf with every token; `message`: a chat turn's
    message as the endpoint serves it (None: a completion)."""
    session.tokens += output.token_ids
    session.logprobs += output.logprobs
    session.model_mask += [True] * len(output.token_ids)
    session.finish_reason, session.reply = output.finish_reason, output.text
    session.stats["turns"] += 1
    if message is not None:
        session.messages.append(message)
    elif session.text:
        session.text += output.text
