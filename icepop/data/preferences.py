"""Preference pairs for reward-model training: built-in pairs, dataset rows, tokenization, collation.

Key design choice: the built-in pairs differ only in *format*, never in correctness. Both replies
carry the right answer; the chosen one is exactly the task's requested reply ("432", "(3+5)*7") and
the rejected one breaks the system prompt's "answer with … only" in one of a few fixed ways (a
verbose prefix, a trailing period, a repetition). The preference is then a rule
(`in_requested_format`) that a ~1M-parameter reward model can learn and a test can check exactly.
Dataset rows are read like SFT rows: an unusable row is skipped and recorded by reason with its
index (shared with `icepop.data.sft` through `icepop.data.prompts`), and only a source with no usable
row raises. Batches follow `icepop.types.PreferenceBatch`: chosen rows first, then rejected.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from icepop.data.prompts import (
    MESSAGE_SKIP_REASONS,
    Messages,
    Skipped,
    chat_ids,
    describe_data,
    nothing_usable,
    parse_messages,
    skipped_stats,
)
from icepop.data.rows import load_rows
from icepop.data.tasks import TASKS, generate_problems
from icepop.types import PreferenceBatch

PAIR_SEED_OFFSET = 7919
"""Built-in pairs use problems of seed + this, so they differ from the SFT/RL problems of a seed."""
REJECTED_FORMS = (
    "The answer is {reply}",
    "Answer: {reply}",
    "I think it is {reply}",
    "{reply} is the answer",
    "{reply}.",
    "{reply} {reply}",
)
"""How a built-in rejected reply breaks the requested format while keeping the correct answer."""
_INTEGER = re.compile(r"-?\d+")
_EXPRESSION = re.compile(r"[0-9+\-*/()]+")

PREFERENCE_SKIP_REASONS = {
    "missing_prompt": "prompt missing or empty",
    "missing_reply": "chosen or rejected missing or empty",
    **{reason: label for reason, label in MESSAGE_SKIP_REASONS.items() if reason != "no_messages"},
    "reply_not_assistant": "reply messages not ending in an assistant turn",
    "same_replies": "chosen equal to rejected",
}
"""Why a preference row is skipped, and how the log line names it."""
VALID_PREFERENCE_ROW = '{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "The answer is 4"}'
PairIds = tuple[list[int], list[int]]
"""(chosen_ids, rejected_ids) of one tokenized pair."""


@dataclass
class PreferencePair:
    """A prompt and two replies to it, the first preferred."""

    prompt: Messages
    """Chat messages up to (without) the reply."""
    chosen: str
    rejected: str


@dataclass
class PreferenceSet:
    """Preference pairs, and which source rows did not make it and why."""

    pairs: list[PreferencePair]
    skipped: Skipped = field(default_factory=dict)
    """Reason (a key of PREFERENCE_SKIP_REASONS) → indices of the rows skipped for it."""

    def stats(self) -> dict[str, float]:
        return {"data/pairs": float(len(self.pairs)), **skipped_stats(self.skipped, PREFERENCE_SKIP_REASONS)}

    def describe(self, source: str) -> str:
        """One log line: how many pairs came from `source`, and every skipped row by reason."""
        return describe_data(len(self.pairs), "pairs", source, self.skipped, PREFERENCE_SKIP_REASONS)


def in_requested_format(task: str, reply: str) -> bool:
    """The built-in tasks' format rule: arithmetic, the stripped reply is an integer literal;
    countdown, it holds only digits, + - * / and parentheses (no spaces)."""
    if task == "arithmetic":
        return _INTEGER.fullmatch(reply.strip()) is not None
    elif task == "countdown":
        return _EXPRESSION.fullmatch(reply.strip()) is not None
    raise ValueError(f"task={task!r} has no format rule; built-in tasks: {', '.join(TASKS)}")


def builtin_preference_pairs(task: str, count: int, seed: int, **task_options: Any) -> list[PreferencePair]:
    """`count` pairs on problems of (task, seed + PAIR_SEED_OFFSET): chosen is the target reply,
    rejected the same answer in a REJECTED_FORMS form drawn from (task, seed, index)."""
    pairs = []
    problems = generate_problems(task, seed + PAIR_SEED_OFFSET, count, **task_options)
    for index, problem in enumerate(problems):
        form = random.Random(f"preference/{task}/{seed}/{index}").choice(REJECTED_FORMS)
        rejected = form.format(reply=problem.target_reply)
        pairs.append(PreferencePair(problem.messages, problem.target_reply, rejected))
    return pairs


def _prompt_messages(value: Any) -> tuple[Messages | None, str | None]:
    """A prompt string (one user message) or messages list, else (None, reason)."""
    if isinstance(value, str):
        return ([{"role": "user", "content": value}], None) if value.strip() else (None, "missing_prompt")
    messages, reason = parse_messages(value)
    return messages, "missing_prompt" if reason == "no_messages" else reason


def _reply_text(value: Any) -> tuple[str | None, str | None]:
    """A reply string, or the content of a messages list's last (assistant) message, else (None, reason)."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "missing_reply")
    messages, reason = parse_messages(value)
    if messages is None:
        return None, "missing_reply" if reason == "no_messages" else reason
    if messages[-1]["role"] != "assistant":
        return None, "reply_not_assistant"
    return messages[-1]["content"], None


def row_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[PreferencePair | None, str | None]:
    """(pair, None) for usable field values, else (None, a key of PREFERENCE_SKIP_REASONS). A reply
    given as messages is its last message; the messages before it are taken to repeat the prompt."""
    messages, reason = _prompt_messages(prompt)
    chosen_text, chosen_reason = _reply_text(chosen)
    rejected_text, rejected_reason = _reply_text(rejected)
    reason = reason or chosen_reason or rejected_reason
    if reason is not None or messages is None or chosen_text is None or rejected_text is None:
        return None, reason
    if chosen_text.strip() == rejected_text.strip():
        return None, "same_replies"
    return PreferencePair(messages, chosen_text, rejected_text), None


def dataset_preference_pairs(
    source: str,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
) -> PreferenceSet:
    """Pairs from dataset rows (.jsonl/.json/.parquet or a hub name). The prompt is a string or a
    messages list; chosen/rejected are strings or messages lists ending in the assistant's reply.
    Unusable rows are skipped and recorded; a source with no usable row raises a ValueError."""
    rows = load_rows(source, split)
    for name in (prompt_field, chosen_field, rejected_field):
        if name not in rows.column_names:
            raise ValueError(f"{source!r} has no column {name!r}; its columns are {rows.column_names}")
    pairs: list[PreferencePair] = []
    skipped: Skipped = {}
    for index, row in enumerate(rows):
        pair, reason = row_pair(row[prompt_field], row[chosen_field], row[rejected_field])
        if pair is None:
            skipped.setdefault(reason, []).append(index)
        else:
            pairs.append(pair)
    if not pairs:
        raise nothing_usable(source, "pair", skipped, PREFERENCE_SKIP_REASONS, VALID_PREFERENCE_ROW)
    return PreferenceSet(pairs, skipped)


def load_preference_pairs(source: str, count: int = 1000, seed: int = 0, **options: Any) -> PreferenceSet:
    """A built-in task by name (count/seed/options shape it), else a dataset file or hub name (options
    go to `dataset_preference_pairs`; count and seed are not used)."""
    if source in TASKS:
        return PreferenceSet(builtin_preference_pairs(source, count, seed, **options))
    else:
        return dataset_preference_pairs(source, **options)


def tokenize_pair(pair: PreferencePair, tokenizer: Any, max_tokens: int | None) -> PairIds | None:
    """(chosen_ids, rejected_ids): the prompt and each reply as a full chat; None when either has
    more than max_tokens tokens."""
    chosen, rejected = (
        chat_ids(
            tokenizer, [*pair.prompt, {"role": "assistant", "content": reply}], add_generation_prompt=False
        )
        for reply in (pair.chosen, pair.rejected)
    )
    if max_tokens is not None and max(len(chosen), len(rejected)) > max_tokens:
        return None
    return chosen, rejected


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Any, max_tokens: int | None
) -> tuple[list[PairIds], list[int]]:
    """(tokenized pairs, indices into `pairs` of those dropped as over-long)."""
    kept, overlong = [], []
    for index, pair in enumerate(pairs):
        ids = tokenize_pair(pair, tokenizer, max_tokens)
        if ids is None:
            overlong.append(index)
        else:
            kept.append(ids)
    return kept, overlong


def collate_pairs(pairs: Sequence[PairIds], pad_id: int) -> PreferenceBatch:
    """Rows 0..B-1 chosen, B..2B-1 rejected (row B+i pairs with row i), right-padded to the longest
    of the 2B rows; attention_mask is 1 on real tokens. Both [2B, L], long."""
    if not pairs:
        raise ValueError("cannot collate an empty list of preference pairs")
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    return PreferenceBatch(input_ids, attention_mask)
