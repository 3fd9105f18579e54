"""Multi-turn RLVR with the Python tool through `python -m icepop.train +recipe=rlvr-tools`: Ray, a vLLM
engine whose actor runs the episodes (tool code in the sandbox), DeepSpeed ranks; and a user's own
environment by dotted path through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_helpers import SMALL, icepop_train

pytestmark = [pytest.mark.slow, pytest.mark.ray("apart")]  # whole runs through python -m icepop.train

TOOLS = [
    "+recipe=rlvr-tools", *SMALL, "rollout.max_new_tokens=32",  # the recipe's turn length again
    "sft.steps=60", "sft.batch_size=16", "sft.examples=400", "sft.eval_size=8", "sft.lr=3e-3",
    "train.steps=3", "run.dir=run",
]  # fmt: skip
"""A short tool warm-up (enough for code turns that end and go on after the tool message), 3 steps."""


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_multi_turn_tool_run_trains_on_the_models_tokens_exactly(tmp_path: Path) -> None:
    """The recipe with test_environments:ToolEveryTurn, the Python tool answering code-less turns too (its
    warm-up is the tool's own demonstrations): every episode whose first turn ends on <|im_end|> goes on
    after a tool message, so the checks of second turns hold whatever the tiny model samples."""
    result = icepop_train(tmp_path, *TOOLS, "rollout.environment=test_environments:ToolEveryTurn")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "rollout.environment         test_environments:ToolEveryTurn  (command line)" in result.stdout
    for r in rows:
        # Every episode, tool messages included, scored by the trainer at the rollout weights in float32
        # exactly as the engine sampled it: a re-tokenized turn would show here (tests/test_episodes.py).
        assert r["mismatch/abs_logp_diff_max"] < 1e-4
        assert r["episode/errors"] == 0 and r["episode/timeouts"] == 0
    assert max(r["episode/turns_mean"] for r in rows) > 1.1  # episodes go on after the tool's output
    # The warm-up wrote code in half its conversations (the tool's demonstrations; without them it never
    # does), so some of the 48 episodes call the tool.
    assert max(r["episode/tool_calls_mean"] for r in rows) > 0
    assert max(r["episode/observation_tokens_mean"] for r in rows) > 5
    assert max(r.get("mismatch/turn_2/tokens", 0) for r in rows) > 0  # the mismatch by turn
    # The model's tokens alone are the response: an episode's length excludes the tool's messages.
    assert all(r["response_length/mean"] <= 96 - r["episode/observation_tokens_mean"] + 1e-9 for r in rows)
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and all(0.0 <= e["eval/accuracy"] <= 1.0 for e in evals)


def test_a_users_environment_runs_from_its_dotted_path_and_stale(tmp_path: Path) -> None:
    """tests/test_environments.py's Counter, imported inside the engine's Ray actor (PYTHONPATH), its
    stale episodes (rollout.max_staleness=1) like single replies."""
    icepop_train(tmp_path, *TOOLS, "rollout.environment=test_environments:Counter", "model.sft_warmup=false",
                 "train.steps=2", "rollout.max_staleness=1")  # fmt: skip
    rows = metrics(tmp_path / "run")
    assert [r["staleness/versions_behind_mean"] for r in rows] == [0.0, 1.0]
    assert "staleness/engine_mismatch_abs_log_ratio_mean" in rows[1]  # rescored, observations included
    for row in rows:
        assert row["episode/turns_mean"] >= 1 and "episode/tool_calls_mean" not in row
        assert row["reward/mean"] == 0.0  # Counter rewards a third turn; the untrained model's are cut short


def test_an_agent_trains_through_the_endpoint_and_stale(tmp_path: Path) -> None:
    """`+recipe=agent`: the README's calculator agent, on the `openai` client inside the engine's Ray
    actor, against the endpoint there; its episodes scored by the trainer exactly as sampled, and
    generated a step ahead (rollout.max_staleness=1) like an environment's. (Multi-turn agent
    trajectories, branches and faults: tests/test_agents.py, on the engine in-process.)"""
    agent = ["+recipe=agent", *SMALL, "rollout.max_new_tokens=32", "model.sft_warmup=false", "train.steps=2"]
    result = icepop_train(tmp_path, *agent, "rollout.max_staleness=1", "run.dir=run")
    assert (
        "rollout.agent               icepop.examples.calculator_agent:agent  (recipe agent)" in result.stdout
    )
    rows = metrics(tmp_path / "run")
    assert [r["staleness/versions_behind_mean"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert r["mismatch/abs_logp_diff_max"] < 1e-4
        assert r["episode/errors"] == r["episode/timeouts"] == 0 and r["episode/refused_mean"] == 0
        assert r["episode/requests_mean"] >= r["episode/turns_mean"] >= 1
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(0.0 <= e["eval/accuracy"] <= 1.0 for e in evals)
