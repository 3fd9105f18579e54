"""Fixtures shared across test modules: the tiny tokenizer, one cache for the end-to-end runs, the
tiny default's run (with its SFT warm-up) and the reference run of the fault and multi-node tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import REFERENCE, TINY_DEFAULT, Run, icepop_train

from icepop.models.tiny import build_tokenizer


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under `pytest -n 2 --dist loadgroup` (make test) the `ray` tests of one group run one after
    another on one worker: each starts a Ray cluster, and those of the default group share the session
    fixtures below. A second group (`ray("apart")`: the real model and the pipeline, which share
    nothing with them) may run beside it, so at most two clusters run at once. The other `slow` tests
    (an in-process vLLM engine, DeepSpeed ranks in spawned processes, the network) form a group of their
    own; the fast tests fill in around them. (Marked as each item is collected: xdist reads the groups in
    its own `pytest_collection_modifyitems`.)"""
    ray = item.get_closest_marker("ray")
    if ray is not None:
        item.add_marker(pytest.mark.xdist_group(ray.args[0] if ray.args else "ray"))
    elif item.get_closest_marker("slow") is not None:
        item.add_marker(pytest.mark.xdist_group("engines"))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The tiny chat tokenizer (a chat template, EOS and PAD tokens), built offline."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ICEPOP_CACHE for the session's end-to-end runs: the tiny model and its SFT warm-up are built
    once (by `tiny_default_run`) and reused by every run with the same settings."""
    return tmp_path_factory.mktemp("icepop-cache")


@pytest.fixture(scope="session")
def tiny_default_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Run:
    """The tiny default's RLVR, whose SFT warm-up runs first and is cached: 3 RL steps with a custom
    reward, a KL term at a sampling temperature ≠ 1, and wandb (offline). tests/test_rlvr_e2e.py."""
    tmp = tmp_path_factory.mktemp("e2e")
    result = icepop_train(tmp, *TINY_DEFAULT, "run.dir=rl", cache=shared_cache)
    return Run(tmp / "rl", result.stdout)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, tiny_default_run: Run) -> Run:
    """`REFERENCE`, run once per session, from the warm-up `tiny_default_run` cached."""
    tmp = tmp_path_factory.mktemp("reference")
    result = icepop_train(tmp, *REFERENCE, "run.dir=run", cache=shared_cache)
    return Run(tmp / "run", result.stdout)


TOOL_TASK = {"digits": 2, "operators": "*"}
"""The tool tasks' problems: two-digit multiplication (tests/test_episodes.py, tests/test_agents.py)."""


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dense model after 80 plain-torch SFT steps on the Python tool's demonstrations, so that
    its turns end with <|im_end|> and episodes go on after a tool message (built once per session)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icepop.data.sft import builtin_sft_examples, collate_sft
    from icepop.envs.python_tool import demonstration
    from icepop.models.tiny import build_tiny_model

    directory = build_tiny_model(tmp_path_factory.mktemp("tool-model"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    examples = builtin_sft_examples(
        "arithmetic", tokenizer, 320, 0, conversation=demonstration, **TOOL_TASK
    ).examples
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(80):
        batch = collate_sft(examples[(step * 16) % 320 :][:16], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.input_ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[batch.loss_mask], labels[batch.loss_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return directory
