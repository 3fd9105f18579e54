"""reasoning-gym tasks (`data.source=reasoning_gym:<name>`): reproducible problems with the library's
own entries, its checker as the reward (strict, shaped, lenient readings), in the reward workers, and
bad sources or options named before anything starts."""

from __future__ import annotations

from typing import Any

import pytest

from icepop.data import load_prompts
from icepop.data.gym import check_source, gym_problems
from icepop.rewards import RewardPool, verify
from icepop.rewards.gym import as_number, lenient, score, strict
from icepop.rewards.verifiers import lenient_correct, strict_correct
from icepop.types import Prompt

SOURCE = "reasoning_gym:basic_arithmetic"
OPTIONS = {"min_terms": 2, "max_terms": 2, "max_digits": 2, "operators": ["+", "-"],
           "allow_parentheses": False, "allow_negation": False}  # fmt: skip


def test_problems_are_reproducible_and_carry_the_librarys_entry() -> None:
    first, again = gym_problems(SOURCE, 5, 20, OPTIONS), gym_problems(SOURCE, 5, 20, OPTIONS)
    assert [p.answer for p in first] == [p.answer for p in again]
    assert [p.answer for p in gym_problems(SOURCE, 6, 20, OPTIONS)] != [p.answer for p in first]
    p = first[0]
    assert (
        p.task == SOURCE and p.answer["source"] == SOURCE and p.answer["question"] in p.messages[1]["content"]
    )
    assert "<answer></answer>" in p.messages[0]["content"]  # the format asked for
    expression = p.answer["metadata"]["expression"]  # e.g. "47 - 13": two terms, + or -, ≤ 2 digits
    assert eval(expression) == int(p.answer["answer"]) and len(expression.split()) == 3
    assert p.target_reply == f"<answer>{p.answer['answer']}</answer>"


def test_the_librarys_checker_scores_replies_three_ways() -> None:
    entry: dict[str, Any] = gym_problems(SOURCE, 5, 1, OPTIONS)[0].answer
    right, wrong = entry["answer"], str(int(entry["answer"]) + 1)
    tagged, untagged = f"It is <answer>{right}</answer>", f"{entry['metadata']['expression']} = {right}."
    # Strict: only the tags count. Training reward: tags, else the last number (shaping). Lenient: the
    # last number, whatever the format.
    assert (strict(tagged, entry), score(tagged, entry), lenient(tagged, entry)) == (1.0, 1.0, True)
    assert (strict(untagged, entry), score(untagged, entry), lenient(untagged, entry)) == (0.0, 1.0, True)
    assert (score(f"<answer>{wrong}</answer>", entry), lenient(f"{right}, no: {wrong}", entry)) == (
        0.0,
        False,
    )
    assert score("no number at all", entry) == 0.0 and not lenient("no number at all", entry)
    assert verify(SOURCE, tagged, entry) == 1.0  # the verifiers dispatch to it by task
    assert lenient_correct(SOURCE, untagged, entry) and not strict_correct(SOURCE, untagged, entry)
    assert as_number("1,234") == 1234 and as_number("-3.50") == as_number("-7/2") and as_number("x") is None


def test_lenient_and_strict_readings_of_the_built_in_tasks() -> None:
    # Arithmetic asks for the number alone: "The answer is 42." is lenient-right, strict-wrong.
    assert lenient_correct("arithmetic", "The answer is 42.", 42) and not strict_correct(
        "arithmetic", "The answer is 42.", 42
    )
    assert strict_correct("arithmetic", " 042\n", 42) and not lenient_correct("arithmetic", "42, or 43", 42)
    assert lenient_correct("math", "so 18 + 54 = 72", "18 + 54 = 72\n#### 72")  # GSM8K's gold answer
    assert lenient_correct("countdown", "(3+5)*7", {"target": 56, "numbers": [3, 5, 7]}) is None


def test_the_lenient_reward_pays_the_last_number_in_the_reward_workers() -> None:
    # reward.function=icepop.rewards.verifiers:lenient_reward: the last number, whatever the format;
    # a task without a numeric answer (countdown) keeps its verifier.
    arithmetic = Prompt([1], answer=42, task="arithmetic")
    countdown = Prompt([1], answer={"target": 56, "numbers": [3, 5, 7]}, task="countdown")
    prompts = [arithmetic] * 3 + [countdown] * 2
    replies = ["The answer is 42.", "42, or 43", "42", "(3+5)*7", "(3+5)+7"]
    with RewardPool("icepop.rewards.verifiers:lenient_reward", num_workers=1, timeout_s=30.0) as pool:
        assert pool.score(prompts, replies).rewards == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_gym_prompts_are_scored_in_the_reward_workers(tokenizer: Any) -> None:
    prompts = load_prompts(SOURCE, tokenizer, 512, count=4, seed=1, **OPTIONS).prompts
    replies = [f"<answer>{p.answer['answer']}</answer>" for p in prompts[:2]] + ["<answer>-1</answer>", "?"]
    with RewardPool(num_workers=1, timeout_s=30.0) as pool:
        scored = pool.score(prompts, replies)
    assert scored.rewards == [1.0, 1.0, 0.0, 0.0] and scored.stats["reward/errors"] == 0


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("reasoning_gym:basic_arithmetc", {}, "did you mean basic_arithmetic"),
        (SOURCE, {"max_term": 2}, "['max_term'] are not options of 'basic_arithmetic'"),
    ],
)
def test_a_bad_generator_or_option_is_named(source: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_source(source, options)
