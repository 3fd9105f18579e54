"""SFT data: full conversations tokenized with a label-aligned mask over the assistant's tokens.

Key design choice: the assistant spans are found by tokenizing the conversation's prefixes with the
same chat template (`add_generation_prompt=True` marks where a reply starts; the reply ends at the
template's end-of-turn token, the tokenizer's EOS, which is trained on so the model learns to stop)
instead of searching for marker strings, and a template whose prefixes are not token prefixes of the
whole conversation is rejected rather than silently mis-masked. Masks follow `icepop.types`:
loss_mask[j] is True when input_ids[j+1] is an assistant token, so it lines up with logits[:, :-1].

Dataset rows that cannot be used (no messages, a malformed message, a blank turn, no assistant turn,
over max_tokens) are skipped, never fatal, and recorded by reason with their row indices, so one
log line (`SFTSet.describe`) says exactly which rows were left out; only a source with no usable row
raises. Batching: `LengthGroupedBatches` puts conversations of similar length together — the
alternative to sequence packing chosen here, since it cuts padding without letting packed samples
attend to each other.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from icepop.data.prompts import (
    MESSAGE_SKIP_REASONS,
    OVERLONG,
    Messages,
    ShuffledBatches,
    Skipped,
    chat_ids,
    describe_data,
    epoch_shuffle,
    nothing_usable,
    parse_messages,
    skipped_stats,
)
from icepop.data.rows import load_rows
from icepop.data.tasks import generate_problems, is_generated
from icepop.types import Problem, SFTBatch

T = TypeVar("T")


@dataclass
class SFTExample:
    """One tokenized conversation."""

    input_ids: list[int]
    loss_mask: list[bool]
    """len(input_ids) - 1 entries; entry j is True when input_ids[j+1] belongs to an assistant reply."""


SFT_SKIP_REASONS = {
    **MESSAGE_SKIP_REASONS,
    "no_assistant": "no assistant turn",
    OVERLONG: "over-long",
}
"""Why an SFT row is skipped, and how the log line names it."""
VALID_SFT_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass
class SFTSet:
    """SFT examples, and which source rows did not make it and why."""

    examples: list[SFTExample]
    skipped: Skipped = field(default_factory=dict)
    """Reason (a key of SFT_SKIP_REASONS) → indices of the rows (or built-in problems) skipped for it."""

    @property
    def num_overlong(self) -> int:
        """Dropped because the conversation had more than max_tokens tokens."""
        return len(self.skipped.get(OVERLONG, []))

    @property
    def num_malformed(self) -> int:
        """Dropped for any other reason (see SFT_SKIP_REASONS)."""
        return sum(len(rows) for rows in self.skipped.values()) - self.num_overlong

    def stats(self) -> dict[str, float]:
        return {"data/examples": float(len(self.examples)), **skipped_stats(self.skipped, SFT_SKIP_REASONS)}

    def describe(self, source: str) -> str:
        """One log line: how many conversations came from `source`, and every skipped row by reason."""
        return describe_data(len(self.examples), "conversations", source, self.skipped, SFT_SKIP_REASONS)


def _starts_with(ids: list[int], prefix: list[int]) -> bool:
    return ids[: len(prefix)] == prefix


def tokenize_conversation(messages: Messages, tokenizer: Any) -> SFTExample:
    """Tokenize a conversation; every assistant reply, with its end-of-turn token, is trained on."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("an SFT conversation needs at least one assistant message")
    input_ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    loss_mask = [False] * (len(input_ids) - 1)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        through = chat_ids(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not (_starts_with(through, before) and _starts_with(input_ids, through)):
            raise ValueError(
                "the chat template does not tokenize a conversation's prefixes as prefixes of the whole; "
                "assistant tokens cannot be located"
            )
        reply = through[len(before) :]
        # The reply runs through the first EOS (ChatML's <|im_end|>); what follows it ("\n") is template.
        end = reply.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in reply else len(reply)
        for position in range(len(before), len(before) + end):
            loss_mask[position - 1] = True  # label-aligned: mask[j] describes token j+1
    return SFTExample(input_ids, loss_mask)


def _add_example(
    examples: list[SFTExample], skipped: Skipped, index: int, example: SFTExample, max_tokens: int | None
) -> None:
    if max_tokens is not None and len(example.input_ids) > max_tokens:
        skipped.setdefault(OVERLONG, []).append(index)
    else:
        examples.append(example)


def builtin_sft_examples(
    task: str,
    tokenizer: Any,
    count: int,
    seed: int,
    max_tokens: int | None = None,
    conversation: Callable[[Problem], Messages] | None = None,
    **task_options: Any,
) -> SFTSet:
    """`count` problems of a built-in task with their target replies as the assistant turn, or as
    `conversation(problem)` writes them (e.g. a tool exchange: icepop.envs.python_tool.demonstration)."""
    examples: list[SFTExample] = []
    skipped: Skipped = {}
    for index, problem in enumerate(generate_problems(task, seed, count, **task_options)):
        messages = [*problem.messages, {"role": "assistant", "content": problem.target_reply}]
        if conversation is not None:
            messages = conversation(problem)
        _add_example(examples, skipped, index, tokenize_conversation(messages, tokenizer), max_tokens)
    if not examples:
        raise nothing_usable(task, "conversation", skipped, SFT_SKIP_REASONS, valid_row=None)
    return SFTSet(examples, skipped)


def conversation_messages(value: Any) -> tuple[Messages | None, str | None]:
    """(messages, None) for a usable SFT conversation, else (None, a key of SFT_SKIP_REASONS)."""
    messages, reason = parse_messages(value)
    if messages is not None and not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant"
    return messages, reason


def dataset_sft_examples(
    source: str,
    tokenizer: Any,
    messages_field: str = "messages",
    max_tokens: int | None = None,
    split: str = "train",
    subset: str | None = None,
) -> SFTSet:
    """SFT examples from dataset rows whose `messages_field` holds a chat with an assistant turn.

    A row that cannot be used (see SFT_SKIP_REASONS) is skipped and recorded, never fatal; a source
    with no usable row at all raises a ValueError that lists them. Log `SFTSet.describe(source)`."""
    rows = load_rows(source, split, subset)
    if messages_field not in rows.column_names:
        raise ValueError(f"{source!r} has no column {messages_field!r}; its columns are {rows.column_names}")
    examples: list[SFTExample] = []
    skipped: Skipped = {}
    for index, row in enumerate(rows):
        messages, reason = conversation_messages(row[messages_field])
        if messages is None:
            skipped.setdefault(reason, []).append(index)
            continue
        _add_example(examples, skipped, index, tokenize_conversation(messages, tokenizer), max_tokens)
    if not examples:
        raise nothing_usable(source, "conversation", skipped, SFT_SKIP_REASONS, VALID_SFT_ROW)
    return SFTSet(examples, skipped)


def load_sft_examples(
    source: str,
    tokenizer: Any,
    count: int = 1000,
    seed: int = 0,
    max_tokens: int | None = None,
    **options: Any,
) -> SFTSet:
    """A built-in task by name (count/seed/options shape it), else a dataset file or hub name (options
    go to `dataset_sft_examples`; count and seed are not used)."""
    if is_generated(source):
        return builtin_sft_examples(source, tokenizer, count, seed, max_tokens, **options)
    else:
        return dataset_sft_examples(source, tokenizer, max_tokens=max_tokens, **options)


def collate_sft(examples: Sequence[SFTExample], pad_token_id: int) -> SFTBatch:
    """Right-pad to the longest example: input_ids/attention_mask [B, L] (long), loss_mask [B, L-1] (bool)."""
    if not examples:
        raise ValueError("cannot collate an empty list of SFT examples")
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length - 1), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, : n - 1] = torch.tensor(example.loss_mask, dtype=torch.bool)
    return SFTBatch(input_ids, attention_mask, loss_mask)


def _input_length(example: SFTExample) -> int:
    return len(example.input_ids)


class LengthGroupedBatches(Generic[T]):
    """Endless full batches of `items` of similar length, with ShuffledBatches' interface and state.

    Each epoch shuffles the items (as ShuffledBatches does), cuts the shuffled order into windows of
    `window` batches, sorts each window by `length` and cuts it into batches, then shuffles the order
    of all the epoch's batches. Every item appears exactly once per epoch, and the order is a
    function of (seed, epoch) alone, so state_dict()/load_state_dict() resume exactly. The batch that
    crosses an epoch's end takes the first items of the next epoch (which are left unsorted), and
    the next epoch's batches are cut after them, so all batches stay full and grouped as long as
    next_batch() is called with the default size.
    """

    def __init__(
        self,
        items: Sequence[T],
        batch_size: int,
        seed: int,
        length: Callable[[T], int] = _input_length,  # the default measures an SFTExample
        window: int = 50,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1 batch")
        self.batch_size, self.seed, self.window = batch_size, seed, window
        self._lengths = [length(item) for item in items]
        self._stream = ShuffledBatches(items, batch_size, seed, epoch_order=self._epoch_order)

    def _epoch_order(self, epoch: int) -> list[int]:
        size, batch_size, seed = len(self._lengths), self.batch_size, self.seed
        order = epoch_shuffle(size, seed, epoch)
        # Items 0..e*size-1 came before this epoch; a batch boundary falls at the next multiple of batch_size.
        offset = -epoch * size % batch_size
        full_end = offset + (size - offset) // batch_size * batch_size
        batches = []
        for start in range(offset, full_end, self.window * batch_size):
            chunk = order[start : min(start + self.window * batch_size, full_end)]
            chunk.sort(key=lambda index: self._lengths[index])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        random.Random(f"{seed}/{epoch}/batches").shuffle(batches)
        return order[:offset] + [index for batch in batches for index in batch] + order[full_end:]

    def __iter__(self) -> LengthGroupedBatches[T]:
        return self

    def __next__(self) -> list[T]:
        return self.next_batch()

    def next_batch(self, size: int | None = None) -> list[T]:
        """The next `size` items (default: batch_size; another size breaks the grouping's alignment)."""
        return self._stream.next_batch(size)

    def state_dict(self) -> dict[str, int]:
        """The position: epoch and index into that epoch's order."""
        return self._stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._stream.load_state_dict(state)
