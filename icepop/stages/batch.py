"""Padded, label-aligned training batches from prompts and completions, and their rank shards.

Layout (see icepop/types.py): input_ids/attention_mask are [B, L], right-padded; every per-token
tensor is [B, L-1] and position j describes token j+1, so a response that starts at prompt length P
occupies label positions P-1 … P-1+len(response)-1.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from icepop.algo import overlong_penalty
from icepop.types import Batch, Completion, Prompt, RLBatch, select_rows


def rl_batch(
    prompts: list[Prompt], groups: list[list[Completion]], advantages: Tensor, pad_id: int
) -> RLBatch:
    """One row per completion, in prompt order; `advantages` is [rows], one value per completion. A
    multi-turn episode's row is its own prompt and all its tokens; response_mask marks the model's."""
    rows = [
        (completion.prompt_ids or prompt.prompt_ids, completion)
        for prompt, group in zip(prompts, groups, strict=True)
        for completion in group
    ]
    if advantages.shape != (len(rows),):
        raise ValueError(
            f"advantages must be [{len(rows)}] (one per completion); got {tuple(advantages.shape)}"
        )
    length = max(len(p) + len(c.token_ids) for p, c in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    response_mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    rollout_logprobs = torch.zeros(len(rows), length - 1, dtype=torch.float32)
    token_advantages = torch.zeros(len(rows), length - 1, dtype=torch.float32)
    for i, (prompt_ids, completion) in enumerate(rows):
        ids = prompt_ids + completion.token_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        span = slice(len(prompt_ids) - 1, len(ids) - 1)
        # Multi-turn: only the model's own tokens are trained on; observations are context.
        model = torch.ones(len(completion.token_ids), dtype=torch.bool)
        if completion.model_mask is not None:
            model = torch.tensor(completion.model_mask, dtype=torch.bool)
        response_mask[i, span] = model
        rollout_logprobs[i, span] = torch.tensor(completion.logprobs, dtype=torch.float32) * model
        token_advantages[i, span] = float(advantages[i]) * model
    return RLBatch(input_ids, attention_mask, response_mask, rollout_logprobs, token_advantages)


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """`parts` contiguous blocks of rows of (almost) equal size, each trimmed; rows must divide evenly."""
    rows = batch.input_ids.shape[0]
    if rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} equal parts")
    size = rows // parts
    return [select_rows(batch, slice(i * size, (i + 1) * size)) for i in range(parts)]


def sequence_count(mask: Tensor) -> int:
    """Sequences with at least one valid token."""
    return int((mask.sum(dim=-1) > 0).sum())


def concat_rows(blocks: list[Tensor], width: int) -> Tensor:
    """Stack per-rank [rows, width_r] blocks (each trimmed to its own longest row) into [rows, width]."""
    return torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1])) for b in blocks])


def rescored_logprobs(
    prompts: list[Prompt], groups: list[list[Completion]], scores: list[list[list[float]]], pad_id: int
) -> Tensor:
    """The engines' rescored log-probs of the groups' response tokens (one list of rows per engine, each
    row a whole sequence's after its first token: icepop.ray.staleness.rescore), laid out like the batch's
    ℓ_inf."""
    flat = iter(row for share in scores for row in share)
    rescored = [
        [replace(c, logprobs=(row := next(flat))[len(row) - len(c.token_ids) :]) for c in group]
        for group in groups
    ]
    return rl_batch(prompts, rescored, torch.zeros(sum(map(len, rescored))), pad_id).rollout_logprobs


def overlong_shaping(buffer: int, penalty: float, completions: list[Completion], limit: int) -> Tensor:
    """algo.overlong_buffer's DAPO penalty for each completion's tokens after its prompt (an episode's
    observations included, like its budget `limit`); zeros when the buffer is 0. float32, [B]."""
    if not buffer:
        return torch.zeros(len(completions))
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    return overlong_penalty(lengths, limit, buffer, penalty).float()
