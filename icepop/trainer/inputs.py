"""Framework-free pieces of the trainer backend: argument and batch checks, micro-batch slices, and
the learning-rate schedule. Checks run before the first collective call: a rank that fails mid-step
would leave the others waiting in one."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from icepop.algo import PolicyLossOptions
from icepop.config.checks import DTYPES as DTYPE_NAMES
from icepop.config.checks import check_trainer_dtype
from icepop.config.trainer import LR_SCHEDULES
from icepop.types import PreferenceBatch, RLBatch, SFTBatch, select_rows

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""The torch dtype of each of the config's dtype names (icepop.config.checks.DTYPES, their one home)."""
MODEL_KINDS = ("policy", "reward")
FP16_LOSS_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
"""DeepSpeed's fp16 block for dtype float16 (but "enabled"): dynamic loss scaling (loss_scale 0) with
DeepSpeed's documented defaults (deepspeed/runtime/precision_config.py DeepSpeedFP16Config, constants.py
FP16_*_DEFAULT). The scale starts at 2^16; an overflowing gradient skips the step, the first one only
spending the hysteresis of 2, each later one halving the scale; 1000 steps without one double it. At
min_loss_scale an overflow raises (DynamicLossScaler.update_scale): the scale can fall no further."""


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int | None) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up from lr/warmup
    to lr over `warmup_steps`, then constant, or a cosine decay reaching 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_args(
    zero_stage: int, dtype: str, micro_batch_size: int, lr_schedule: str, total: Any, model_kind: str
) -> None:
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {', '.join(MODEL_KINDS)}; got {model_kind!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_trainer_dtype(dtype, on_gpu=torch.cuda.is_available())  # the rank's device (_init_distributed)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (sequences per forward); got {micro_batch_size}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {lr_schedule!r}")
    if lr_schedule == "cosine" and (total is None or total < 1):
        raise ValueError(f"lr_schedule='cosine' needs total_steps >= 1; got {total}")


def micro_batch_rows(
    lengths: list[int], size: int, token_budget: int = 0, packed: bool = False
) -> list[Tensor]:
    """Row indices of each micro-batch of rows with these token lengths. token_budget 0: `size`
    consecutive rows each. Otherwise the rows sorted longest first and packed greedily while rows ×
    longest ≤ token_budget — a micro-batch is trimmed to its longest row, so that product is what its
    forward computes, padding included; a row longer than the budget gets a micro-batch of its own.
    `packed` (padding-free micro-batches, icepop.trainer.packing): the budget bounds Σ lengths instead,
    each row going to the first micro-batch it fits in (first-fit decreasing)."""
    if token_budget <= 0:
        return [torch.arange(i, min(len(lengths), i + size)) for i in range(0, len(lengths), size)]
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        if packed:
            fits = (g for g in groups if sum(lengths[r] for r in g) + lengths[row] <= token_budget)
            group = next(fits, None)
        else:
            last = groups[-1] if groups else None
            group = last if last and (len(last) + 1) * lengths[last[0]] <= token_budget else None
        if group is None:
            group = []
            groups.append(group)
        group.append(row)
    return [torch.tensor(group) for group in groups]


def rows_of(batch: Any, rows: Tensor | None, device: torch.device) -> dict[str, Tensor | None]:
    """The batch's tensors for the row indices `rows`, trimmed to their longest row (right padding
    only: causal attention makes the cut exact), on `device`; rows None gives the padding micro-batch:
    one row of two tokens whose label mask is all False, so its loss and gradient are exactly 0."""
    if rows is None:
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        fill = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {
            k: None if v is None else fill.get(k, torch.zeros(1, 1, dtype=v.dtype, device=device))
            for k, v in vars(batch).items()
        }
    selected = vars(select_rows(batch, rows))
    return {k: None if v is None else v.to(device, non_blocking=True) for k, v in selected.items()}


def place_rows(parts: list[tuple[Tensor, Tensor]], rows: int, width: int) -> Tensor:
    """[rows, width] float32 on the CPU from (row indices, [len(indices), w ≤ width] values) parts,
    each row's values left-aligned and 0 beyond them (micro-batch results back in batch order)."""
    out = torch.zeros(rows, width)
    for index, values in parts:
        out[index, : values.shape[1]] = values.detach().float().cpu()
    return out


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
        if name not in ("response_mask", "loss_mask"):
            continue
        if value.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True = trained token); got {value.dtype}")
        if bool((value & ~batch.attention_mask[:, 1:].bool()).any()):
            raise ValueError(f"{name} marks a label position past its row's end (attention_mask 0 there)")
    if options is not None and options.kl_coef != 0.0 and getattr(batch, "ref_logprobs", None) is None:
        raise ValueError(f"kl_coef={options.kl_coef} needs batch.ref_logprobs")


def check_pairs(batch: PreferenceBatch) -> int:
    """The number of pairs P in a preference batch of 2P rows; ValueError before any collective."""
    rows = batch.input_ids.shape[0]
    if rows % 2 or rows == 0 or batch.attention_mask.shape != batch.input_ids.shape:
        raise ValueError(
            f"a preference batch holds 2P rows (P chosen, then P rejected) with a same-shape attention "
            f"mask; got input_ids {tuple(batch.input_ids.shape)}, attention_mask "
            f"{tuple(batch.attention_mask.shape)}"
        )
    if not bool(batch.attention_mask.sum(-1).gt(0).all()):
        raise ValueError("every row of a preference batch needs at least one token")
    return rows // 2


def clips_itself(zero_stage: int, dtype: str) -> bool:
    """Whether the rank clips, measures and (when not finite) skips the gradient itself: in float32
    without ZeRO DeepSpeed steps the plain torch optimizer, which does none of that."""
    return zero_stage == 0 and dtype == "float32"


def first_label(response_mask: Tensor) -> int:
    """The first label position where some row has a reply token (0 if none): an RL update needs ℓ
    from there on only (the prompts' positions before it carry no loss)."""
    columns = response_mask.any(0).nonzero()
    return int(columns[0]) if len(columns) else 0


def apply_step(engine: Any, own_clip: float | None) -> tuple[float, bool]:
    """`engine.step()` on the accumulated gradient: (its norm before clipping, inf where DeepSpeed gives
    none; whether the step was skipped). With `own_clip` (`clips_itself`) the rank clips to it (0: not
    at all) and skips a non-finite gradient itself, as ZeRO's overflow check would."""
    if own_clip is None:
        skipped_before = engine.skipped_steps
        engine.step()
        norm = engine.get_global_grad_norm()
        return (math.inf if norm is None else float(norm)), engine.skipped_steps > skipped_before
    grads = [p for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(grads, own_clip or math.inf))
    if not math.isfinite(norm):
        engine.zero_grad()
        return norm, True
    engine.step()
    return norm, False


def deepspeed_config(
    micro_batch_size: int,
    grad_clip: float,
    zero_stage: int,
    dtype: str,
    offload: bool,
    adamw: tuple[float, tuple[float, float], float],
    overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    """The DeepSpeed config of a trainer rank; `overrides` is merged in last (nested keys too)."""
    lr, betas, eps = adamw
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": 0.0 if clips_itself(zero_stage, dtype) else grad_clip,
        "gradient_accumulation_steps": 1,  # bookkeeping only: train_* sets the boundary itself
        # Plain torch AdamW ("torch_adam"): nothing is JIT-compiled. Its fused kernel (CPU and CUDA)
        # updates ZeRO's flat fp32 partition 8× faster on CPU than the default per-tensor loop, which
        # materialises a temporary the size of the model for every operation (bench/train_phase.py).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "torch_adam": True, "fused": True},
        },
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": True, **FP16_LOSS_SCALING} if dtype == "float16" else {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }
    if offload:
        # Keeps torch AdamW (DeepSpeedCPUAdam would need a compiled op) with state on the CPU.
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        config["zero_force_ds_cpu_optimizer"] = False
    return deep_merge(config, overrides or {})


def skipped_step(skipped: bool, loss_scaling: bool, loss: float) -> dict[str, float]:
    """Why DeepSpeed skipped a step (`skipped`: its skipped_steps grew), as the step's metrics:
    overflow_skipped where fp16 dynamic loss scaling (`loss_scaling`) skipped it at a finite loss (the
    full-batch sum over ranks, NaN if any rank's was) — a gradient that overflowed at the current scale,
    which DeepSpeed lowers for the next step: no failure — nonfinite_skipped for any other skip (a NaN/inf
    loss, or without loss scaling a NaN/inf gradient), which the RL stage counts against
    train.max_nonfinite_steps."""
    overflow = skipped and loss_scaling and math.isfinite(loss)
    return {"nonfinite_skipped": float(skipped and not overflow), "overflow_skipped": float(overflow)}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` on top, nested dicts merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if nested else value
    return merged


def buckets(params: list[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive groups of parameters of at most max_bytes full-size bytes (at least one each); a
    ZeRO-3 parameter counts its full size (ds_numel), not its local shard."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, param in params:
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices, none on biases and norm gains (1-d); a ZeRO-3
    parameter is flat locally, so its real shape is `ds_shape`."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    return [
        {"params": [p for p, m in zip(params, matrix, strict=True) if m], "weight_decay": weight_decay},
        {"params": [p for p, m in zip(params, matrix, strict=True) if not m], "weight_decay": 0.0},
    ]


class RLStepRecord:
    """What one `train_rl` call reports, accumulated over its micro-batches: pg_loss's metrics (means
    over the real micro-batches), the additive loss parts (summed over ranks later), the entropy of all
    and of the masked response tokens, and the ℓ_old each real row was trained against."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.additive = {"loss": 0.0, "pg_loss": 0.0}
        self.entropy = dict.fromkeys(("all", "all_tokens", "masked", "masked_tokens"), 0.0)
        self.old_logprobs: list[tuple[Tensor, Tensor]] = []  # (batch rows, their ℓ_old)
        self.real = 0

    def add(
        self, loss: Tensor, metrics: dict[str, Tensor], entropy: Tensor, keep: Tensor, mask: Tensor,
        old_logprobs: Tensor, rows: Tensor | None,
    ) -> None:  # fmt: skip
        """One micro-batch of these batch rows; None for the padding one, whose loss (0) is all that
        counts."""
        self.additive["loss"] += float(loss.detach())
        self.additive["pg_loss"] += float(metrics["actor/pg_loss"])
        if rows is None:
            return
        self.real += 1
        for key, value in metrics.items():
            if key != "actor/pg_loss":
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        for name, where in (("all", mask), ("masked", mask & ~keep)):  # the tokens the correction masked
            self.entropy[name] += float(torch.where(where, entropy.detach(), 0.0).sum())
            self.entropy[f"{name}_tokens"] += float(where.sum())
        self.old_logprobs.append((rows, old_logprobs.detach().float().cpu()))

    def metrics(self, micro_batches: int) -> dict[str, float]:
        """pg_loss's metrics (micro-batch means), the entropies, the micro-batch count."""
        result = {key: value / max(1, self.real) for key, value in self.sums.items()}
        result["actor/entropy"] = self.entropy["all"] / max(1.0, self.entropy["all_tokens"])
        # 0 when nothing was masked
        result["actor/entropy_masked"] = self.entropy["masked"] / max(1.0, self.entropy["masked_tokens"])
        result["actor/micro_batches"] = float(micro_batches)
        return result
