"""Framework-free pieces of the trainer backend: argument and batch checks, micro-batch slices, and
the learning-rate schedule. Checks run before the first collective call: a rank that fails mid-step
would leave the others waiting in one."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from icepop.algo import PolicyLossOptions
from icepop.types import RLBatch, SFTBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int | None) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up from lr/warmup
    to lr over `warmup_steps`, then constant, or a cosine decay reaching 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_args(zero_stage: int, dtype: str, micro_batch_size: int, lr_schedule: str, total: Any) -> None:
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3; got {zero_stage}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (sequences per forward); got {micro_batch_size}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {lr_schedule!r}")
    if lr_schedule == "cosine" and (total is None or total < 1):
        raise ValueError(f"lr_schedule='cosine' needs total_steps >= 1; got {total}")


def rows_of(batch: Any, rows: slice | None, device: torch.device) -> dict[str, Tensor | None]:
    """The batch's tensors for `rows`, on `device`; rows None gives the padding micro-batch: one
    row of two tokens whose label mask is all False, so its loss and gradient are exactly 0."""
    if rows is None:
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        fill = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {
            k: None if v is None else fill.get(k, torch.zeros(1, 1, dtype=v.dtype, device=device))
            for k, v in vars(batch).items()
        }
    return {k: None if v is None else v[rows].to(device, non_blocking=True) for k, v in vars(batch).items()}


def check_batch(batch: RLBatch | SFTBatch, options: PolicyLossOptions | None = None) -> None:
    """Raise ValueError before the first collective: a rank failing mid-step would leave the others
    waiting in one (and the engine holding half-accumulated gradients)."""
    rows, length = batch.input_ids.shape
    if length < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row; got shape {(rows, length)}")
    for name, value in vars(batch).items():
        expected = (rows, length) if name in ("input_ids", "attention_mask") else (rows, length - 1)
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (label-aligned); got {tuple(value.shape)}")
        if name in ("response_mask", "loss_mask") and value.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True = trained token); got {value.dtype}")
    if options is not None and options.kl_coef != 0.0 and getattr(batch, "ref_logprobs", None) is None:
        raise ValueError(f"kl_coef={options.kl_coef} needs batch.ref_logprobs")
