"""Plain data passed between the layers: prompts, completions, and the padded training batches.

Token-level tensors in training batches are *label-aligned*: for input_ids [B, L], position j of a
[B, L-1] tensor describes token input_ids[:, j+1] as predicted from the prefix up to j, which is how
logits[:, :-1] line up with labels input_ids[:, 1:]. Sequences are right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from torch import Tensor


@dataclass
class Prompt:
    """One prompt to sample from, with what its reward function needs to score an answer."""

    prompt_ids: list[int]
    """Token ids of the chat-templated prompt, ending where the assistant's reply begins."""
    answer: Any = None
    """Ground truth for the verifier (a number, a target and numbers for countdown, a string)."""
    task: str = ""
    """Name of the task or dataset the prompt came from (selects the verifier)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else a custom reward function wants (passed through untouched)."""


@dataclass
class Problem:
    """One generated problem: the chat to prompt with, the verifier's answer and an SFT reply."""

    task: str
    """The verifier: "arithmetic", "countdown" or "code" (humaneval)."""
    messages: list[dict[str, str]]
    """System prompt (the reply format) and the user question, as chat messages."""
    answer: Any
    """arithmetic: the int result; countdown: {"target": int, "numbers": list[int]}; humaneval:
    {"task_id", "prompt", "test", "entry_point"} (see icepop.rewards.verifiers, "code")."""
    target_reply: str
    """A correct reply in the task's format, the assistant turn for SFT warm-up."""


@dataclass
class Completion:
    """One sampled response as the inference engine produced it."""

    token_ids: list[int]
    """Response token ids (EOS included when the engine stopped on it)."""
    logprobs: list[float]
    """ℓ_inf per response token under the processed sampling distribution; len == len(token_ids)."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (truncated at max_new_tokens)."""
    text: str = ""
    """Detokenised response."""
    model_mask: list[bool] | None = None
    """Multi-turn episodes (icepop.rollout.episodes): per token, whether the model produced it (False:
    an environment's observation, which is context only: no ratio, no loss, ℓ_inf 0.0). None: all."""
    prompt_ids: list[int] | None = None
    """Multi-turn episodes: the prompt the environment began the episode with (None: the Prompt's)."""
    reward: float | None = None
    """Multi-turn episodes: the environment's reward (the sum of its turns' contributions)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Multi-turn episodes: per-episode counts (turns, observation tokens, environment errors, ...)."""


@dataclass
class SamplingSettings:
    """How the engine samples; the trainer must apply the same temperature (docs/algorithm.md §1)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None


@dataclass
class RLBatch:
    """A padded batch for the RL update. input_ids/attention_mask are [B, L]; the rest [B, L-1]."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None


@dataclass
class SFTBatch:
    """A padded batch for supervised fine-tuning; loss_mask [B, L-1] marks assistant tokens."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor


@dataclass
class PreferenceBatch:
    """Preference pairs for a reward model, right-padded: rows 0..B-1 are the chosen conversations and
    rows B..2B-1 the rejected ones, row B+i pairing with row i. The score is read at each row's last
    non-padding token."""

    input_ids: Tensor  # [2B, L]
    attention_mask: Tensor  # [2B, L]


Batch = TypeVar("Batch", RLBatch, SFTBatch)


def select_rows(batch: Batch, rows: slice | Tensor) -> Batch:
    """Rows of every tensor field (a slice or row indices), trimmed to the longest sequence among them
    (right padding only, so the cut is exact; at least 2 tokens, the fewest a batch may hold)."""
    length = batch.input_ids.shape[1]
    width = min(length, max(2, int(batch.attention_mask[rows].sum(dim=1).max())))
    values = {}
    for f in fields(batch):
        tensor = getattr(batch, f.name)
        if tensor is None:
            values[f.name] = None
        elif f.name in ("input_ids", "attention_mask"):
            values[f.name] = tensor[rows, :width]
        else:
            values[f.name] = tensor[rows, : width - 1]
    return replace(batch, **values)


def blocks(items: int, parts: int) -> list[slice]:
    """`parts` contiguous slices covering range(items), sizes differing by at most one."""
    bounds = [items * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
