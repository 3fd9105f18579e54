"""SFT data: full conversations tokenized with a label-aligned mask over the assistant's tokens.

Key design choice: the assistant spans are found by tokenizing the conversation's prefixes with the
same chat template (`add_generation_prompt=True` marks where a reply starts; the reply ends at the
template's end-of-turn token, the tokenizer's EOS, which is trained on so the model learns to stop)
instead of searching for marker strings, and a template whose prefixes are not token prefixes of the
whole conversation is rejected rather than silently mis-masked. Masks follow `icepop.types`:
loss_mask[j] is True when input_ids[j+1] is an assistant token, so it lines up with logits[:, :-1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icepop.data.prompts import Messages, chat_ids, load_rows, row_messages
from icepop.data.tasks import TASKS, generate_problems
from icepop.types import SFTBatch


@dataclass
class SFTExample:
    """One tokenized conversation."""

    input_ids: list[int]
    loss_mask: list[bool]
    """len(input_ids) - 1 entries; entry j is True when input_ids[j+1] belongs to an assistant reply."""


@dataclass
class SFTSet:
    """SFT examples, and how many conversations did not make it."""

    examples: list[SFTExample]
    num_overlong: int = 0
    """Dropped because the conversation had more than max_tokens tokens."""
    num_malformed: int = 0
    """Dropped for a missing messages list or no assistant turn (only with skip_malformed=True)."""

    def stats(self) -> dict[str, float]:
        return {
            "data/examples": float(len(self.examples)),
            "data/overlong_dropped": float(self.num_overlong),
            "data/malformed_dropped": float(self.num_malformed),
        }


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


def builtin_sft_examples(
    task: str, tokenizer: Any, count: int, seed: int, max_tokens: int | None = None, **task_options: Any
) -> SFTSet:
    """`count` problems of a built-in task with their target replies as the assistant turn."""
    examples, overlong = [], 0
    for problem in generate_problems(task, seed, count, **task_options):
        messages = [*problem.messages, {"role": "assistant", "content": problem.target_reply}]
        example = tokenize_conversation(messages, tokenizer)
        if max_tokens is not None and len(example.input_ids) > max_tokens:
            overlong += 1
            continue
        examples.append(example)
    return SFTSet(examples, num_overlong=overlong)


def dataset_sft_examples(
    source: str,
    tokenizer: Any,
    messages_field: str = "messages",
    max_tokens: int | None = None,
    split: str = "train",
    skip_malformed: bool = False,
) -> SFTSet:
    """SFT examples from dataset rows whose `messages_field` holds a chat with an assistant turn."""
    rows = load_rows(source, split)
    if messages_field not in rows.column_names:
        raise ValueError(f"{source!r} has no column {messages_field!r}; its columns are {rows.column_names}")
    examples, overlong, malformed = [], 0, 0
    for index, row in enumerate(rows):
        messages = row_messages(row[messages_field], index, messages_field)
        if messages is None or not any(m["role"] == "assistant" for m in messages):
            if not skip_malformed:
                raise ValueError(
                    f"{source!r} row {index}: field {messages_field!r} must be a list of messages with at "
                    "least one assistant turn (or set skip_malformed to drop such rows)"
                )
            malformed += 1
            continue
        example = tokenize_conversation(messages, tokenizer)
        if max_tokens is not None and len(example.input_ids) > max_tokens:
            overlong += 1
            continue
        examples.append(example)
    return SFTSet(examples, num_overlong=overlong, num_malformed=malformed)


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
    if source in TASKS:
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
