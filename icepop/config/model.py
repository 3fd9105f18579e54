"""What is trained on: the model and the data.

The defaults here are those of a real model (a user's own `model.path`); the built-in tiny models'
presets (conf/model/tiny-*.yaml) carry their own learning rates, dtypes and lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from icepop.config.checks import DTYPES, one_of, positive


@dataclass
class ModelConfig:
    path: str = "tiny:dense"
    """A Hugging Face folder or hub id, or "tiny:dense" / "tiny:moe" for the built-in offline models."""
    sft_warmup: bool = True
    """RLVR on a built-in tiny model: start from its cached SFT checkpoint, running SFT first if missing."""
    dtype: str = "float32"
    """Trainer parameter dtype: "float32", "bfloat16" or "float16" (DeepSpeed keeps float32 master weights;
    float16 with dynamic loss scaling, on GPUs, or CPUs where DeepSpeed has float16: checks.py)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models)."""

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, DTYPES)
        if not self.path.strip():
            raise ValueError("model.path is empty; give a Hugging Face folder or hub id, or tiny:dense")


@dataclass
class DataConfig:
    source: str = "countdown"
    """Built-in task ("countdown", "arithmetic", "humaneval"), a reasoning-gym generator
    ("reasoning_gym:basic_arithmetic"), a local .jsonl/.json/.parquet file or dataset folder, or a hub
    dataset ("openai/gsm8k")."""
    subset: str | None = None
    """The dataset's configuration (subset) name, e.g. "main" for openai/gsm8k; None: its only one."""
    split: str = "train"
    """Dataset split the training prompts come from."""
    prompt_field: str = "prompt"
    """Dataset column with the prompt: a string (one user message) or a list of chat messages."""
    answer_field: str = "answer"
    """Dataset column with the ground truth the verifier checks against."""
    task_field: str | None = None
    """Dataset column naming each row's verifier; None uses `reward.task` for every row."""
    eval_source: str | None = None
    """Where held-out prompts come from (a file, folder or hub dataset with the same fields); None:
    data.source. With neither eval_source nor eval_split, the last data.eval_size rows of the training
    split are held out (and removed from training)."""
    eval_split: str | None = None
    """The split of the held-out prompts, e.g. "test"; the training split stays untouched."""
    system_prompt: str | None = None
    """A system message put before every prompt (RL, SFT and evaluation) that has none."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the tokenizer's chat template, e.g. {enable_thinking: false} for Qwen3."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options of a generated task's problems: a built-in task's (arithmetic: {digits: 3, operators:
    "+-"}) or a reasoning-gym generator's config fields ({max_terms: 2, max_digits: 2})."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the chat template) are dropped and counted."""
    size: int = 20000
    """RL prompts generated for a built-in task (the pool each step samples from)."""
    eval_size: int = 64
    """Held-out problems for evaluation and the weight-sync probe (at most this many; built-in tasks:
    another seed's problems; a dataset without data.eval_split/eval_source: its last rows, at most a
    tenth of them)."""

    def __post_init__(self) -> None:
        positive(
            **{
                "data.max_prompt_tokens": self.max_prompt_tokens,
                "data.size": self.size,
                "data.eval_size": self.eval_size,
            }
        )
        for name in ("source", "split", "prompt_field", "answer_field"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"data.{name} is empty")
