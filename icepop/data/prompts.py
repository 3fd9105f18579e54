"""RL prompts: built-in tasks or dataset rows → chat-templated `Prompt`s, and the per-step sampler.

Key design choices: every prompt is tokenized once, up front, with the tokenizer's own chat template
(what the inference engine will be fed, token for token), and overlong prompts are dropped there and
counted rather than truncated mid-question. Malformed rows raise a ValueError naming the row index
and the field (or, with `skip_malformed=True`, are dropped and counted). `ShuffledBatches` draws each
epoch's order from (seed, epoch) alone, so its state is two integers a checkpoint can hold.

Also the pieces every data loader shares: chat-message validation that names what is wrong
(`parse_messages`), the skipped-rows record (reason → row indices) with its stats, log line and
"nothing usable" error, and the deterministic held-out split (`split_holdout`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from icepop.data.rows import CHAT_FIELD, field_value, load_rows
from icepop.data.tasks import generate_problems, is_generated
from icepop.types import Prompt

T = TypeVar("T")
Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")

Skipped = dict[str, list[int]]
"""Source rows left out of a data set: reason → every skipped row index (0-based), in row order."""
OVERLONG = "overlong"
"""The skip reason for rows over the token limit; every other reason counts as malformed."""
MESSAGE_SKIP_REASONS = {
    "no_messages": "no messages",
    "bad_message": "a message without str role and content",
    "bad_role": "a role other than system/user/assistant",
    "empty_content": "empty content",
}
"""`parse_messages`' reasons and how a log line names them."""
SHOWN_ROWS = 5
"""Row indices a log line or error shows per reason."""


@dataclass
class PromptSet:
    """Prompts ready for rollout, and how many source rows did not make it."""

    prompts: list[Prompt]
    num_overlong: int = 0
    """Dropped because the templated prompt had more than max_prompt_tokens tokens."""
    num_malformed: int = 0
    """Dropped for a missing/empty prompt or answer (only with skip_malformed=True)."""

    def stats(self) -> dict[str, float]:
        return {
            "data/prompts": float(len(self.prompts)),
            "data/overlong_dropped": float(self.num_overlong),
            "data/malformed_dropped": float(self.num_malformed),
        }


class ChatTokenizer:
    """A tokenizer whose chat template always gets a run's options: a system message before every
    conversation that has none, and extra template arguments (Qwen3's `enable_thinking`). Everything
    else is the wrapped tokenizer's, so every prompt, SFT conversation and preference pair of a run is
    formatted alike."""

    def __init__(
        self, tokenizer: Any, system_prompt: str | None = None, template_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.template_kwargs = dict(template_kwargs or {})

    def apply_chat_template(self, messages: Messages, **kwargs: Any) -> Any:
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, **{**self.template_kwargs, **kwargs})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def chat_ids(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (a plain list, not a BatchEncoding)."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return [int(i) for i in ids]


def row_messages(value: Any, index: int, field: str) -> Messages | None:
    """A row's prompt as chat messages: a string becomes one user message; None when empty."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if value is None or (isinstance(value, list) and not value):
        return None
    well_formed = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not well_formed:
        raise ValueError(
            f"row {index}: field {field!r} must be a string or a list of "
            f'{{"role": str, "content": str}} messages, got {value!r:.200}'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def parse_messages(value: Any) -> tuple[Messages | None, str | None]:
    """(messages, None) for a non-empty list of {"role", "content"} dicts with a role in ROLES and
    non-blank content, else (None, reason) with a key of MESSAGE_SKIP_REASONS. Never raises."""
    if not isinstance(value, list) or not value:
        return None, "no_messages"
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return None, "bad_message"
    if any(m["role"] not in ROLES for m in value):
        return None, "bad_role"
    if any(not m["content"].strip() for m in value):
        return None, "empty_content"
    return [{"role": m["role"], "content": m["content"]} for m in value], None


def _rows_text(indices: list[int]) -> str:
    """ "row 90", "rows 4, 17" or "rows 1, 2, 3, 4, 5 and 7 more"."""
    shown = ", ".join(str(i) for i in indices[:SHOWN_ROWS])
    more = f" and {len(indices) - SHOWN_ROWS} more" if len(indices) > SHOWN_ROWS else ""
    return f"row {shown}" if len(indices) == 1 else f"rows {shown}{more}"


def describe_skipped(skipped: Skipped, labels: dict[str, str]) -> str:
    """ "skipped 3 malformed (empty content: rows 4, 17; no assistant turn: row 90), 2 over-long (rows
    5, 8)", or "none skipped"; `labels` names the reasons, in the order they are listed."""
    malformed = [reason for reason in labels if reason != OVERLONG and skipped.get(reason)]
    parts = []
    if malformed:
        count = sum(len(skipped[reason]) for reason in malformed)
        details = "; ".join(f"{labels[reason]}: {_rows_text(skipped[reason])}" for reason in malformed)
        parts.append(f"{count} malformed ({details})")
    if skipped.get(OVERLONG):
        parts.append(f"{len(skipped[OVERLONG])} over-long ({_rows_text(skipped[OVERLONG])})")
    return "skipped " + ", ".join(parts) if parts else "none skipped"


def describe_data(count: int, noun: str, source: str, skipped: Skipped, labels: dict[str, str]) -> str:
    """One log line: "icepop data: 950 conversations from train.jsonl; skipped 3 malformed (…)"."""
    return f"icepop data: {count} {noun} from {source}; {describe_skipped(skipped, labels)}"


def skipped_stats(skipped: Skipped, labels: dict[str, str]) -> dict[str, float]:
    """data/overlong_dropped, data/malformed_dropped, and data/skipped_<reason> for every reason."""
    overlong = len(skipped.get(OVERLONG, []))
    return {
        "data/overlong_dropped": float(overlong),
        "data/malformed_dropped": float(sum(len(rows) for rows in skipped.values()) - overlong),
        **{f"data/skipped_{reason}": float(len(skipped.get(reason, []))) for reason in labels},
    }


def nothing_usable(
    source: str, noun: str, skipped: Skipped, labels: dict[str, str], valid_row: str | None
) -> ValueError:
    """The error for a source none of whose rows can be used: what was skipped, and what a valid row
    looks like (left out when None, for generated data)."""
    found = describe_skipped(skipped, labels) if skipped else "it has no rows"
    hint = " (raise max_tokens to keep the over-long ones)" if skipped.get(OVERLONG) else ""
    example = f". A valid row looks like {valid_row}" if valid_row is not None else ""
    return ValueError(
        f"{source!r} has no usable {noun}: {found}{hint}; row indices count data rows from 0{example}"
    )


def split_holdout(examples: Sequence[T], count: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out): `count` examples drawn at random from (seed) alone, but never more than half
    of them (len // 2), so training always keeps at least as many. Both keep the input order and
    are disjoint; together they are `examples`. For SFT validation loss and reward-model accuracy."""
    if count < 0:
        raise ValueError(f"held-out count={count} must be 0 or more")
    size = min(count, len(examples) // 2)
    held = set(random.Random(f"holdout/{seed}").sample(range(len(examples)), size))
    train = [example for index, example in enumerate(examples) if index not in held]
    return train, [example for index, example in enumerate(examples) if index in held]


def builtin_prompts(
    task: str, tokenizer: Any, count: int, seed: int, max_prompt_tokens: int, **task_options: Any
) -> PromptSet:
    """`count` problems of a built-in task (see icepop.data.tasks) as prompts."""
    prompts, overlong = [], 0
    for problem in generate_problems(task, seed, count, **task_options):
        ids = chat_ids(tokenizer, problem.messages, add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            overlong += 1
            continue
        meta = {"messages": problem.messages, "reference": problem.target_reply}
        prompts.append(Prompt(ids, problem.answer, problem.task, meta))
    return PromptSet(prompts, num_overlong=overlong)


def dataset_prompts(
    source: str,
    tokenizer: Any,
    max_prompt_tokens: int,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    task_field: str | None = None,
    task: str = "math",
    split: str = "train",
    subset: str | None = None,
    skip_malformed: bool = False,
) -> PromptSet:
    """Prompts from dataset rows. The prompt field holds a string or a messages list (chat rows: the
    `CHAT_FIELD` column when there is no prompt column); fields may be dotted paths into nested columns;
    answer_field=None means rows carry no answer (a reward model scores them); the task comes from
    task_field or `task`. Other columns are kept in `Prompt.meta` for custom reward functions."""
    rows = load_rows(source, split, subset)
    if prompt_field == "prompt" and "prompt" not in rows.column_names and CHAT_FIELD in rows.column_names:
        prompt_field = CHAT_FIELD
    fields = {"prompt_field": prompt_field, "answer_field": answer_field, "task_field": task_field}
    for param, name in fields.items():
        column = None if name is None else name.split(".")[0]
        if column is not None and column not in rows.column_names:
            raise ValueError(
                f"{source!r} ({split} split) has no column {column!r} (data.{param}); its columns are "
                f"{rows.column_names}"
            )
    used = {name.split(".")[0] for name in fields.values() if name is not None}
    prompts, overlong, malformed = [], 0, 0
    for index, row in enumerate(rows):
        messages = row_messages(field_value(row, prompt_field, index), index, prompt_field)
        if messages and len(messages) > 1 and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a chat row's reply: the prompt is what comes before it
        answer = field_value(row, answer_field, index) if answer_field is not None else None
        row_task = field_value(row, task_field, index) if task_field is not None else task
        checks = (
            (prompt_field, messages is None),
            (answer_field, _is_empty(answer)),
            (task_field, not row_task),
        )
        missing = [name for name, empty in checks if name is not None and empty]
        if missing and not skip_malformed:
            raise ValueError(
                f"{source!r} row {index}: field {missing[0]!r} is missing or empty; every row needs one "
                "(map the right column with the field names, or set skip_malformed to drop such rows)"
            )
        if missing:
            malformed += 1
            continue
        ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            overlong += 1
            continue
        meta = {key: value for key, value in row.items() if key not in used} | {"messages": messages}
        prompts.append(Prompt(ids, answer, row_task, meta))
    return PromptSet(prompts, num_overlong=overlong, num_malformed=malformed)


def load_prompts(
    source: str, tokenizer: Any, max_prompt_tokens: int, count: int = 1000, seed: int = 0, **options: Any
) -> PromptSet:
    """A generated task by name (built-in "arithmetic", "countdown", "humaneval", or
    "reasoning_gym:<name>"; count/seed/options shape it), else a dataset file, folder or hub name
    (options go to `dataset_prompts`; count and seed are not used)."""
    if is_generated(source):
        return builtin_prompts(source, tokenizer, count, seed, max_prompt_tokens, **options)
    else:
        return dataset_prompts(source, tokenizer, max_prompt_tokens, **options)


def epoch_shuffle(size: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(size) drawn from (seed, epoch) alone."""
    order = list(range(size))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


class ShuffledBatches(Generic[T]):
    """Endless fixed-size batches of `items`, reshuffled every epoch from (seed, epoch).

    For RL, batch_size is prompts_per_step. A batch that reaches the end of an epoch is completed
    from the next one, so every batch is full. `state_dict()`/`load_state_dict()` save and restore the
    position exactly (the order itself is recomputed from the seed). `epoch_order(epoch)` replaces
    the plain shuffle with another permutation of the item indices that is a function of the epoch
    alone (`icepop.data.sft.LengthGroupedBatches` groups by length that way).
    """

    def __init__(
        self,
        items: Sequence[T],
        batch_size: int,
        seed: int,
        epoch_order: Callable[[int], list[int]] | None = None,
    ) -> None:
        if not 1 <= batch_size <= len(items):
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the {len(items)} items available"
            )
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.position = 0, 0
        self._shuffled = epoch_order or (lambda epoch: epoch_shuffle(len(items), seed, epoch))
        self._order = self._shuffled(0)

    def __iter__(self) -> ShuffledBatches[T]:
        return self

    def __next__(self) -> list[T]:
        return self.next_batch()

    def next_batch(self, size: int | None = None) -> list[T]:
        """The next `size` items (default: batch_size) in this epoch's order, continuing into the next."""
        size = self.batch_size if size is None else size
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.items[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position: epoch and index into that epoch's order."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not 0 <= state["position"] <= len(self.items):
            raise ValueError(f"position {state['position']} is outside the {len(self.items)} items")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
