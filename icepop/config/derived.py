"""Quantities derived from several config fields — samples per step, per rank, micro-batches, gradient
accumulation — computed (never configured), checked for consistency, and printed at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.algo import AlgoConfig
from icepop.config.rollout import ClusterConfig, RolloutConfig
from icepop.config.stages import SFTConfig
from icepop.config.trainer import TrainerConfig


@dataclass(frozen=True)
class Derived:
    """Quantities computed from the config, printed at start-up."""

    samples_per_step: int
    samples_per_rank: int
    micro_batches_per_update: int | None
    """None when trainer.micro_batch_tokens forms the micro-batches (their count follows the lengths)."""
    sft_micro_batches: int | None
    """SFT micro-batches per rank and step; None under trainer.micro_batch_tokens."""

    def describe(
        self, algo: AlgoConfig, trainer: TrainerConfig, rollout: RolloutConfig, cluster: ClusterConfig
    ) -> str:
        micro = (
            f"micro-batches of ≤ {trainer.micro_batch_tokens} tokens (padding included)"
            if self.micro_batches_per_update is None
            else f"{self.micro_batches_per_update} micro-batch(es) × {trainer.micro_batch_size} sequences "
            f"(gradient accumulation {self.micro_batches_per_update})"
        )
        engines = (
            ""
            if cluster.colocated
            else (
                f"{rollout.engines} engine(s) × {rollout.cpus_per_engine} CPU/{rollout.gpus_per_engine} GPU, "
            )
        )
        hosting = ", each hosting one engine" if cluster.colocated else ""
        return (
            f"samples/step {self.samples_per_step} = {algo.prompts_per_step} prompts × "
            f"{algo.samples_per_prompt}; per trainer rank {self.samples_per_rank}; "
            f"{algo.updates_per_step} update(s)/step of {micro}; "
            f"placement {cluster.placement}: {engines}{trainer.ranks} trainer rank(s) × "
            f"{trainer.cpus_per_rank} CPU/{trainer.gpus_per_rank} GPU{hosting}"
        )


def derive(algo: AlgoConfig, trainer: TrainerConfig, sft: SFTConfig) -> Derived:
    """Compute the derived batch quantities; ValueError with one clear message if they do not divide."""
    samples = algo.prompts_per_step * algo.samples_per_prompt
    per_update = samples // algo.updates_per_step
    per_rank_update = per_update // trainer.ranks
    sft_per_rank = sft.batch_size // trainer.ranks
    rows = 1 if trainer.micro_batch_tokens else trainer.micro_batch_size  # a token budget takes any rows
    if (
        samples % algo.updates_per_step
        or per_update % trainer.ranks
        or per_rank_update % rows
        or sft_per_rank * trainer.ranks != sft.batch_size
        or sft_per_rank % rows
    ):
        raise ValueError(
            "inconsistent batch sizes: algo.prompts_per_step × algo.samples_per_prompt = "
            f"{samples} samples per "
            f"step must split into algo.updates_per_step={algo.updates_per_step} updates × trainer.ranks="
            f"{trainer.ranks} ranks × whole micro-batches of "
            f"trainer.micro_batch_size={rows}, "
            f"and sft.batch_size={sft.batch_size} into {trainer.ranks} ranks × micro-batches of "
            f"{rows}; e.g. make {samples} and {sft.batch_size} multiples of "
            f"{algo.updates_per_step * trainer.ranks * rows}"
        )
    return Derived(
        samples_per_step=samples,
        samples_per_rank=samples // trainer.ranks,
        micro_batches_per_update=None if trainer.micro_batch_tokens else per_rank_update // rows,
        sft_micro_batches=None if trainer.micro_batch_tokens else sft_per_rank // rows,
    )
