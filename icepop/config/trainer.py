"""The trainer backend: DeepSpeed ZeRO ranks and their optimizer. The defaults are a real model's
(Ring-1T's RLVR learning rate); the tiny models' presets set their own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from icepop.config.checks import non_negative, one_of, positive, zero_or_one_gpu

LR_SCHEDULES = ("constant", "cosine")
TRAINER_BACKENDS = ("deepspeed",)
"""The implementations of icepop.trainer.base.backend_class."""


@dataclass
class LoraConfig:
    """Low-rank adapters (peft's LoRA) instead of full fine-tuning, in every stage that trains."""

    rank: int = 0
    """Adapter rank r; 0 trains every weight. > 0: only the adapters (and a reward model's score head)
    have gradients and optimizer state, under every ZeRO stage; the engine gets base + B·A·alpha/r."""
    alpha: float = 0.0
    """The update is (alpha / rank)·B·A; 0 means 2 × rank. LoRA usually wants ≈ 10× the full
    fine-tuning learning rate (trainer.lr, sft.lr, rm.lr)."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (SFT and reward-model stages only: in RL it would
    make the trainer's ℓ a random draw, which IcePop would read as train/inference mismatch)."""
    target_modules: list[str] = field(default_factory=list)
    """Names of the linear layers to adapt (peft target_modules, e.g. [q_proj, v_proj]); empty: every
    linear layer of the decoder — attention and MLP projections, never lm_head, a MoE router or a
    reward model's score head (which trains whole)."""
    experts: bool = True
    """MoE models: adapt the fused expert weights too (each expert of a layer gets its own rank-r
    adapter: peft target_parameters on experts.gate_up_proj and experts.down_proj)."""

    def __post_init__(self) -> None:
        non_negative(**{"trainer.lora.rank": self.rank, "trainer.lora.alpha": self.alpha})
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"trainer.lora.dropout must be in [0, 1); got {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of icepop.trainer.lora.add_adapters."""
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass
class TrainerConfig:
    backend: str = "deepspeed"
    """Trainer implementation (icepop.trainer.base.backend_class)."""
    ranks: int = 2
    """Data-parallel trainer ranks (Ray actors in one torch.distributed group)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3 (3 shards parameters; weights are gathered for sync). 0: no
    ZeRO, every rank holds the whole model, its gradients and AdamW state (DeepSpeed all-reduces the
    gradients): with one rank nothing is partitioned anyway, and 0 saves ZeRO's fp32 master copy and
    gradient buckets (1.6 GB of a SmolLM2-135M rank's peak)."""
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
    eps: float = 1e-8
    """AdamW epsilon (added to the second-moment root in the update's denominator)."""
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
    denominators); fewer, fuller forwards with little padding. SFT, RL and reward-model stages.
    Under trainer.packing the budget counts real tokens: Σ row lengths ≤ the budget."""
    packing: bool = False
    """Padding-free micro-batches: a micro-batch's rows are concatenated into one sequence, position ids
    restarting at 0 per row, attention kept within each row (transformers does it from the position
    ids: a block-diagonal causal mask for sdpa/eager/flex, varlen kernels for flash attention), so the
    forwards compute real tokens only; log-probs, losses and gradients are those of padded rows. With
    micro_batch_tokens the rows' real lengths (no padding) fill the budget; without, micro_batch_size
    rows are packed. Needs an attention implementation that keeps rows apart (checked before start).
    On CPU sdpa works on the packed N×N mask: it pays only where padding dominates (bench/packing.py)."""
    cpus_per_rank: int = 1
    """CPUs reserved per trainer rank; on CPU also its torch threads."""
    gpus_per_rank: int = 0
    """GPUs per trainer rank: 0 (CPU) or 1 (cluster=gpu)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (trainer.lora.rank=16)."""
    ds_config_overrides: dict[str, Any] = field(default_factory=dict)
    """Merged last into the DeepSpeed config icepop writes (nested keys too), e.g.
    '+trainer.ds_config_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}'."""

    def __post_init__(self) -> None:
        one_of("trainer.backend", self.backend, TRAINER_BACKENDS)
        one_of("trainer.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload and self.zero_stage == 0:
            raise ValueError(
                "trainer.offload=true offloads ZeRO's optimizer state: it needs trainer.zero_stage >= 1"
            )
        one_of("trainer.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        positive(
            **{
                "trainer.ranks": self.ranks,
                "trainer.lr": self.lr,
                "trainer.eps": self.eps,
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
