"""The trainer backend: DeepSpeed ZeRO ranks and their optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.checks import one_of, positive


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
    """Peak learning rate of AdamW (Ring-1T RLVR: 2e-6)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; gradients accumulate over the rank's share."""
    cpus_per_rank: int = 1
    """CPUs reserved per trainer rank."""
    gpus_per_rank: int = 0
    """GPUs per trainer rank; 0 on CPU machines."""

    def __post_init__(self) -> None:
        one_of("trainer.zero_stage", self.zero_stage, (1, 2, 3))
        positive(
            **{
                "trainer.ranks": self.ranks,
                "trainer.lr": self.lr,
                "trainer.micro_batch_size": self.micro_batch_size,
            }
        )
