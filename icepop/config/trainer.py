"""The trainer backend: DeepSpeed ZeRO ranks and their optimizer. The defaults are a real model's
(Ring-1T's RLVR learning rate); the tiny models' presets set their own."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.checks import non_negative, one_of, positive, zero_or_one_gpu

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainerConfig:
    backend: str = "deepspeed"
    """Trainer implementation (icepop.trainer.base.backend_class)."""
    ranks: int = 2
    """Data-parallel trainer ranks (Ray actors in one torch.distributed group)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2 or 3 (3 shards parameters; weights are gathered for sync)."""
    offload: bool = False
    """Offload optimizer state to CPU memory (ZeRO-Offload)."""
    lr: float = 2e-6
    """Peak learning rate of AdamW in RL stages (Ring-1T RLVR: 2e-6); SFT and RM have sft.lr, rm.lr."""
    lr_schedule: str = "constant"
    """After warm-up: "constant", or "cosine" (decays to 0 at the stage's last optimizer step)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm gains)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; gradients accumulate over the rank's share."""
    micro_batch_tokens: int = 0
    """> 0: form micro-batches by this token budget instead of micro_batch_size rows — a rank's rows
    sorted longest first, packed while rows × longest row ≤ the budget (padding included), each
    micro-batch trimmed to its longest row. The gradient is the same (losses carry global
    denominators); fewer, fuller forwards with little padding. SFT, RL and reward-model stages."""
    cpus_per_rank: int = 1
    """CPUs reserved per trainer rank; on CPU also its torch threads."""
    gpus_per_rank: int = 0
    """GPUs per trainer rank: 0 (CPU) or 1 (cluster=gpu)."""

    def __post_init__(self) -> None:
        one_of("trainer.zero_stage", self.zero_stage, (1, 2, 3))
        one_of("trainer.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        positive(
            **{
                "trainer.ranks": self.ranks,
                "trainer.lr": self.lr,
                "trainer.micro_batch_size": self.micro_batch_size,
                "trainer.cpus_per_rank": self.cpus_per_rank,
            }
        )
        non_negative(
            **{
                "trainer.weight_decay": self.weight_decay,
                "trainer.warmup_steps": self.warmup_steps,
                "trainer.grad_clip": self.grad_clip,
                "trainer.micro_batch_tokens": self.micro_batch_tokens,
            }
        )
        zero_or_one_gpu(  # more would be reserved and never used
            "trainer.gpus_per_rank",
            self.gpus_per_rank,
            "a DeepSpeed rank drives one GPU; for more GPUs, more trainer.ranks",
        )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(
                f"trainer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.betas}"
            )
