"""Preference pairs: built-in pairs and their format rule, dataset rows, tokenization and collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from data_helpers import write_jsonl

from icepop.data.preferences import (
    PAIR_SEED_OFFSET,
    REJECTED_FORMS,
    PreferencePair,
    builtin_preference_pairs,
    collate_pairs,
    dataset_preference_pairs,
    in_requested_format,
    load_preference_pairs,
    tokenize_pair,
    tokenize_pairs,
)
from icepop.data.prompts import chat_ids
from icepop.data.tasks import generate_problems


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_builtin_pairs_chosen_in_format_rejected_not_both_correct(task: str) -> None:
    pairs = builtin_preference_pairs(task, count=200, seed=3)
    problems = list(generate_problems(task, 3 + PAIR_SEED_OFFSET, 200))
    assert len(pairs) == 200
    for pair, problem in zip(pairs, problems, strict=True):
        assert pair.prompt == problem.messages and pair.chosen == problem.target_reply
        assert in_requested_format(task, pair.chosen), pair.chosen
        assert not in_requested_format(task, pair.rejected), pair.rejected
        assert problem.target_reply in pair.rejected  # the same correct answer, in the wrong format
        if task == "arithmetic":
            assert pair.chosen == str(problem.answer)
    # Every rejected form is used, so the model learns "requested format and short", not one string.
    forms = {next(f for f in REJECTED_FORMS if f.format(reply=p.chosen) == p.rejected) for p in pairs}
    assert forms == set(REJECTED_FORMS)
    assert builtin_preference_pairs(task, count=200, seed=3) == pairs  # deterministic
    # Different problems than the SFT/RL stream of the same seed.
    same_seed = [p.messages for p in generate_problems(task, 3, 200)]
    assert sum(pair.prompt in same_seed for pair in pairs) < 100


@pytest.mark.parametrize(
    ("task", "reply", "expected"),
    [
        ("arithmetic", "432", True),
        ("arithmetic", " 432\n", True),
        ("arithmetic", "-7", True),
        ("arithmetic", "432.", False),
        ("arithmetic", "4 32", False),
        ("arithmetic", "The answer is 432", False),
        ("arithmetic", "", False),
        ("countdown", "(3+5)*7", True),
        ("countdown", "10/2-1", True),
        ("countdown", "(3 + 5)*7", False),
        ("countdown", "(3+5)*7=56", False),
        ("countdown", "Answer: (3+5)*7", False),
    ],
)
def test_format_rule(task: str, reply: str, expected: bool) -> None:
    assert in_requested_format(task, reply) is expected


def test_format_rule_rejects_unknown_tasks() -> None:
    with pytest.raises(ValueError, match="task='math' has no format rule"):
        in_requested_format("math", "4")


PROMPT = "What is 2 + 2?"
ROWS = [
    {"prompt": PROMPT, "chosen": "4", "rejected": "The answer is 4"},  # 0
    {"prompt": "", "chosen": "4", "rejected": "four"},  # 1: empty prompt
    {"prompt": PROMPT, "chosen": None, "rejected": "four"},  # 2: missing chosen
    {"prompt": PROMPT, "chosen": "4", "rejected": " 4 "},  # 3: the same reply
    {"prompt": "What is 3 + 3?", "chosen": "6", "rejected": "6."},  # 4
    {"prompt": PROMPT, "chosen": "4", "rejected": "  "},  # 5: blank rejected
    {"prompt": None, "chosen": "4", "rejected": "5"},  # 6: missing prompt
]


def test_dataset_pairs_skip_and_locate_malformed_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    prefs = dataset_preference_pairs(path)
    assert prefs.pairs == [
        PreferencePair([{"role": "user", "content": PROMPT}], "4", "The answer is 4"),
        PreferencePair([{"role": "user", "content": "What is 3 + 3?"}], "6", "6."),
    ]
    assert prefs.skipped == {"missing_prompt": [1, 6], "missing_reply": [2, 5], "same_replies": [3]}
    assert prefs.describe("prefs.jsonl") == (
        "icepop data: 2 pairs from prefs.jsonl; skipped 5 malformed (prompt missing or empty: rows 1, 6; "
        "chosen or rejected missing or empty: rows 2, 5; chosen equal to rejected: row 3)"
    )
    stats = prefs.stats()
    assert (stats["data/pairs"], stats["data/malformed_dropped"], stats["data/skipped_same_replies"]) == (
        2,
        5,
        1,
    )
    # Field mapping, and the dispatch: a task name gives built-in pairs, anything else a dataset.
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    mapped = load_preference_pairs(
        write_jsonl(tmp_path / "renamed.jsonl", renamed),
        prompt_field="question",
        chosen_field="good",
        rejected_field="bad",
    )
    assert mapped.pairs == prefs.pairs and mapped.skipped == prefs.skipped
    builtin = load_preference_pairs("arithmetic", count=10, seed=1)
    assert builtin.pairs == builtin_preference_pairs("arithmetic", 10, 1) and builtin.skipped == {}
    with pytest.raises(ValueError, match=r"no column 'prompt'.*columns are"):
        dataset_preference_pairs(str(tmp_path / "renamed.jsonl"))


def test_dataset_pairs_from_messages(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Answer with the number only."}
    user = {"role": "user", "content": PROMPT}

    def reply(text: str, role: str = "assistant") -> list[dict[str, str]]:
        return [user, {"role": role, "content": text}]

    rows = [
        {"prompt": [system, user], "chosen": reply("4"), "rejected": reply("Answer: 4")},  # 0
        {"prompt": [system, user], "chosen": reply("4"), "rejected": reply("4", role="user")},  # 1
        {
            "prompt": [{"role": "judge", "content": "x"}, user],
            "chosen": reply("4"),
            "rejected": reply("5"),
        },  # 2
        {"prompt": [], "chosen": reply("4"), "rejected": reply("5")},  # 3
        {"prompt": [user], "chosen": [], "rejected": reply("5")},  # 4
        {"prompt": [user], "chosen": reply(""), "rejected": reply("5")},  # 5
    ]
    prefs = dataset_preference_pairs(write_jsonl(tmp_path / "msgs.jsonl", rows))
    # The reply is the last message; the messages before it repeat the prompt and are not used.
    assert prefs.pairs == [PreferencePair([system, user], "4", "Answer: 4")]
    assert prefs.skipped == {
        "reply_not_assistant": [1],
        "bad_role": [2],
        "missing_prompt": [3],
        "missing_reply": [4],
        "empty_content": [5],
    }


def test_no_usable_pair_raises_with_reasons_rows_and_a_valid_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], ROWS[3], ROWS[6]])
    with pytest.raises(ValueError, match=r"bad\.jsonl' has no usable pair") as error:
        dataset_preference_pairs(path)
    message = str(error.value)
    assert "prompt missing or empty: rows 0, 2" in message and "chosen equal to rejected: row 1" in message
    assert '{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "The answer is 4"}' in message


def test_tokenize_pair_is_the_full_chat_and_drops_overlong(tokenizer: Any) -> None:
    pair = PreferencePair([{"role": "user", "content": PROMPT}], "4", "The answer is 4")
    chosen, rejected = tokenize_pair(pair, tokenizer, max_tokens=None)
    assert tokenizer.decode(chosen) == (
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert rejected == chat_ids(
        tokenizer,
        [*pair.prompt, {"role": "assistant", "content": "The answer is 4"}],
        add_generation_prompt=False,
    )
    assert len(rejected) > len(chosen)
    assert tokenize_pair(pair, tokenizer, max_tokens=len(rejected)) == (chosen, rejected)
    assert tokenize_pair(pair, tokenizer, max_tokens=len(rejected) - 1) is None  # either side too long
    short = PreferencePair(pair.prompt, "4", "5")
    kept, overlong = tokenize_pairs([pair, short, pair], tokenizer, max_tokens=len(chosen))
    assert overlong == [0, 2] and kept == [tokenize_pair(short, tokenizer, None)]


def test_collate_pairs_puts_chosen_first_and_pads_right() -> None:
    pad = 99
    batch = collate_pairs([([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10])], pad_id=pad)
    # Rows: chosen 0, chosen 1, rejected 0, rejected 1; longest of all four is 4 tokens.
    assert batch.input_ids.tolist() == [
        [1, 2, 3, pad],
        [6, pad, pad, pad],
        [4, 5, pad, pad],
        [7, 8, 9, 10],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    with pytest.raises(ValueError, match="empty list"):
        collate_pairs([], pad_id=pad)
