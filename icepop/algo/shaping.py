"""What DAPO (arXiv 2503.14476) does to rewards and groups before the advantages (docs/algorithm.md §11):
the soft overlong punishment, and the test dynamic sampling filters groups by."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to each reply's reward: 0 up to max_length − buffer tokens,
    then falling linearly to −factor at max_length, −factor beyond; [B] like `lengths` (float)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer={buffer} must be in [1, max_length={max_length}]")
    lengths = lengths.to(torch.float64)
    ramp = ((max_length - buffer) - lengths) / buffer
    penalty = torch.where(lengths <= max_length - buffer, torch.zeros_like(lengths), ramp)
    return factor * torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[G] bool: the groups (consecutive `group_size` rewards) whose rewards are not all equal — the ones
    a group-relative advantage can learn from; dynamic sampling keeps only these."""
    groups = rewards.view(-1, group_size)
    return groups.max(dim=1).values != groups.min(dim=1).values
