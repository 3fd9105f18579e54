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

    def describe_batches(self, algo: AlgoConfig, trainer: TrainerConfig) -> str:
        """Samples per step and rank, updates and micro-batches, in one line."""
        micro = (
            f"micro-batches of ≤ {trainer.micro_batch_tokens} tokens "
            + ("(packed, no padding)" if trainer.packing else "(padding included)")
            if self.micro_batches_per_update is None
            else f"{self.micro_batches_per_update} micro-batch(es) of ≤ {trainer.micro_batch_size} sequences "
            f"(gradient accumulation {self.micro_batches_per_update})"
        )
        return (
            f"samples/step {self.samples_per_step} = {algo.prompts_per_step} prompts × "
            f"{algo.samples_per_prompt}; per trainer rank {self.samples_per_rank}; "
            f"{algo.updates_per_step} update(s)/step of {micro}"
        )

    def describe(
        self, algo: AlgoConfig, trainer: TrainerConfig, rollout: RolloutConfig, cluster: ClusterConfig
    ) -> str:
        """`describe_batches`, and the placement: engines and trainer ranks with their devices."""
        engines = (
            ""
            if cluster.colocated
            else (
                f"{rollout.engines} engine(s) × {rollout.cpus_per_engine} CPU/{rollout.gpus_per_engine} GPU, "
            )
        )
        hosting = ", each hosting one engine" if cluster.colocated else ""
        return (
            f"{self.describe_batches(algo, trainer)}; "
            f"placement {cluster.placement}: {engines}{trainer.ranks} trainer rank(s) × "
            f"{trainer.cpus_per_rank} CPU/{trainer.gpus_per_rank} GPU{hosting}"
        )


def _multiples(value: int, factor: int, count: int = 1) -> int:
    """The smallest n ≥ value with n × count a multiple of `factor`."""
    return next(n for n in range(value, value + factor + 1) if n * count % factor == 0)


def derive(
    algo: AlgoConfig, trainer: TrainerConfig, sft: SFTConfig, rl: bool = True, sft_runs: bool = True
) -> Derived:
    """Compute the derived batch quantities. trainer.micro_batch_size is the most rows of one forward: a
    rank's share splits into as many micro-batches as it takes, the last one shorter (the loss's global
    denominators make the gradient the same). What must divide is refused, naming the smallest changes
    that work, for the stages that will run: `rl` (the RL batch) and `sft_runs` (an SFT stage or the
    tiny model's SFT warm-up)."""
    prompts, group = algo.prompts_per_step, algo.samples_per_prompt
    samples, split = prompts * group, algo.updates_per_step * trainer.ranks
    if rl and samples % split:
        ranks = max(r for r in range(1, trainer.ranks + 1) if samples % (algo.updates_per_step * r) == 0)
        raise ValueError(
            f"inconsistent batch sizes: algo.prompts_per_step × algo.samples_per_prompt = {samples} samples "
            f"per step do not split evenly into algo.updates_per_step={algo.updates_per_step} update(s) × "
            f"trainer.ranks={trainer.ranks} rank(s); the nearest that do: "
            f"algo.prompts_per_step={_multiples(prompts, split, group)}, or "
            f"algo.samples_per_prompt={_multiples(group, split, prompts)}, or "
            f"trainer.ranks={ranks}"
        )
    if sft_runs and sft.batch_size % trainer.ranks:
        raise ValueError(
            f"inconsistent batch sizes: sft.batch_size={sft.batch_size} conversations (the SFT stage or the "
            f"tiny model's SFT warm-up) do not split evenly into trainer.ranks={trainer.ranks} rank(s); e.g. "
            f"sft.batch_size={_multiples(sft.batch_size, trainer.ranks)}"
        )
    rows, by_tokens = trainer.micro_batch_size, bool(trainer.micro_batch_tokens)
    return Derived(
        samples_per_step=samples,
        samples_per_rank=samples // trainer.ranks,
        micro_batches_per_update=None if by_tokens else -(-(samples // split) // rows),
        sft_micro_batches=None if by_tokens else -(-(sft.batch_size // trainer.ranks) // rows),
    )
