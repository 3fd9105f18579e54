"""The OpenAI-compatible endpoint an agent's episodes talk to (icepop.rollout.agents): HTTP/1.1 on
127.0.0.1 only, a thread per connection, JSON in and out, enough of the API for the official `openai`
client: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

This module knows the wire format and nothing of engines or tokens: it parses a request into a
`Request` (refusing what the run cannot honour with a 400 that says why), hands it with the caller's
API key (the episode's key) to a `Handler`, and writes what comes back. Streaming, n > 1 and stop
sequences are refused: a model turn ends at its end-of-turn token or its token budget, as the trainer
scores it. Messages are kept as {"role", "content"} (text parts joined), with an assistant message's
`tool_calls` as [{"type": "function", "function": {"name", "arguments"}}] (ids dropped): the form in
which a history is compared with the one the endpoint served, and rendered.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

Message = dict[str, Any]

CHAT, COMPLETION = "chat", "completion"
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
MODEL_NAME = "icepop-policy"
"""The one model the endpoint serves, whatever name a request asks for."""


class ApiError(Exception):
    """A request the endpoint answers with an OpenAI-style error (`status`, message, type)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Request:
    """One request, parsed: a chat (messages, tools) or a completion (prompt: text or token ids)."""

    kind: str
    messages: list[Message] | None = None
    tools: list[Any] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


@dataclass
class Served:
    """A model turn as the endpoint answers it."""

    text: str
    """The reply's text (a chat reply's content: the text before its tool calls, where it has some)."""
    finish_reason: str
    prompt_tokens: int
    tokens: int
    tool_calls: list[dict[str, Any]] | None = None
    """A chat reply's tool calls, read by rollout.agent_tool_parser (finish_reason "tool_calls")."""


class Handler(Protocol):
    """What serves a parsed request for the episode whose key the caller sent; raises ApiError."""

    def serve(self, key: str, request: Request) -> Served: ...


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ApiError(400, f"messages[{index}].tool_calls must be a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"messages[{index}].tool_calls: each needs a function with a name")
        arguments = function.get("arguments", "{}")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _content(message: Any, index: int) -> Message:
    """A message as {"role", "content"} (text parts joined, a None content empty), with its tool calls."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"messages[{index}] must be an object with a string 'role'")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if any(not isinstance(p, str) for p in parts):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported")
        content = "".join(parts)  # type: ignore[arg-type]
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string, a list of text parts or null")
    if message.get("tool_calls"):
        return {
            "role": message["role"],
            "content": content,
            "tool_calls": _tool_calls(message["tool_calls"], index),
        }
    return {"role": message["role"], "content": content}


def _number(body: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(400, f"{name} must be a number, got {value!r:.50}")
            return value
    return None


def parse_request(kind: str, body: bytes) -> Request:
    """The request's fields the endpoint honours, checked; an ApiError(400) names the field otherwise."""
    try:
        data = json.loads(body or b"{}")
    except ValueError as error:
        raise ApiError(400, f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    if data.get("stream"):
        raise ApiError(400, "stream=true is not supported: ask without streaming")
    if data.get("n") not in (None, 1):
        raise ApiError(400, f"n={data.get('n')!r}: one sample per request (n=1); an episode is one sample")
    if data.get("stop"):
        raise ApiError(400, "stop sequences are not supported: a turn ends at the model's end-of-turn token")
    max_tokens = _number(data, "max_completion_tokens", "max_tokens")
    if max_tokens is not None and (max_tokens < 1 or max_tokens != int(max_tokens)):
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
    request = Request(kind, max_tokens=None if max_tokens is None else int(max_tokens),
                      temperature=_number(data, "temperature"), top_p=_number(data, "top_p"))  # fmt: skip
    if kind == CHAT:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of chat messages")
        request.messages = [_content(m, i) for i, m in enumerate(messages)]
        tools = data.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "tools must be a list of tool definitions")
        request.tools = tools or None
        return request
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    token_ids = isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not token_ids:
        raise ApiError(400, "prompt must be one non-empty string or one list of token ids")
    request.prompt = prompt
    return request


def response(request: Request, served: Served) -> dict:
    """The OpenAI response object of one served turn."""
    text, finish_reason, prompt = served.text, served.finish_reason, served.prompt_tokens
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": served.tokens,
        "total_tokens": prompt + served.tokens,
    }
    common = {"created": int(time.time()), "model": MODEL_NAME, "usage": usage}
    if request.kind == CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if served.tool_calls:
            message["content"] = text or None
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in served.tool_calls]
            finish_reason = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "choices": [choice],
            **common,
        }
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "choices": [choice], **common}


def answer(handler: Handler, path: str, key: str, body: bytes) -> tuple[int, dict]:
    """(status, JSON payload) for one POST."""
    kind = ROUTES.get(path.rstrip("/"))
    try:
        if kind is None:
            raise ApiError(404, f"no route {path}; this endpoint serves {', '.join(ROUTES)}", "not_found")
        request = parse_request(kind, body)
        served = handler.serve(key, request)
    except ApiError as error:
        return error.status, {"error": {"message": str(error), "type": error.kind, "code": error.status}}
    return 200, response(request, served)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an agent's client reuses its connection
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        self._send(*answer(self.server.handler, self.path, key, body))

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": 404}})
            return
        model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "icepop"}
        self._send(200, {"object": "list", "data": [model]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per request would drown the actor's log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: every episode's agent may connect at once (default 5)
    handler: Handler


class AgentServer:
    """The endpoint, serving `handler` on 127.0.0.1 at a free port from a daemon thread until `close`."""

    def __init__(self, handler: Handler) -> None:
        self._server = _Server(("127.0.0.1", 0), _RequestHandler)
        self._server.handler = handler
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="agent-endpoint")
        self._thread.start()

    @property
    def base_url(self) -> str:
        """What an OpenAI client's base_url is set to."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
