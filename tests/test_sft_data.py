"""SFT rows: every malformed kind skipped, counted and located; the held-out split; length grouping."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from data_helpers import write_jsonl

from icepop.data.prompts import ShuffledBatches, split_holdout
from icepop.data.sft import (
    LengthGroupedBatches,
    builtin_sft_examples,
    conversation_messages,
    dataset_sft_examples,
    load_sft_examples,
)

USER = {"role": "user", "content": "What is 1 + 1?"}
REPLY = {"role": "assistant", "content": "2"}
GOOD = {"messages": [USER, REPLY]}
LONG = {
    "messages": [
        {"role": "user", "content": "What is 12 + 34 + 56 + 78?"},
        {"role": "assistant", "content": "180"},
    ]
}


def test_every_malformed_kind_is_skipped_counted_and_located(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        GOOD,  # 0
        {"messages": None},  # 1: no messages
        {},  # 2: the field missing from the row
        {"messages": [{"role": "user"}, REPLY]},  # 3: a message without content
        {"messages": [{"role": "robot", "content": "hi"}, REPLY]},  # 4: unknown role
        {"messages": [{"role": "user", "content": "  \n"}, REPLY]},  # 5: blank content
        {"messages": [USER]},  # 6: no assistant turn
        LONG,  # 7: over max_tokens
        {"messages": []},  # 8: no messages
        GOOD,  # 9
        *[{"messages": [USER, {"role": "assistant", "content": ""}]}] * 7,  # 10-16: empty reply
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    short_len = len(tokenizer.apply_chat_template(GOOD["messages"], return_dict=False))
    sft = dataset_sft_examples(path, tokenizer, max_tokens=short_len)
    assert len(sft.examples) == 2 and sft.examples[0] == sft.examples[1]
    assert sft.skipped == {
        "no_messages": [1, 2, 8],
        "bad_message": [3],
        "bad_role": [4],
        "empty_content": [5, 10, 11, 12, 13, 14, 15, 16],
        "no_assistant": [6],
        "overlong": [7],
    }
    assert (sft.num_malformed, sft.num_overlong) == (14, 1)
    stats = sft.stats()
    assert stats["data/examples"] == 2 and stats["data/malformed_dropped"] == 14
    assert stats["data/overlong_dropped"] == 1 and stats["data/skipped_empty_content"] == 8
    assert stats["data/skipped_no_assistant"] == 1 and stats["data/skipped_bad_role"] == 1
    assert sft.describe("train.jsonl") == (
        "icepop data: 2 conversations from train.jsonl; skipped 14 malformed (no messages: rows 1, 2, 8; "
        "a message without str role and content: row 3; a role other than system/user/assistant: row 4; "
        "empty content: rows 5, 10, 11, 12, 13 and 3 more; no assistant turn: row 6), 1 over-long (row 7)"
    )
    # Without a token limit the long conversation is kept; a clean file says nothing was skipped.
    assert dataset_sft_examples(path, tokenizer).num_overlong == 0
    clean = load_sft_examples(write_jsonl(tmp_path / "clean.jsonl", [GOOD, LONG]), tokenizer)
    assert clean.describe("clean.jsonl") == "icepop data: 2 conversations from clean.jsonl; none skipped"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("What is 1 + 1?", "no_messages"),  # a string is a prompt, not a conversation
        (5, "no_messages"),
        ([USER, "2"], "bad_message"),
        ([USER, {"role": "assistant", "content": 2}], "bad_message"),
        ([{"role": 1, "content": "hi"}, REPLY], "bad_message"),
        ([{"role": "User", "content": "hi"}, REPLY], "bad_role"),
        ([USER, {"role": "assistant", "content": " "}], "empty_content"),
        ([{"role": "system", "content": "Be brief."}, USER], "no_assistant"),
    ],
)
def test_conversation_checks_name_the_reason(value: Any, reason: str) -> None:
    # Values a datasets column of mixed types cannot hold, checked on the Python values directly.
    assert conversation_messages(value) == (None, reason)


def test_conversation_checks_keep_role_and_content_only() -> None:
    messages, reason = conversation_messages([{**USER, "name": "x"}, REPLY])
    assert (messages, reason) == ([USER, REPLY], None)


def test_no_usable_row_raises_with_reasons_rows_and_a_valid_row(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        {"messages": [USER]},
        {"messages": [USER, {"role": "assistant", "content": ""}]},
        {"messages": [USER]},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl' has no usable conversation") as error:
        dataset_sft_examples(path, tokenizer)
    message = str(error.value)
    assert "empty content: row 1" in message and "no assistant turn: rows 0, 2" in message
    assert '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant"' in message
    # A column of strings: no row holds a messages list.
    strings = write_jsonl(tmp_path / "strings.jsonl", [{"messages": "hi"}, {"messages": "there"}])
    with pytest.raises(ValueError, match=r"no messages: rows 0, 1"):
        dataset_sft_examples(strings, tokenizer)
    # Everything over the limit: the error says which rows and how to keep them.
    with pytest.raises(ValueError, match=r"2 over-long \(rows 0, 1\) \(raise max_tokens"):
        dataset_sft_examples(write_jsonl(tmp_path / "long.jsonl", [GOOD, LONG]), tokenizer, max_tokens=5)
    with pytest.raises(ValueError, match=r"no column 'conversation'"):
        dataset_sft_examples(path, tokenizer, messages_field="conversation")


def test_builtin_examples_record_overlong_problems(tokenizer: Any) -> None:
    full = builtin_sft_examples("countdown", tokenizer, count=40, seed=1)
    assert len(full.examples) == 40 and full.skipped == {}
    lengths = [len(e.input_ids) for e in full.examples]
    limit = sorted(lengths)[20]
    kept = load_sft_examples("countdown", tokenizer, count=40, seed=1, max_tokens=limit)
    assert kept.skipped == {"overlong": [i for i, n in enumerate(lengths) if n > limit]}
    assert [len(e.input_ids) for e in kept.examples] == [n for n in lengths if n <= limit]
    with pytest.raises(ValueError, match=r"'countdown' has no usable conversation: skipped 40 over-long"):
        builtin_sft_examples("countdown", tokenizer, count=40, seed=1, max_tokens=3)


def test_split_holdout_is_disjoint_deterministic_and_at_most_half() -> None:
    items = [f"row{i}" for i in range(101)]
    train, held_out = split_holdout(items, count=20, seed=3)
    assert len(held_out) == 20 and len(train) == 81
    assert set(train).isdisjoint(held_out) and sorted(train + held_out) == sorted(items)
    assert train == [x for x in items if x in set(train)]  # both keep the input order
    assert held_out == [x for x in items if x in set(held_out)]
    assert split_holdout(items, count=20, seed=3) == (train, held_out)
    assert split_holdout(items, count=20, seed=4)[1] != held_out
    assert [len(part) for part in split_holdout(items, count=500, seed=3)] == [51, 50]  # at most len // 2
    assert split_holdout(items, count=0, seed=3) == (items, [])
    assert split_holdout(items[:1], count=5, seed=3) == (items[:1], [])
    with pytest.raises(ValueError, match="count=-1"):
        split_holdout(items, count=-1, seed=3)


def _stream(batches: Any, count: int) -> list[list[int]]:
    return [batches.next_batch() for _ in range(count)]


@pytest.mark.parametrize("size", [96, 100])  # 96 = 12 batches of 8; 100 leaves 4 over each epoch
def test_length_grouped_batches_cover_every_item_once_per_epoch(size: int) -> None:
    items = list(range(size))  # the item is its own length
    batches = LengthGroupedBatches(items, batch_size=8, seed=0, length=lambda x: x, window=3)
    stream = _stream(batches, 3 * size // 8 + 1)
    assert all(len(batch) == 8 for batch in stream)
    flat = [x for batch in stream for x in batch]
    for epoch in range(3):
        assert sorted(flat[epoch * size : (epoch + 1) * size]) == items
    again = LengthGroupedBatches(items, batch_size=8, seed=0, length=lambda x: x, window=3)
    assert _stream(again, len(stream)) == stream
    other = LengthGroupedBatches(items, batch_size=8, seed=1, length=lambda x: x, window=3)
    assert _stream(other, len(stream)) != stream


def test_length_grouped_batches_sort_within_a_window_in_every_epoch() -> None:
    # 100 distinct lengths, batches of 8, one window per epoch: 12 full batches and 4 items left over,
    # which the next batch completes from the next epoch. Every batch inside one epoch must hold a run
    # of consecutive lengths among that epoch's grouped batches: no two of their ranges overlap,
    # in the epochs that start mid-batch too (the grouping is cut after the borrowed items).
    lengths = random.Random(0).sample(range(1000), 100)
    batches = LengthGroupedBatches(lengths, batch_size=8, seed=2, length=lambda x: x, window=13)
    stream = _stream(batches, 50)  # 4 epochs
    for epoch in range(4):
        inside = [b for k, b in enumerate(stream) if 100 * epoch <= 8 * k and 8 * k + 8 <= 100 * epoch + 100]
        assert len(inside) == 12
        ranges = sorted((min(b), max(b)) for b in inside)
        assert all(high < next_low for (_, high), (next_low, _) in itertools.pairwise(ranges))
        assert [min(b) for b in inside] != sorted(min(b) for b in inside)  # the batch order is shuffled


def test_length_grouped_batches_resume_exactly() -> None:
    items = list(range(50))
    batches = LengthGroupedBatches(items, batch_size=6, seed=5, length=lambda x: x % 17, window=2)
    _stream(batches, 11)  # into the second epoch
    state = batches.state_dict()
    assert state["epoch"] == 1
    expected = _stream(batches, 20)
    restored = LengthGroupedBatches(items, batch_size=6, seed=5, length=lambda x: x % 17, window=2)
    restored.load_state_dict(state)
    assert _stream(restored, 20) == expected
    with pytest.raises(ValueError, match="window=0"):
        LengthGroupedBatches(items, batch_size=6, seed=5, window=0)
    with pytest.raises(ValueError, match="batch_size=51"):
        LengthGroupedBatches(items, batch_size=51, seed=5, length=lambda x: x)


def _padding_fraction(batches: list[list[int]]) -> float:
    """Padded positions / all positions when each batch is right-padded to its longest item."""
    padded = sum(max(batch) * len(batch) for batch in batches)
    return 1 - sum(sum(batch) for batch in batches) / padded


def test_length_grouping_pads_less_than_shuffling(tokenizer: Any) -> None:
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(10, 40), rng.randint(100, 400)]) for _ in range(800)]
    grouped = _stream(LengthGroupedBatches(lengths, 16, seed=0, length=lambda x: x), 100)
    shuffled = _stream(ShuffledBatches(lengths, 16, seed=0), 100)
    # Random batches of 16 almost always hold a 300+ item; sorted windows of 50 batches pad little.
    assert _padding_fraction(shuffled) > 0.4
    assert _padding_fraction(grouped) < 0.05
    # The default length is an SFTExample's token count.
    sft = builtin_sft_examples("countdown", tokenizer, count=64, seed=0).examples
    epoch = _stream(LengthGroupedBatches(sft, 8, seed=0), 8)
    assert sorted(id(e) for batch in epoch for e in batch) == sorted(id(e) for e in sft)
    as_lengths = [[len(e.input_ids) for e in batch] for batch in epoch]
    plain = [[len(e.input_ids) for e in batch] for batch in _stream(ShuffledBatches(sft, 8, seed=0), 8)]
    assert _padding_fraction(as_lengths) < _padding_fraction(plain)


def test_shuffled_batches_order_is_unchanged_by_the_epoch_order_hook() -> None:
    # Checkpoints hold (epoch, position) only: the order must stay the one a (seed, epoch) shuffle gives.
    batches = ShuffledBatches(list(range(10)), batch_size=5, seed=7)
    _stream(batches, 2)
    expected = list(range(10))
    random.Random("7/1").shuffle(expected)
    assert batches.next_batch() + batches.next_batch() == expected
