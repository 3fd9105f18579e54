"""What is trained on: the model and the data."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.checks import DTYPES, one_of, positive


@dataclass
class ModelConfig:
    path: str = "tiny:dense"
    """A Hugging Face folder or hub id, or "tiny:dense" / "tiny:moe" for the built-in offline models."""
    sft_warmup: bool = True
    """RLVR on a built-in tiny model: start from its cached SFT checkpoint, running SFT first if missing."""
    dtype: str = "float32"
    """Trainer parameter dtype: "float32" or "bfloat16"."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models)."""

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class DataConfig:
    source: str = "countdown"
    """Built-in task ("countdown", "arithmetic"), a local .jsonl/.json/.parquet file, or a hub dataset."""
    prompt_field: str = "prompt"
    """Dataset column with the prompt: a string (one user message) or a list of chat messages."""
    answer_field: str = "answer"
    """Dataset column with the ground truth the verifier checks against."""
    task_field: str | None = None
    """Dataset column naming each row's verifier; None uses `reward.task` for every row."""
    split: str = "train"
    """Dataset split to read."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (after the chat template) are dropped and counted."""
    size: int = 20000
    """RL prompts generated for a built-in task (the pool each step samples from)."""
    eval_size: int = 64
    """Held-out problems for evaluation and the weight-sync probe (built-in tasks: another seed)."""

    def __post_init__(self) -> None:
        positive(
            **{
                "data.max_prompt_tokens": self.max_prompt_tokens,
                "data.size": self.size,
                "data.eval_size": self.eval_size,
            }
        )
