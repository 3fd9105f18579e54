"""The agent endpoint without an engine: what a request may ask (icepop.rollout.agent_server), how an
episode's tokens are kept across requests (icepop.rollout.agents: extended token for token, or a new
branch), the README's calculator agent, and rollout.agent's checks before anything starts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_config import compose_config

from icepop.data.prompts import chat_ids
from icepop.envs.python_tool import SYSTEM as PYTHON_TOOL_SYSTEM
from icepop.errors import InputError
from icepop.examples import calculator_agent
from icepop.preflight import check_inputs
from icepop.rollout.agent_server import (
    CHAT,
    COMPLETION,
    ApiError,
    Request,
    Served,
    answer,
    parse_request,
    response,
)
from icepop.rollout.agent_sessions import Session, add_turn, commit, context
from icepop.rollout.episodes import observation_ids
from icepop.types import Completion, Prompt

README = Path(__file__).resolve().parents[1] / "README.md"
QUESTION = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 12 * 34?"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": QUESTION, **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"stream": True}, "stream=true is not supported"),
        ({"n": 2}, "one sample per request"),
        ({"stop": ["\n"]}, "stop sequences are not supported"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"content": "x"}]}, "messages[0] must be an object with a string 'role'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ],
)
def test_a_request_the_run_cannot_honour_is_refused_with_why(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ApiError, match=re.escape(says)) as error:
        parse_request(CHAT, body(**fields))
    assert error.value.status == 400


def test_requests_parse_to_what_the_endpoint_serves() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    request = parse_request(CHAT, body(messages=parts, max_completion_tokens=7, temperature=0.5))
    assert request.messages == [{"role": "user", "content": "ab"}]
    assert (request.max_tokens, request.temperature, request.top_p) == (7, 0.5, None)
    tool_turn = [{"role": "assistant", "content": None, "tool_calls": []}]
    assert parse_request(CHAT, body(messages=tool_turn)).messages == [{"role": "assistant", "content": ""}]
    assert parse_request(COMPLETION, json.dumps({"prompt": [[1, 2, 3]]}).encode()).prompt == [1, 2, 3]
    assert parse_request(COMPLETION, json.dumps({"prompt": "Hi"}).encode()).prompt == "Hi"
    with pytest.raises(ApiError, match="prompt must be one non-empty string"):
        parse_request(COMPLETION, json.dumps({"prompt": ["a", "b"]}).encode())


class Refuses:
    """A handler that is never reached: `answer` routes and parses first."""

    def serve(self, key: str, request: Request) -> Served:
        raise ApiError(401, f"key {key!r} refused", "authentication_error")


def test_answer_gives_openai_style_errors() -> None:
    status, payload = answer(Refuses(), "/v1/embeddings", "k", b"{}")
    assert status == 404
    assert "this endpoint serves /v1/chat/completions, /v1/completions" in payload["error"]["message"]
    status, payload = answer(Refuses(), "/v1/chat/completions", "k", body())
    assert status == 401
    assert payload["error"] == {"message": "key 'k' refused", "type": "authentication_error", "code": 401}


CALL = {"type": "function", "function": {"name": "calculate", "arguments": '{"expression": "47 * 38"}'}}


def test_a_reply_with_tool_calls_is_served_and_its_echo_extends_the_episode(tokenizer: Any) -> None:
    """A reply with tool calls (as rollout.agent_tool_parser reads them) is served the OpenAI way, and the
    history an agent sends back — the message with its call ids, then the tool's answer — is the one
    the endpoint served: the episode goes on, only the tool message rendered."""
    served = Served("", "stop", 30, 12, [CALL])
    payload = response(Request(CHAT), served)
    (choice,) = payload["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"] == CALL["function"]
    session = Session(Prompt([1]), deadline=0.0)
    first = chat(QUESTION)
    commit(session, first, *context(session, first, tokenizer))
    add_turn(
        session,
        reply([5, tokenizer.eos_token_id], "x"),
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
    )
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "1786"}
    echo = parse_request(CHAT, body(messages=[*QUESTION, {**choice["message"], "refusal": None}, tool]))
    assert echo.messages is not None and echo.messages[-2] == session.messages[-1]
    prompt_ids, new = context(session, echo, tokenizer)
    assert prompt_ids == session.prompt_ids and new == observation_ids(
        tokenizer, [{"role": "tool", "content": "1786"}]
    )
    other = {**CALL, "function": {"name": "calculate", "arguments": '{"expression": "1"}'}}
    edited = parse_request(
        CHAT, body(messages=[*QUESTION, {**choice["message"], "tool_calls": [other]}, tool])
    )
    assert context(session, edited, tokenizer)[0] == []  # another call than the model's: a branch


def chat(messages: list[dict[str, str]], tools: list[Any] | None = None) -> Request:
    return Request(CHAT, messages=messages, tools=tools)


def reply(ids: list[int], text: str, finish_reason: str = "stop") -> Completion:
    return Completion(ids, [-0.5] * len(ids), finish_reason, text)


def test_an_episode_keeps_the_sampled_tokens_and_renders_only_new_messages(tokenizer: Any) -> None:
    """The model's reply is kept as the ids sampled, even where its text would encode to other tokens;
    a tool message is rendered after the end-of-turn token; a rewritten history is a branch."""
    session = Session(Prompt([1]), deadline=0.0)
    first = chat(QUESTION)
    prompt_ids, new = context(session, first, tokenizer)
    assert prompt_ids == [] and new == chat_ids(tokenizer, QUESTION, add_generation_prompt=True)
    commit(session, first, prompt_ids, new)
    assert session.prompt_ids == new and session.tokens == [] and session.stats["branches"] == 0
    text = "answer"
    split = [tokenizer.convert_tokens_to_ids(c) for c in text]  # one token a character: not how it encodes
    assert tokenizer.decode(split) == text and tokenizer.encode(text, add_special_tokens=False) != split
    add_turn(session, reply([*split, tokenizer.eos_token_id], text), {"role": "assistant", "content": text})
    tool = {"role": "tool", "content": "408"}
    second = chat([*QUESTION, {"role": "assistant", "content": text}, tool])
    prompt_ids, new = context(session, second, tokenizer)
    assert prompt_ids == session.prompt_ids and new == observation_ids(tokenizer, [tool])
    commit(session, second, prompt_ids, new)
    assert session.tokens == [*split, tokenizer.eos_token_id, *new]
    assert session.model_mask == [True] * 7 + [False] * len(new) and session.logprobs[7:] == [0.0] * len(new)
    add_turn(session, reply([tokenizer.eos_token_id], ""), {"role": "assistant", "content": ""})
    assert session.stats["turns"] == 2 and session.stats["observation_tokens"] == len(new)
    edited = chat([*QUESTION, {"role": "assistant", "content": "407"}, tool])  # the agent edited the reply
    prompt_ids, new = context(session, edited, tokenizer)
    assert prompt_ids == [] and new == chat_ids(tokenizer, edited.messages, add_generation_prompt=True)
    commit(session, edited, prompt_ids, new)
    assert session.stats["branches"] == 1 and session.stats["turns"] == 0 and session.tokens == []


def test_a_reply_cut_at_its_limit_or_other_tools_start_a_branch(tokenizer: Any) -> None:
    session = Session(Prompt([1]), deadline=0.0)
    commit(session, chat(QUESTION), *context(session, chat(QUESTION), tokenizer))
    add_turn(session, reply([5, 6], "ab", finish_reason="length"), {"role": "assistant", "content": "ab"})
    follow = [*QUESTION, {"role": "assistant", "content": "ab"}, {"role": "user", "content": "go on"}]
    assert context(session, chat(follow), tokenizer)[0] == []  # no end-of-turn token to render after
    session.finish_reason = "stop"
    assert context(session, chat(follow), tokenizer)[0] == session.prompt_ids
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    assert context(session, chat(follow, tools), tokenizer)[0] == []


def test_completions_extend_by_token_ids_or_by_text(tokenizer: Any) -> None:
    session = Session(Prompt([1]), deadline=0.0)
    first = Request(COMPLETION, prompt="Q: 2+2?")
    commit(session, first, *context(session, first, tokenizer))
    assert session.prompt_ids == tokenizer.encode("Q: 2+2?", add_special_tokens=False)
    add_turn(session, reply([7, 8], " A"), None)
    more = tokenizer.encode(" ok", add_special_tokens=False)
    by_ids = Request(COMPLETION, prompt=[*session.prompt_ids, 7, 8, *more])
    assert context(session, by_ids, tokenizer) == (session.prompt_ids, more)
    by_text = Request(COMPLETION, prompt="Q: 2+2? A ok")
    assert context(session, by_text, tokenizer) == (session.prompt_ids, more)
    other = Request(COMPLETION, prompt="Q: 3+3?")
    assert context(session, other, tokenizer)[0] == []


def test_the_readme_shows_the_calculator_agent_as_it_is() -> None:
    """README's agent is the file a run imports, and it talks the Python tool's exchange, which the tiny
    models' warm-up teaches (its system prompt is the tool's)."""
    source = Path(calculator_agent.__file__).read_text()
    agent = source[source.index("import ast") : source.index("\n\n# For icepop's tiny models")]
    assert f"```python\n{agent}\n```" in README.read_text()
    assert calculator_agent.SYSTEM == PYTHON_TOOL_SYSTEM
    assert calculator_agent.calculate("print(47 * 38)") == "1786"
    assert calculator_agent.calculate("print(7 / 2)") == "3.5"
    assert calculator_agent.calculate("import os").startswith("error:")
    assert calculator_agent.calculate("print(__import__('os'))") == "error: only + - * / on numbers"


def test_rollout_agent_is_checked_before_anything_starts() -> None:
    base = ("+recipe=agent",)
    assert compose_config(*base).rollout.agent == "icepop.examples.calculator_agent:agent"
    with pytest.raises(InputError, match=re.escape("rollout.agent='nope.agents:solve': agent")):
        check_inputs(compose_config(*base, "rollout.agent=nope.agents:solve"))
    with pytest.raises(InputError, match=re.escape("it is called as agent(row, client)")):
        check_inputs(compose_config(*base, "rollout.agent=icepop.examples.calculator_agent:calculate"))
    with pytest.raises(ValueError, match="both make the episodes; set one of them"):
        compose_config(*base, "rollout.environment=python_tool")
