"""Prompt sets from built-in tasks and dataset files, the epoch sampler, and SFT tokenization/masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_helpers import write_jsonl

from icepop.data import (
    ShuffledBatches,
    builtin_sft_examples,
    collate_sft,
    dataset_sft_examples,
    generate_problems,
    load_prompts,
    load_sft_examples,
    tokenize_conversation,
)


def test_builtin_prompts_are_chat_templated_and_short(tokenizer: Any) -> None:
    prompt_set = load_prompts("arithmetic", tokenizer, max_prompt_tokens=64, count=50, seed=3)
    problems = list(generate_problems("arithmetic", seed=3, count=50))
    assert len(prompt_set.prompts) == 50 and prompt_set.num_overlong == 0
    first = prompt_set.prompts[0]
    question = problems[0].messages[1]["content"]
    assert tokenizer.decode(first.prompt_ids) == (
        "<|im_start|>system\nAnswer with the number only.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (first.answer, first.task) == (problems[0].answer, "arithmetic")
    assert first.meta["reference"] == problems[0].target_reply
    # Short enough for a ~1M-parameter model: about 30 tokens (countdown: about 60).
    assert max(len(p.prompt_ids) for p in prompt_set.prompts) <= 40
    countdown = load_prompts("countdown", tokenizer, max_prompt_tokens=80, count=50, seed=3)
    assert max(len(p.prompt_ids) for p in countdown.prompts) <= 80 and countdown.num_overlong == 0
    assert load_prompts("arithmetic", tokenizer, 64, count=50, seed=3).prompts == prompt_set.prompts


def test_overlong_prompts_are_dropped_and_counted(tokenizer: Any) -> None:
    full = load_prompts("countdown", tokenizer, max_prompt_tokens=1000, count=200, seed=0).prompts
    lengths = sorted(len(p.prompt_ids) for p in full)
    limit = lengths[100]  # 3 or 4 numbers of 1 or 2 digits: prompts of several lengths
    expected_dropped = sum(length > limit for length in lengths)
    assert 0 < expected_dropped < 200
    kept = load_prompts("countdown", tokenizer, max_prompt_tokens=limit, count=200, seed=0)
    assert kept.num_overlong == expected_dropped
    assert len(kept.prompts) == 200 - expected_dropped
    assert all(len(p.prompt_ids) <= limit for p in kept.prompts)
    assert kept.stats()["data/overlong_dropped"] == expected_dropped


ROWS = [
    {"question": "What is 2 + 2?", "solution": "4", "kind": "arithmetic", "source": "a"},
    {"question": [{"role": "user", "content": "Make 6 from [2, 3]."}], "solution": "6", "kind": "math"},
    {"question": "What is 1 + 1?", "solution": "2", "kind": "arithmetic", "source": "c"},
]


def test_jsonl_with_field_mapping(tmp_path: Path, tokenizer: Any) -> None:
    # A string prompt in one row and a messages list in another cannot share a json column type;
    # keep each file homogeneous as datasets requires: strings here, messages in the parquet test.
    rows = [ROWS[0], ROWS[2]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    fields = {"prompt_field": "question", "answer_field": "solution", "task_field": "kind"}
    prompt_set = load_prompts(path, tokenizer, max_prompt_tokens=64, **fields)
    assert [(p.answer, p.task) for p in prompt_set.prompts] == [("4", "arithmetic"), ("2", "arithmetic")]
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_dict=False
    )
    assert prompt_set.prompts[0].prompt_ids == expected
    assert prompt_set.prompts[0].meta["source"] == "a"  # other columns pass through to reward functions
    # Without a task column every row gets the `task` argument (default "math": math-verify).
    no_task = load_prompts(
        path, tokenizer, max_prompt_tokens=64, prompt_field="question", answer_field="solution"
    )
    assert {p.task for p in no_task.prompts} == {"math"}


def test_parquet_with_messages_prompts(tmp_path: Path, tokenizer: Any) -> None:
    import datasets

    path = tmp_path / "rows.parquet"
    rows = [{**ROWS[1], "source": "b"}, {**ROWS[1], "solution": "7"}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    prompt_set = load_prompts(
        str(path), tokenizer, 64, prompt_field="question", answer_field="solution", task_field="kind"
    )
    assert [p.answer for p in prompt_set.prompts] == ["6", "7"]
    assert tokenizer.decode(prompt_set.prompts[0].prompt_ids) == (
        "<|im_start|>user\nMake 6 from [2, 3].<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt_set.prompts[0].meta["messages"] == ROWS[1]["question"]


def test_the_layouts_people_have_load_with_one_setting_each(tmp_path: Path, tokenizer: Any) -> None:
    """Chat rows (`messages`, their reply left out), verl's parquet (`prompt` messages, nested
    `reward_model.ground_truth`) and TRL's (`prompt` messages, `solution`): what README's commands set."""
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    expected = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    reply = {"role": "assistant", "content": "4"}
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [*question, reply], "answer": "4"}])
    (row,) = load_prompts(chat, tokenizer, 64).prompts  # no data.prompt_field needed
    assert row.prompt_ids == expected and row.answer == "4" and row.meta["messages"] == question

    import datasets

    verl = tmp_path / "verl.parquet"
    datasets.Dataset.from_list([{
        "data_source": "openai/gsm8k", "prompt": question, "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 0},
    }]).to_parquet(str(verl))  # fmt: skip
    (row,) = load_prompts(str(verl), tokenizer, 64, answer_field="reward_model.ground_truth").prompts
    assert row.prompt_ids == expected and row.answer == "4" and row.task == "math"
    assert row.meta["extra_info"] == {"index": 0}  # the other columns still reach a reward function
    with pytest.raises(ValueError, match=r"'reward_model.truth': reward_model has no key 'truth'"):
        load_prompts(str(verl), tokenizer, 64, answer_field="reward_model.truth")

    trl = tmp_path / "trl.parquet"
    datasets.Dataset.from_list([{"prompt": question, "solution": "4"}]).to_parquet(str(trl))
    (row,) = load_prompts(str(trl), tokenizer, 64, answer_field="solution").prompts
    assert row.prompt_ids == expected and row.answer == "4"


def test_malformed_rows_name_the_row_or_are_skipped(tmp_path: Path, tokenizer: Any) -> None:
    rows = [ROWS[0], {**ROWS[2], "solution": ""}, {**ROWS[0], "question": "  "}, ROWS[2]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    fields = {"prompt_field": "question", "answer_field": "solution"}
    with pytest.raises(ValueError, match=r"row 1: field 'solution' is missing or empty"):
        load_prompts(path, tokenizer, 64, **fields)
    skipped = load_prompts(path, tokenizer, 64, skip_malformed=True, **fields)
    assert (len(skipped.prompts), skipped.num_malformed) == (2, 2)
    with pytest.raises(ValueError, match=r"no column 'answer'.*columns are"):
        load_prompts(path, tokenizer, 64, prompt_field="question")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"), tokenizer, 64)
    bad_messages = write_jsonl(tmp_path / "msgs.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ValueError, match=r"row 0: field 'prompt' must be a string or a list"):
        load_prompts(bad_messages, tokenizer, 64)


def test_shuffled_batches_cover_each_epoch_and_resume_exactly() -> None:
    items = list(range(10))
    batches = ShuffledBatches(items, batch_size=5, seed=1)
    epoch0 = next(batches) + next(batches)
    epoch1 = next(batches) + next(batches)
    assert sorted(epoch0) == items and sorted(epoch1) == items and epoch0 != epoch1
    again = ShuffledBatches(items, batch_size=5, seed=1)
    assert again.next_batch() + again.next_batch() == epoch0  # deterministic from the seed
    # A batch that crosses the end of an epoch is completed from the next one.
    odd = ShuffledBatches(items, batch_size=4, seed=2)
    crossing = [odd.next_batch() for _ in range(3)]
    assert all(len(b) == 4 for b in crossing) and odd.state_dict() == {"epoch": 1, "position": 2}
    # Save, keep going, restore: the continuation repeats exactly.
    state = odd.state_dict()
    expected = [odd.next_batch() for _ in range(4)]
    restored = ShuffledBatches(items, batch_size=4, seed=2)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(4)] == expected
    assert len(odd.next_batch(7)) == 7  # a caller may ask for another size (prompts_per_step)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatches(items, batch_size=11, seed=0)


def _masked_text(tokenizer: Any, input_ids: list[int], loss_mask: list[bool]) -> str:
    """Decode the labels (input_ids shifted by one) where the label-aligned mask is True."""
    labels = input_ids[1:]
    assert len(loss_mask) == len(labels)
    return tokenizer.decode([token for token, keep in zip(labels, loss_mask, strict=True) if keep])


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_sft_mask_covers_exactly_the_reply_and_its_end_token(task: str, tokenizer: Any) -> None:
    sft = builtin_sft_examples(task, tokenizer, count=30, seed=5)
    problems = list(generate_problems(task, seed=5, count=30))
    for example, p in zip(sft.examples, problems, strict=True):
        assert _masked_text(tokenizer, example.input_ids, example.loss_mask) == p.target_reply + "<|im_end|>"
        # The masked labels are one contiguous run ending at <|im_end|>; the template's "\n" after it is not.
        first = example.loss_mask.index(True)
        run = len(tokenizer.encode(p.target_reply)) + 1
        assert example.loss_mask == [False] * first + [True] * run + [False] * (
            len(example.loss_mask) - first - run
        )
        assert example.input_ids[first + run] == tokenizer.eos_token_id


def test_sft_multi_turn_masks_every_assistant_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = tokenize_conversation(messages, tokenizer)
    assert _masked_text(tokenizer, example.input_ids, example.loss_mask) == "2<|im_end|>4<|im_end|>"
    with pytest.raises(ValueError, match="at least one assistant"):
        tokenize_conversation(messages[:1], tokenizer)


def test_sft_from_dataset_rows_and_collate(tmp_path: Path, tokenizer: Any) -> None:
    conversation = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    long = [{"role": "user", "content": "What is 10 + 20?"}, {"role": "assistant", "content": "30"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conversation}, {"messages": long}])
    sft = load_sft_examples(path, tokenizer)
    assert [_masked_text(tokenizer, e.input_ids, e.loss_mask) for e in sft.examples] == [
        "7<|im_end|>",
        "30<|im_end|>",
    ]
    batch = collate_sft(sft.examples, tokenizer.pad_token_id)
    short_len, long_len = (len(e.input_ids) for e in sft.examples)
    assert long_len == short_len + 3  # "10"/"20"/"30" each add one digit token
    assert batch.input_ids.shape == (2, long_len) and batch.loss_mask.shape == (2, long_len - 1)
    assert batch.attention_mask.sum(dim=1).tolist() == [short_len, long_len]
    assert batch.input_ids[0, short_len:].tolist() == [tokenizer.pad_token_id] * 3  # right padding
    assert batch.loss_mask[0].tolist() == sft.examples[0].loss_mask + [False] * 3
    assert batch.loss_mask[1].tolist() == sft.examples[1].loss_mask
    assert int(batch.loss_mask.sum()) == 2 + 3  # "7" + <|im_end|>, "30" + <|im_end|>
    # Too long conversations and rows without an assistant turn are skipped and counted
    # (tests/test_sft_data.py covers every reason and the log line).
    assert load_sft_examples(path, tokenizer, max_tokens=short_len).num_overlong == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation}, {"messages": conversation[:1]}])
    assert dataset_sft_examples(bad, tokenizer).skipped == {"no_assistant": [1]}
