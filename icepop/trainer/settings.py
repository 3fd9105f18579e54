"""What a trainer rank is built with, read from the config: the backends (icepop.trainer.base.backend_class)
take keyword-only arguments without defaults, so every value comes from here and the config stays the
only home of defaults (tests/test_config.py compares the two)."""

from __future__ import annotations

from typing import Any

from icepop.config import Config

RENDEZVOUS = ("rank", "master_addr", "master_port")
"""The keyword arguments the caller adds: where this rank meets the others, known only once it runs."""


def trainer_settings(config: Config, model_path: str, stage: str) -> dict[str, Any]:
    """The keyword arguments of one stage's trainer ranks, all but `RENDEZVOUS`. `stage` is "rl" (RLVR
    and RLHF: trainer.lr, sampled at rollout.temperature), "sft" (sft.lr) or "rm" (rm.lr, a reward model)."""
    trainer = config.trainer
    schedules = {
        "rl": (trainer.lr, trainer.warmup_steps, config.train.steps * config.algo.updates_per_step),
        "sft": (config.sft.lr, config.sft.warmup_steps, config.sft.steps),
        "rm": (config.rm.lr, config.rm.warmup_steps, config.rm.steps),
    }
    if stage not in schedules:
        raise ValueError(f"trainer stage {stage!r} is not one of: {', '.join(schedules)}")
    lr, warmup_steps, total_steps = schedules[stage]
    return {
        "model_path": model_path,
        "model_kind": "reward" if stage == "rm" else "policy",
        "world_size": trainer.ranks,
        "zero_stage": trainer.zero_stage,
        "offload": trainer.offload,
        "dtype": config.model.dtype,
        "lr": lr,
        "weight_decay": trainer.weight_decay,
        "betas": tuple(trainer.betas),
        "eps": trainer.eps,
        "warmup_steps": warmup_steps,
        "lr_schedule": trainer.lr_schedule,
        "total_steps": total_steps,
        "grad_clip": trainer.grad_clip,
        "micro_batch_size": trainer.micro_batch_size,
        "micro_batch_tokens": trainer.micro_batch_tokens,
        "packing": trainer.packing,
        # the sampling temperature: RL's ℓ is taken under the distribution the engine sampled from
        "temperature": config.rollout.temperature if stage == "rl" else 1.0,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "seed": config.run.seed,
        "cpu_threads": trainer.cpus_per_rank if trainer.gpus_per_rank == 0 else None,
        "ds_config_overrides": dict(trainer.ds_config_overrides),
        "lora": trainer.lora.adapter_options() if trainer.lora.enabled else None,
    }
