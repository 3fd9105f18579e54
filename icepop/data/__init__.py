"""Data: built-in verifiable tasks, RL prompt sets and their per-step sampler, SFT conversations.

`datasets` is imported only when a dataset source is loaded.
"""

from icepop.data.prompts import (
    PromptSet,
    ShuffledBatches,
    builtin_prompts,
    chat_ids,
    dataset_prompts,
    load_prompts,
)
from icepop.data.rows import load_rows
from icepop.data.sft import (
    SFTExample,
    SFTSet,
    builtin_sft_examples,
    collate_sft,
    dataset_sft_examples,
    load_sft_examples,
    tokenize_conversation,
)
from icepop.data.tasks import TASKS, generate_problems, is_generated, problem, solve_countdown
from icepop.types import Problem

__all__ = [
    "TASKS",
    "Problem",
    "PromptSet",
    "SFTExample",
    "SFTSet",
    "ShuffledBatches",
    "builtin_prompts",
    "builtin_sft_examples",
    "chat_ids",
    "collate_sft",
    "dataset_prompts",
    "dataset_sft_examples",
    "generate_problems",
    "is_generated",
    "load_prompts",
    "load_rows",
    "load_sft_examples",
    "problem",
    "solve_countdown",
    "tokenize_conversation",
]
