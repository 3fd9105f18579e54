"""Unmodified agents on a real vLLM engine through the OpenAI-compatible endpoint (icepop.rollout.agents):
agents written against the official `openai` client, token-exact against transformers over whole
multi-turn trajectories, history rewritten into branches, the completions route on token ids, an async
agent, and the faults and limits. The model is the tiny dense one after SFT on the Python tool's
exchanges (tests/conftest.py `tool_model`), whose turns end on <|im_end|> and go on after a tool message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from backend_args import engine_args
from conftest import TOOL_TASK
from test_config import compose_config
from test_episodes import max_difference
from transformers import AutoTokenizer

from icepop.data.prompts import chat_ids, load_prompts
from icepop.errors import InputError
from icepop.examples.calculator_agent import CODE, SYSTEM, calculate
from icepop.preflight import check_inputs
from icepop.rollout.agents import AgentRunner
from icepop.rollout.episodes import EpisodeLimits, EpisodeSettings
from icepop.rollout.tool_calls import ToolCalls, tool_parser_names
from icepop.rollout.vllm import VllmEngine
from icepop.types import Completion, Prompt, SamplingSettings

pytestmark = pytest.mark.slow  # a vLLM engine

CONTEXT = 352
SAMPLING = SamplingSettings(temperature=1.0, max_new_tokens=32, seed=3)


def question(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, *[m for m in row["messages"] if m["role"] != "system"]]


def tool_every_turn(row: dict[str, Any], client: openai.OpenAI) -> float:
    """Answers every model turn with a tool message (the calculator's output, or "(no code)"), so that an
    episode goes on whatever the model writes; reward: the number of turns (test_agents:tool_every_turn)."""
    messages, turns = question(row), 0
    for _ in range(3):
        try:
            reply = client.chat.completions.create(model="m", messages=messages).choices[0]
        except openai.BadRequestError:  # the episode's token budget is spent
            break
        turns += 1
        if reply.finish_reason == "length":
            break
        code = CODE.search(reply.message.content or "")
        output = calculate(code.group(1)) if code else "(no code)"
        messages += [
            {"role": "assistant", "content": reply.message.content},
            {"role": "tool", "content": output},
        ]
    return float(turns)


def rewrites_history(row: dict[str, Any], client: openai.OpenAI) -> None:
    """Asks, then asks again with the model's reply dropped and a new user message: a new branch; the
    row's verifier scores the last reply (returns None)."""
    messages = question(row)
    client.chat.completions.create(model="m", messages=messages)
    again = [*messages, {"role": "user", "content": "Answer with the number only."}]
    client.chat.completions.create(model="m", messages=again)


async def completes_token_ids(row: dict[str, Any], client: openai.AsyncOpenAI) -> float:
    """An async agent on /v1/completions with token-id prompts: the second prompt extends the first
    with the reply's token ids and a few more (test_agents:completes_token_ids)."""
    first = await client.completions.create(model="m", prompt=row["prompt_ids"], max_tokens=8)
    text = first.choices[0].text
    ids = AutoTokenizer.from_pretrained(row["model"]).encode(text, add_special_tokens=False)
    prompt = [*row["prompt_ids"], *ids, 11, 12]
    second = await client.completions.create(model="m", prompt=prompt, max_tokens=8)
    return float(len(second.choices[0].text) >= 0)


EXPRESSION = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
TOOLS = [{"type": "function", "function": {"name": "calculate", "description": "+ - * / of numbers",
                                           "parameters": EXPRESSION}}]  # fmt: skip


def offers_tools(row: dict[str, Any], client: openai.OpenAI) -> float:
    """Offers OpenAI function tools (the run reads calls with vLLM's hermes parser): the tiny model
    writes no <tool_call>, so its replies are text. 1.0 when both replies came back well formed, 0.5
    when the first was cut at its token limit (the second request is then a new branch), else 0."""
    messages, cut = question(row), False
    for turn in range(2):
        choice = client.chat.completions.create(model="m", messages=messages, tools=TOOLS).choices[0]
        if choice.message.tool_calls is not None or not isinstance(choice.message.content, str):
            return 0.0
        cut = cut or (turn == 0 and choice.finish_reason == "length")
        messages += [choice.message.model_dump(exclude_none=True), {"role": "user", "content": "Go on."}]
    return 0.5 if cut else 1.0


def raises(row: dict[str, Any], client: openai.OpenAI) -> float:
    client.chat.completions.create(model="m", messages=question(row))
    raise RuntimeError("a bug in the agent")


def hangs(row: dict[str, Any], client: openai.OpenAI) -> float:
    time.sleep(600)
    raise AssertionError("unreachable")


def not_a_number(row: dict[str, Any], client: openai.OpenAI) -> str:
    return "1.0"


def asks_too_often(row: dict[str, Any], client: openai.OpenAI) -> float:
    """Asks a fourth time (rollout.max_turns = 3) and does not catch the refusal."""
    for _ in range(4):
        client.chat.completions.create(model="m", messages=question(row))
    return 1.0


def probes_the_limits(row: dict[str, Any], client: openai.OpenAI) -> float:
    """What the endpoint refuses: a key that is not an episode's, streaming, n=2, and a turn past
    rollout.max_turns; a temperature other than the run's is served at the run's. 1.0 when all held."""
    outsider = openai.OpenAI(base_url=str(client.base_url), api_key="not-an-episode", max_retries=0)
    refused = []
    for ask in (
        lambda: outsider.chat.completions.create(model="m", messages=question(row)),
        lambda: client.chat.completions.create(model="m", messages=question(row), stream=True),
        lambda: client.chat.completions.create(model="m", messages=question(row), n=2),
    ):
        try:
            ask()
        except (openai.AuthenticationError, openai.BadRequestError) as error:
            refused.append(type(error).__name__)
    for _ in range(3):  # rollout.max_turns = 3, each a new branch: the same question again
        client.chat.completions.create(model="m", messages=question(row), temperature=0.5, max_tokens=4)
    try:
        client.chat.completions.create(model="m", messages=question(row))
    except openai.BadRequestError as error:
        refused.append("turns" if "turns are spent" in str(error) else str(error))
    return float(refused == ["AuthenticationError", "BadRequestError", "BadRequestError", "turns"])


@pytest.fixture(scope="module")
def engine(tool_model: Path) -> Iterator[VllmEngine]:
    engine = VllmEngine(**engine_args(tool_model, max_model_len=CONTEXT, kv_cache_bytes=64 * 2**20))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(tool_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tool_model)


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[Prompt]:
    return load_prompts("arithmetic", tokenizer, 256, count=8, seed=5, **TOOL_TASK).prompts


def run(
    engine: VllmEngine,
    model: Path,
    agent: str,
    prompts: list[Prompt],
    n: int,
    timeout: float = 30.0,
    tool_parser: str | None = None,
) -> list[list[Completion]]:
    """`agent`'s episodes on `engine`: 3 turns, 256 tokens after the prompt, `timeout` s an episode."""
    limits = EpisodeLimits(3, 256, timeout)
    settings = EpisodeSettings(None, limits, str(model), None, (), CONTEXT, agent, tool_parser)
    return AgentRunner(settings).run(engine, prompts, n, SAMPLING)


def test_agent_trajectories_are_token_exact_and_match_the_trainer(
    engine: VllmEngine, tool_model: Path, tokenizer: Any, prompts: list[Prompt]
) -> None:
    """The exactness check over whole agent trajectories: the agent sends the conversation back as
    text each turn, the endpoint reuses the tokens it sampled, and transformers' fp32 log-probs of the
    model's tokens equal the engine's ℓ_inf, tool messages in between."""
    groups = run(engine, tool_model, "test_agents:tool_every_turn", prompts, 4)
    completions = [c for group in groups for c in group]
    multi = [c for c in completions if c.stats["turns"] >= 2]
    assert len(multi) >= 4, [c.stats for c in completions]
    for c in completions:
        assert c.reward == c.stats["turns"] == c.stats["requests"] and c.stats["branches"] == 0
        assert c.stats["errors"] == c.stats["timeouts"] == 0
        assert c.model_mask is not None and len(c.model_mask) == len(c.token_ids) == len(c.logprobs)
        assert c.stats["observation_tokens"] == c.model_mask.count(False)
        turns = sum(1 for a, b in zip([False, *c.model_mask], c.model_mask, strict=False) if b and not a)
        assert turns == c.stats["turns"]  # each request is one run of the model's tokens
    assert all("<|im_start|>tool\n" in c.text for c in multi)
    assert max_difference(tool_model, prompts, groups, tokenizer.pad_token_id) < 1e-4


def test_the_calculator_agent_of_the_readme_runs_and_scores_itself(
    engine: VllmEngine, tool_model: Path, prompts: list[Prompt]
) -> None:
    groups = run(engine, tool_model, "icepop.examples.calculator_agent:agent", prompts, 2)
    completions = [c for group in groups for c in group]
    assert all(c.reward in (0.0, 1.0) and c.stats["errors"] == 0 for c in completions)
    assert any(c.stats["turns"] >= 2 for c in completions)  # the warm-up's model calls the calculator


def test_a_rewritten_history_is_a_new_branch_never_retokenized(
    engine: VllmEngine, tool_model: Path, tokenizer: Any, prompts: list[Prompt]
) -> None:
    """The second request drops the model's reply: the episode trains on the branch it started, whose
    prompt is the rewritten conversation rendered afresh (context, not the model's), and says so."""
    groups = run(engine, tool_model, "test_agents:rewrites_history", prompts[:2], 2)
    for prompt, group in zip(prompts, groups, strict=False):
        row = {"messages": prompt.meta["messages"]}
        again = [*question(row), {"role": "user", "content": "Answer with the number only."}]
        for c in group:
            assert c.stats["branches"] == 1 and c.stats["turns"] == 1 and c.stats["requests"] == 2
            assert c.prompt_ids == chat_ids(tokenizer, again, add_generation_prompt=True)
            assert c.model_mask is not None and all(c.model_mask) and c.reward in (0.0, 1.0)
    assert max_difference(tool_model, prompts[:2], groups, tokenizer.pad_token_id) < 1e-4


def test_an_async_agent_on_token_ids_extends_its_episode(
    engine: VllmEngine, tool_model: Path, tokenizer: Any, prompts: list[Prompt]
) -> None:
    """/v1/completions with token-id prompts: the second prompt begins with the first and the reply's
    own tokens (as the agent re-encoded them: where that differs from the sampled ids, a branch)."""
    extra = {"model": str(tool_model)}
    rows = [
        Prompt(p.prompt_ids, p.answer, p.task, {**p.meta, **extra, "prompt_ids": p.prompt_ids})
        for p in prompts[:2]
    ]
    groups = run(engine, tool_model, "test_agents:completes_token_ids", rows, 2)
    for c in (c for group in groups for c in group):
        assert c.reward == 1.0 and c.stats["requests"] == 2
        assert c.model_mask is not None
        if c.stats["branches"] == 0:  # the re-encoded reply was the sampled ids: one trajectory
            assert c.stats["turns"] == 2 and c.stats["observation_tokens"] == 2
            assert [t for t, m in zip(c.token_ids, c.model_mask, strict=True) if not m] == [11, 12]
    assert any(c.stats["branches"] == 0 for group in groups for c in group)
    assert max_difference(tool_model, rows, groups, tokenizer.pad_token_id) < 1e-4
    assert asyncio.iscoroutinefunction(completes_token_ids)


def test_a_failing_agent_ends_its_episode_not_the_run(
    engine: VllmEngine, tool_model: Path, prompts: list[Prompt]
) -> None:
    cases = {"raises": "errors", "hangs": "timeouts", "not_a_number": "errors", "asks_too_often": "refused"}
    for agent, count in cases.items():
        started = time.monotonic()
        groups = run(engine, tool_model, f"test_agents:{agent}", prompts[:2], 2, timeout=2.0)
        assert time.monotonic() - started < 30
        for c in (c for group in groups for c in group):
            assert c.reward == 0.0 and c.stats[count] == 1, (agent, c.stats)
            assert sum(c.stats[k] for k in ("errors", "timeouts", "refused")) == 1, (agent, c.stats)
            assert c.model_mask is not None and len(c.token_ids) == len(c.model_mask) >= 1


def test_the_endpoint_refuses_what_the_run_cannot_honour(
    engine: VllmEngine, tool_model: Path, prompts: list[Prompt]
) -> None:
    (group,) = run(engine, tool_model, "test_agents:probes_the_limits", prompts[:1], 1)
    (c,) = group
    assert c.reward == 1.0, c.stats
    assert c.stats["refused"] == 1 and c.stats["branches"] == 2 and c.stats["clamped"] >= 3
    assert len(c.token_ids) <= 4  # max_tokens=4 honoured: below the run's 32


def test_vllms_tool_parser_reads_tool_calls_out_of_a_reply(tokenizer: Any) -> None:
    """rollout.agent_tool_parser=hermes: a reply holding <tool_call>{...}</tool_call> is served as OpenAI
    tool calls (arguments as JSON text), a reply without one, or a request without tools, as text."""
    calls = ToolCalls("hermes", tokenizer)
    text = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "47 * 38"}}\n</tool_call>'
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    function = {"name": "calculate", "arguments": '{"expression": "47 * 38"}'}
    expected = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": function}],
    }
    assert calls.message(ids, text, TOOLS) == expected
    assert calls.message(ids, text, None) == {"role": "assistant", "content": text}
    plain = tokenizer.encode("1786", add_special_tokens=False)
    assert calls.message(plain, "1786", TOOLS) == {"role": "assistant", "content": "1786"}
    assert "hermes" in tool_parser_names()


def test_an_agent_that_offers_tools_runs_with_the_parser(
    engine: VllmEngine, tool_model: Path, tokenizer: Any, prompts: list[Prompt]
) -> None:
    """Requests with `tools` go through the chat template and the parser on a real engine; the agent's
    echo of each reply (the openai client's own message, dumped) extends its episode."""
    groups = run(engine, tool_model, "test_agents:offers_tools", prompts[:2], 2, tool_parser="hermes")
    for c in (c for group in groups for c in group):
        assert c.reward in (0.5, 1.0) and c.stats["errors"] == 0, c.stats
        assert c.stats["requests"] == 2 and c.stats["branches"] == (c.reward == 0.5), c.stats
    assert max_difference(tool_model, prompts[:2], groups, tokenizer.pad_token_id) < 1e-4


def test_rollout_agent_tool_parser_is_checked_before_anything_starts() -> None:
    with pytest.raises(InputError, match=r"rollout.agent_tool_parser='nope' is not one of vLLM's .*hermes"):
        check_inputs(compose_config("+recipe=agent", "rollout.agent_tool_parser=nope"))
    check_inputs(compose_config("+recipe=agent", "rollout.agent_tool_parser=hermes"))
    with pytest.raises(ValueError, match=r"rollout.agent_tool_parser='hermes' reads tool calls"):
        compose_config("+recipe=rlvr", "rollout.agent_tool_parser=hermes")
