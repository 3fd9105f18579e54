"""Typed configuration: the only home of defaults.

Dataclasses registered in Hydra's ConfigStore as the schema of `conf/config.yaml`; the YAML files in
conf/ and recipes/ hold only differences. One module per group of settings (model and data, rollout
and cluster, trainer, algorithm and rewards, stages); every field has a one-line docstring. Value
checks run when the composed config becomes these objects (`OmegaConf.to_object`), with messages
naming the field. Quantities derived from several fields (samples per step, micro-batches, gradient
accumulation) are computed by `Config.derived`, printed at start-up and never configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from icepop.config.algo import ADVANTAGES, AlgoConfig, RewardConfig
from icepop.config.checks import DTYPES, check_trainer_dtype, one_of
from icepop.config.derived import Derived, derive
from icepop.config.model import DataConfig, ModelConfig
from icepop.config.rollout import ClusterConfig, RolloutConfig, check_placement
from icepop.config.stages import (
    CompareConfig,
    EvalConfig,
    LoggerConfig,
    PipelineConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from icepop.config.trainer import TrainerConfig

STAGES = ("sft", "rm", "rlvr", "rlhf", "eval", "pipeline", "compare")
WARMED_UP_STAGES = ("rm", "rlvr", "rlhf", "eval")
"""The stages that start a built-in tiny model from its SFT warm-up (`model.sft_warmup`)."""
TINY_PREFIX = "tiny:"
"""model.path of the built-in offline models: "tiny:dense", "tiny:moe"."""

__all__ = [
    "ADVANTAGES",
    "DTYPES",
    "STAGES",
    "AlgoConfig",
    "ClusterConfig",
    "CompareConfig",
    "Config",
    "DataConfig",
    "Derived",
    "EvalConfig",
    "LoggerConfig",
    "ModelConfig",
    "PipelineConfig",
    "RMConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "TrainerConfig",
    "register",
]


@dataclass
class Config:
    stage: str = MISSING
    """What to run: sft, rm, rlvr, rlhf, eval, pipeline or compare (set by the recipe: `+recipe=rlvr`)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        one_of("stage", self.stage, STAGES)
        check_placement(self.cluster, self.rollout, self.trainer.ranks, self.trainer.gpus_per_rank)
        stages = self.stages()
        if self.stage == "compare" and len(self.compare.arms) < 2:
            raise ValueError(
                f"compare.arms names {len(self.compare.arms)} arm(s): a comparison needs two or more"
            )
        if set(stages) - {"eval"} or self.warms_up:  # a trainer rank will run: DeepSpeed takes the dtype
            check_trainer_dtype(self.model.dtype, on_gpu=self.trainer.gpus_per_rank > 0)
        if self.trainer.lora.dropout and {"rlvr", "rlhf"} & set(stages):
            raise ValueError(
                f"trainer.lora.dropout={self.trainer.lora.dropout} in an RL stage: dropout makes the "
                "trainer's log-probs a random draw, which IcePop's ratio to the engine's would read as "
                "mismatch; set it to 0"
            )
        limit = self.rollout.response_tokens()
        if self.algo.overlong_buffer > limit:
            raise ValueError(
                f"algo.overlong_buffer={self.algo.overlong_buffer} is longer than the reply limit of {limit} "
                "tokens (rollout.max_new_tokens, or the episode budget); DAPO uses a fifth of it"
            )
        self.derived()  # refuses inconsistent batch sizes

    def derived(self) -> Derived:
        """Samples per step and rank, micro-batches, gradient accumulation (ValueError if inconsistent)."""
        stages = self.stages()
        rl = bool({"rlvr", "rlhf"} & set(stages))
        return derive(self.algo, self.trainer, self.sft, rl=rl, sft_runs="sft" in stages or self.warms_up)

    def stages(self) -> list[str]:
        """The stages this command runs: a pipeline's, a comparison's (its arms' recipe) or its own."""
        if self.stage == "pipeline":
            return list(self.pipeline.stages)
        return [self.compare.recipe] if self.stage == "compare" else [self.stage]

    @property
    def warms_up(self) -> bool:
        """The stage starts from a built-in tiny model's SFT warm-up (icepop.stages.warmup.policy_path)."""
        tiny = self.model.path.startswith(TINY_PREFIX)
        return tiny and self.stage in WARMED_UP_STAGES and self.model.sft_warmup

    def describe_batches(self) -> str:
        """The derived quantities and the placement, in one line for the start-up log."""
        return self.derived().describe(self.algo, self.trainer, self.rollout, self.cluster)


def register() -> None:
    """Register the schema in Hydra's ConfigStore (the recipes are registered by icepop.train)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="icepop_schema", node=Config)
