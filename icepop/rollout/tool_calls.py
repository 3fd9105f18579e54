"""Tool calls in an agent's chat replies (rollout.agent_tool_parser): vLLM's own parser of the model's
format reads them out of the reply's text, so that an agent written for OpenAI's function calling gets
`message.tool_calls` (icepop.rollout.agents). The tokens stay as sampled: parsing changes what the
endpoint answers, never what the trainer scores. Only the engine's process imports vLLM here.
"""

from __future__ import annotations

import json
from typing import Any

from icepop.rollout.agent_server import Message


def tool_parser_names() -> list[str]:
    """The names rollout.agent_tool_parser takes: vLLM's registered tool parsers ("hermes", ...)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.list_registered()


class ToolCalls:
    """vLLM's tool parser `name`, over the run's tokenizer."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        self.parser = ToolParserManager.get_tool_parser(name)
        self.tokenizer = tokenizer

    def message(self, token_ids: list[int], text: str, tools: list[Any] | None) -> Message:
        """The assistant message of a reply: its text, or where the request offered tools and the parser
        finds calls in the reply (decoded with its special tokens: some models' call tags are special),
        the text before them and the calls."""
        if not tools:
            return {"role": "assistant", "content": text}
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        ids = token_ids[:-1] if token_ids and token_ids[-1] == self.tokenizer.eos_token_id else token_ids
        raw = self.tokenizer.decode(ids, skip_special_tokens=False)
        request = ChatCompletionRequest(model="policy", messages=[], tools=tools)
        found = self.parser(self.tokenizer, request.tools).extract_tool_calls(raw, request)
        if not found.tools_called:
            return {"role": "assistant", "content": text}
        calls = [_call(c.function.name, c.function.arguments) for c in found.tool_calls]
        return {"role": "assistant", "content": found.content or "", "tool_calls": calls}


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(messages: list[Message]) -> list[Message]:
    """`messages` as chat templates take them: a tool call's arguments as an object, not JSON text."""

    def objects(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [_call(c["function"]["name"], _parsed(c["function"]["arguments"])) for c in calls]

    return [{**m, "tool_calls": objects(m["tool_calls"])} if "tool_calls" in m else m for m in messages]
