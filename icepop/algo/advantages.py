"""Group-relative advantages (docs/algorithm.md §4): GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline.

Rewards arrive as one scalar per response, [B], with `group_ids` [B] saying which prompt each
response answers (any integers; groups need not be contiguous nor equal in size). Sequence-level
advantages are [B]; `to_tokens` broadcasts them onto the response tokens. `token_advantages` is the
registry: the estimator by name (`ADVANTAGES`), [B, T] on the valid tokens, and an error for any other.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
"""The advantage estimators `token_advantages` dispatches on (algo.advantage)."""


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index 0..G-1 for each response, and G."""
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max().item()) + 1 if index.numel() else 0


def group_mean_std(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per response: its group's mean reward, unbiased std (1 for a group of one) and size; [B] each."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    index, groups = _group_index(group_ids)
    size = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, index, torch.ones_like(rewards)
    )
    total = torch.zeros_like(size).index_add_(0, index, rewards)
    mean = total / size
    sq_dev = torch.zeros_like(size).index_add_(0, index, (rewards - mean[index]) ** 2)
    # Unbiased variance; a group of one has no spread: std 1 (its numerator R − mean is 0 anyway).
    std = torch.where(size > 1, torch.sqrt(sq_dev / (size - 1).clamp(min=1)), torch.ones_like(size))
    return mean[index], std[index], size[index]


def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: Â_i = (R_i − mean_g R) / (std_g R + eps), std unbiased. [B]"""
    mean, std, _ = group_mean_std(rewards, group_ids)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783): Â_i = R_i − mean_g R, no std; pair with seq-mean-token-sum-norm. [B]"""
    mean, _, _ = group_mean_std(rewards, group_ids)
    return rewards - mean


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO: Â_i = R_i − mean_{j≠i} R_j = n/(n−1) · (R_i − mean_g R); 0 for a group of one. [B]"""
    mean, _, size = group_mean_std(rewards, group_ids)
    scale = torch.where(size > 1, size / (size - 1).clamp(min=1), torch.zeros_like(size))
    return scale * (rewards - mean)


def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_ids: Tensor, response_mask: Tensor, eps: float = 1e-6
) -> Tensor:
    """REINFORCE++-baseline: R_i − mean_g R on every token, then whitened over the valid tokens. [B, T]

    Whitening uses the mean and unbiased std over all valid tokens of the batch.
    """
    centred = to_tokens(dr_grpo_advantages(rewards, group_ids), response_mask)
    valid = centred[response_mask]
    if valid.numel() < 2:
        return centred
    whitened = (centred - valid.mean()) / (valid.std() + eps)
    return torch.where(response_mask, whitened, torch.zeros_like(whitened))


def to_tokens(sequence_advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Broadcast [B] advantages onto the valid tokens of [B, T]; 0 on padding."""
    expanded = sequence_advantages[:, None].expand(response_mask.shape)
    return torch.where(response_mask, expanded, torch.zeros_like(expanded))


def token_advantages(name: str, rewards: Tensor, group_ids: Tensor, response_mask: Tensor) -> Tensor:
    """The estimator `name`'s advantages on the valid tokens of [B, T], 0 elsewhere: the sequence-level
    ones broadcast, REINFORCE++-baseline whitened over the batch's tokens. ValueError for other names."""
    if name == "grpo":
        return to_tokens(grpo_advantages(rewards, group_ids), response_mask)
    elif name == "dr_grpo":
        return to_tokens(dr_grpo_advantages(rewards, group_ids), response_mask)
    elif name == "rloo":
        return to_tokens(rloo_advantages(rewards, group_ids), response_mask)
    elif name == "reinforce_pp":
        return reinforce_pp_baseline_advantages(rewards, group_ids, response_mask)
    raise ValueError(f"advantage={name!r} is not one of {', '.join(ADVANTAGES)}")
