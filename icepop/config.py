"""Typed configuration: the only home of defaults.

Dataclasses registered in Hydra's ConfigStore as the schema of `conf/config.yaml`; the YAML files in
conf/ and recipes/ hold only differences. Every field has a one-line docstring. Value checks run
when the composed config becomes these objects (`OmegaConf.to_object`), with messages naming the
field. Quantities derived from several fields (samples per step, micro-batches, gradient
accumulation) are computed by `icepop.derived`, printed at start-up and never configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from icepop.algo import AGGREGATIONS, PolicyLossOptions

STAGES = ("sft", "rm", "rlvr", "rlhf", "eval", "pipeline")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
DTYPES = ("float32", "bfloat16")


def _one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0; got {value}")


@dataclass
class RunConfig:
    dir: str = "runs/${oc.select:stage,none}-${now:%Y%m%d-%H%M%S}"
    """Run directory: config.yaml, metrics.jsonl and checkpoints/ are written here."""
    seed: int = 0
    """Seed of data order, sampling and initialisation; step-count budgets reproduce exactly."""
    resume: bool = False
    """RL stages: continue the newest run of this stage beside run.dir (e.g. runs/rlvr-*) from its last
    complete checkpoint. A run.dir that already holds a checkpoint is always continued."""


@dataclass
class ModelConfig:
    path: str = "tiny:dense"
    """A Hugging Face folder or hub id, or "tiny:dense" / "tiny:moe" for the built-in offline models."""
    sft_warmup: bool = True
    """RLVR on a built-in tiny model: start from its cached SFT checkpoint, running SFT first if missing."""
    dtype: str = "float32"
    """Trainer parameter dtype: "float32" or "bfloat16"."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models)."""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class DataConfig:
    source: str = "countdown"
    """Built-in task ("countdown", "arithmetic"), a local .jsonl/.json/.parquet file, or a hub dataset."""
    prompt_field: str = "prompt"
    """Dataset column with the prompt: a string (one user message) or a list of chat messages."""
    answer_field: str = "answer"
    """Dataset column with the ground truth the verifier checks against."""
    task_field: str | None = None
    """Dataset column naming each row's verifier; None uses `reward.task` for every row."""
    split: str = "train"
    """Dataset split to read."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (after the chat template) are dropped and counted."""
    size: int = 20000
    """RL prompts generated for a built-in task (the pool each step samples from)."""
    eval_size: int = 64
    """Held-out problems for evaluation and the weight-sync probe (built-in tasks: another seed)."""

    def __post_init__(self) -> None:
        _positive(
            **{
                "data.max_prompt_tokens": self.max_prompt_tokens,
                "data.size": self.size,
                "data.eval_size": self.eval_size,
            }
        )


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    """Inference engine implementation (icepop.rollout.base.engine_class)."""
    engines: int = 1
    """Number of vLLM engines (Ray actors); prompts are split across them, groups kept together."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores tokens under the same processed distribution."""
    top_p: float = 1.0
    """Nucleus sampling; keep 1.0 for RL unless the trainer applies the same truncation."""
    top_k: int = 0
    """Top-k sampling, 0 = off; keep 0 for RL for the same reason."""
    max_new_tokens: int = 32
    """Longest response; longer ones are truncated and counted."""
    dtype: str = "float32"
    """Engine weight dtype; "bfloat16" against a float32 trainer gives a real, small mismatch."""
    kv_cache_gib: float = 0.25
    """KV-cache size per engine on CPU (vLLM's default asks for most of the RAM)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of a GPU's memory an engine may take (GPU only)."""
    cpus_per_engine: int = 1
    """CPUs reserved per engine in the placement group."""
    gpus_per_engine: int = 0
    """GPUs per engine (tensor parallel size); 0 on CPU machines."""
    weight_sync: str = "broadcast"
    """"broadcast" (rank 0 → engines over a gloo/NCCL group, multi-node) or "file" (/dev/shm, one node)."""
    mismatch_noise: float = 0.0
    """Stress test: noise of this × each tensor's std added to the engine's weights after every sync."""
    max_restarts: int = 3
    """Engines that die are restarted, re-synced and the step retried, at most this many times a run."""
    probe_tolerance: float | None = None
    """Sync probe limit on |Δ log p|: its max for float32 engines (None: 1e-3), its mean over the probe
    tokens for bfloat16 ones (None: 0.1), whose single tokens jump with MoE routing flips."""

    def __post_init__(self) -> None:
        _one_of("rollout.dtype", self.dtype, DTYPES)
        _one_of("rollout.weight_sync", self.weight_sync, ("broadcast", "file"))
        _positive(
            **{
                "rollout.engines": self.engines,
                "rollout.temperature": self.temperature,
                "rollout.max_new_tokens": self.max_new_tokens,
                "rollout.kv_cache_gib": self.kv_cache_gib,
            }
        )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1]; got {self.top_p}")


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
        _one_of("trainer.zero_stage", self.zero_stage, (1, 2, 3))
        _positive(
            **{
                "trainer.ranks": self.ranks,
                "trainer.lr": self.lr,
                "trainer.micro_batch_size": self.micro_batch_size,
            }
        )


@dataclass
class AlgoConfig:
    prompts_per_step: int = 16
    """Prompts sampled per RL step."""
    samples_per_prompt: int = 8
    """Responses per prompt (the GRPO group size)."""
    updates_per_step: int = 1
    """Optimizer steps per RL step (the batch is split into this many mini-batches)."""
    advantage: str = "grpo"
    """Advantage estimator: "grpo", "dr_grpo", "rloo" or "reinforce_pp"."""
    correction: str = "icepop"
    """Train/inference mismatch correction (see icepop.algo.CORRECTIONS)."""
    ratio_low: float = 0.5
    """α, the lower bound of the kept ratio band (or unused by one-sided corrections)."""
    ratio_high: float = 5.0
    """β, the upper bound (the cap C for "tis", "token-mis", "seq-tis", "seq-mis")."""
    kpop_threshold: float = 0.05
    """φ for "kpop"."""
    objective: str = "ppo"
    """"ppo", "gspo" or "cispo"."""
    clip_low: float = 0.2
    """ε_low of the PPO clip."""
    clip_high: float = 0.28
    """ε_high of the PPO clip (DAPO clip-higher)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1, or None."""
    agg: str = "token-mean"
    """Loss aggregation (see icepop.algo.AGGREGATIONS); the paper uses "seq-mean-token-mean"."""
    kl_coef: float = 0.0
    """γ, weight of KL(π_θ ‖ π_ref) (the paper uses 0); > 0 computes reference log-probs each step."""
    kl_estimator: str = "k3"
    """"k1", "k2" or "k3"."""

    def __post_init__(self) -> None:
        _one_of("algo.advantage", self.advantage, ADVANTAGES)
        _one_of("algo.agg", self.agg, AGGREGATIONS)
        _positive(
            **{
                "algo.prompts_per_step": self.prompts_per_step,
                "algo.samples_per_prompt": self.samples_per_prompt,
                "algo.updates_per_step": self.updates_per_step,
            }
        )
        self.loss_options()  # raises ValueError naming the field if the loss options are inconsistent

    def loss_options(self, max_response_length: int | None = None) -> PolicyLossOptions:
        """The loss's options as the pure loss library takes them."""
        return PolicyLossOptions(
            correction=self.correction,
            ratio_low=self.ratio_low,
            ratio_high=self.ratio_high,
            kpop_threshold=self.kpop_threshold,
            objective=self.objective,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            agg=self.agg,
            max_response_length=max_response_length,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
        )


@dataclass
class RewardConfig:
    function: str | None = None
    """Custom reward as a dotted path "pkg.module:function"; None uses the built-in verifier of the task."""
    task: str | None = None
    """Verifier for dataset rows without a task column ("math", "arithmetic", "countdown"); None: "math"."""
    workers: int = 2
    """Reward worker processes."""
    timeout_seconds: float = 10.0
    """Per-sample time limit; a sample past it scores 0 and is counted."""
    rule_weight: float = 1.0
    """Weight of the rule reward (verifier or `function`); 0 turns it off."""
    model_path: str | None = None
    """Reward model (a sequence-classification checkpoint, e.g. +recipe=rm's output); None: rule only."""
    model_weight: float = 1.0
    """Weight of the reward model's score (whitened over the step's batch when `normalize`)."""
    normalize: bool = True
    """Whiten reward-model scores over each step's batch (mean 0, std 1) before weighting."""
    model_workers: int = 1
    """Reward-model scoring actors (Ray), each with its own placement bundle."""
    cpus_per_model_worker: int = 1
    """CPUs reserved per reward-model actor."""
    gpus_per_model_worker: int = 0
    """GPUs per reward-model actor; 0 on CPU machines."""
    model_batch_size: int = 32
    """Conversations per reward-model forward."""

    def __post_init__(self) -> None:
        _positive(
            **{
                "reward.workers": self.workers,
                "reward.timeout_seconds": self.timeout_seconds,
                "reward.model_workers": self.model_workers,
                "reward.model_batch_size": self.model_batch_size,
            }
        )


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address to join ("auto" or "host:port"); None starts a local cluster on 127.0.0.1."""
    num_cpus: int | None = None
    """Logical CPUs of the local cluster; None: enough for every bundle plus one for the driver's tasks."""
    placement: str = "disaggregated"
    """"disaggregated" (separate bundles) or "colocated" (GPU only: shared GPUs, vLLM asleep in training)."""

    def __post_init__(self) -> None:
        _one_of("cluster.placement", self.placement, ("disaggregated", "colocated"))


@dataclass
class LoggerConfig:
    backend: str = "console"
    """"console" (progress bar + metrics.jsonl) or "wandb" (the same, also sent to wandb)."""
    project: str = "icepop"
    """wandb project name."""
    wandb_mode: str = "offline"
    """wandb mode: "offline" (sync later with `wandb sync`) or "online"."""
    mismatch_alert: float = 0.05
    """Alert when the mean |k − 1| exceeds this (the IcePop paper saw GRPO fail beyond ≈5%)."""
    alert_window: int = 20
    """Steps over which a falling mask fraction with a rising mismatch KL raises an alert."""

    def __post_init__(self) -> None:
        _one_of("logger.backend", self.backend, ("console", "wandb"))


@dataclass
class TrainConfig:
    steps: int = 150
    """RL steps (one batch of rollouts and its update each)."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps (0: only at the end): a Hugging Face model plus what resuming
    needs (optimizer, scheduler, data position, RNG); written atomically."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete (0: keep all)."""
    eval_every: int = 50
    """Evaluate greedy accuracy on the held-out problems every this many steps (0: before and after)."""
    max_nonfinite_steps: int = 3
    """Stop after this many steps in a row whose update was skipped for a NaN/inf loss or gradient."""
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: make the loss NaN at these steps (the update is then skipped)."""

    def __post_init__(self) -> None:
        _positive(**{"train.steps": self.steps, "train.max_nonfinite_steps": self.max_nonfinite_steps})
        if self.checkpoint_every < 0 or self.keep_last < 0:
            raise ValueError(
                f"train.checkpoint_every={self.checkpoint_every} and train.keep_last={self.keep_last} "
                "must be >= 0"
            )


@dataclass
class SFTConfig:
    steps: int = 400
    """Optimizer steps of supervised fine-tuning."""
    examples: int = 20000
    """Conversations generated for a built-in task's SFT set (datasets use all their rows)."""
    batch_size: int = 64
    """Conversations per optimizer step (over all ranks)."""
    lr: float = 1e-3
    """Peak learning rate of the SFT stage."""
    warmup_steps: int = 20
    """Linear warm-up of the SFT learning rate."""
    group_by_length: bool = False
    """Batch conversations of similar length: less padding, but less varied batches (slower SFT here)."""
    eval_size: int = 256
    """Held-out conversations for the validation loss (at most half the set)."""
    eval_every: int = 100
    """Validation loss every this many steps (0: before and after only)."""

    def __post_init__(self) -> None:
        values = {
            "steps": self.steps,
            "examples": self.examples,
            "batch_size": self.batch_size,
            "lr": self.lr,
        }
        _positive(**{f"sft.{name}": value for name, value in values.items()})


@dataclass
class RMConfig:
    steps: int = 150
    """Optimizer steps of reward-model training (+recipe=rm)."""
    pairs: int = 4000
    """Preference pairs generated for a built-in task (datasets use all their rows)."""
    source: str = "countdown"
    """Pairs: a built-in task, or a jsonl/json/parquet file or hub name with prompt/chosen/rejected."""
    batch_size: int = 32
    """Pairs per optimizer step (over all ranks); trainer.micro_batch_size pairs per forward."""
    lr: float = 1e-3
    """Peak learning rate of reward-model training."""
    warmup_steps: int = 10
    """Linear warm-up of the reward-model learning rate."""
    eval_size: int = 256
    """Held-out pairs for the pairwise accuracy reported before and after training."""
    eval_every: int = 50
    """Report held-out pairwise accuracy every this many steps (0: before and after only)."""

    def __post_init__(self) -> None:
        values = {"steps": self.steps, "pairs": self.pairs, "batch_size": self.batch_size, "lr": self.lr,
                  "eval_size": self.eval_size}  # fmt: skip
        _positive(**{f"rm.{name}": value for name, value in values.items()})


@dataclass
class EvalConfig:
    samples_per_prompt: int = 4
    """k: samples per held-out problem for avg@k and pass@k (+recipe=eval)."""
    temperature: float = 1.0
    """Sampling temperature of the k samples (0: greedy, then k is 1)."""

    def __post_init__(self) -> None:
        _positive(**{"eval.samples_per_prompt": self.samples_per_prompt})
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0; got {self.temperature}")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "rlvr", "rlhf", "eval"])
    """In order; each starts from the last policy; rm trains rlhf's and eval's reward model."""
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per stage, overrides applied after its recipe and the pipeline's own, e.g. {rlvr: [train.steps=9]}."""

    def __post_init__(self) -> None:
        for stage in self.stages:
            _one_of("pipeline.stages[...]", stage, ("sft", "rm", "rlvr", "rlhf", "eval"))
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"pipeline.stages={self.stages} names a stage twice")
        if (
            "rlhf" in self.stages
            and "rm" in self.stages
            and self.stages.index("rm") > self.stages.index("rlhf")
        ):
            raise ValueError("pipeline.stages: rm must come before rlhf, which uses its reward model")


@dataclass
class Config:
    stage: str = MISSING
    """What to run: sft, rm, rlvr, rlhf, eval or pipeline (set by the recipe: `+recipe=rlvr`)."""
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

    def __post_init__(self) -> None:
        from icepop.derived import derived

        _one_of("stage", self.stage, STAGES)
        derived(self)  # refuses inconsistent batch sizes


def register() -> None:
    """Register the schema in Hydra's ConfigStore (the recipes are registered by icepop.train)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="icepop_schema", node=Config)
