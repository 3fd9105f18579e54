"""Run bookkeeping and the per-stage settings: run directory, logging, RL loop, SFT, reward model,
evaluation and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from icepop.config.checks import non_negative, one_of, positive


@dataclass
class RunConfig:
    dir: str = "runs/${oc.select:stage,none}-${now:%Y%m%d-%H%M%S}"
    """Run directory: config.yaml, metrics.jsonl and checkpoints/ are written here."""
    seed: int = 0
    """Seed of data order, sampling and initialisation; step-count budgets reproduce exactly."""
    resume: bool = False
    """RL stages: continue the newest run of this stage beside run.dir (e.g. runs/rlvr-*) from its last
    complete checkpoint. A run.dir that already holds a checkpoint is always continued."""
    dry_run: bool = False
    """Check everything that can be checked without a cluster (settings, model, tokenizer, data, reward),
    print the plan (settings and their sources, batch sizes, placement, data) and exit."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # numpy's and vLLM's range
            raise ValueError(f"run.seed must be in [0, 2**32); got {self.seed}")


@dataclass
class LoggerConfig:
    backend: str = "console"
    """"console" (progress bar or a line per step, and metrics.jsonl), or the same also sent to "wandb",
    "tensorboard" (event files in run.dir/tensorboard) or "mlflow" (`logger.mlflow_tracking_uri`)."""
    project: str = "icepop"
    """wandb project name; MLflow experiment name."""
    mlflow_tracking_uri: str | None = None
    """MLflow's tracking store: a server ("http://host:5000") or a database URI; None: the local database
    run.dir/mlflow.db (`mlflow ui --backend-store-uri sqlite:///<run.dir>/mlflow.db` shows it)."""
    wandb_mode: str = "offline"
    """wandb mode: "offline" (sync later with `wandb sync`), "online" or "disabled"."""
    mismatch_alert: float = 0.05
    """Alert when the mean |k − 1| exceeds this (the IcePop paper saw GRPO fail beyond ≈5%)."""
    alert_window: int = 20
    """Steps over which a falling mask fraction with a rising mismatch KL raises an alert."""

    def __post_init__(self) -> None:
        one_of("logger.backend", self.backend, ("console", "wandb", "tensorboard", "mlflow"))
        one_of("logger.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        positive(**{"logger.mismatch_alert": self.mismatch_alert, "logger.alert_window": self.alert_window})


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
        positive(**{"train.steps": self.steps, "train.max_nonfinite_steps": self.max_nonfinite_steps})
        non_negative(**{"train.eval_every": self.eval_every})
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
    lr: float = 1e-5
    """Peak learning rate of the SFT stage (a real model's; the tiny models' presets use 1e-3)."""
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
        positive(**{f"sft.{name}": value for name, value in values.items()})
        non_negative(**{"sft.warmup_steps": self.warmup_steps, "sft.eval_size": self.eval_size,
                        "sft.eval_every": self.eval_every})  # fmt: skip


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
    lr: float = 5e-6
    """Peak learning rate of reward-model training (a real model's; the tiny models' presets use 1e-3)."""
    warmup_steps: int = 10
    """Linear warm-up of the reward-model learning rate."""
    eval_size: int = 256
    """Held-out pairs for the pairwise accuracy reported before and after training."""
    eval_every: int = 50
    """Report held-out pairwise accuracy every this many steps (0: before and after only)."""

    def __post_init__(self) -> None:
        values = {"steps": self.steps, "pairs": self.pairs, "batch_size": self.batch_size, "lr": self.lr,
                  "eval_size": self.eval_size}  # fmt: skip
        positive(**{f"rm.{name}": value for name, value in values.items()})
        non_negative(**{"rm.warmup_steps": self.warmup_steps, "rm.eval_every": self.eval_every})


@dataclass
class EvalConfig:
    samples_per_prompt: int = 4
    """k: samples per held-out problem for avg@k and pass@k (+recipe=eval)."""
    temperature: float = 1.0
    """Sampling temperature of the k samples (0: greedy, then k is 1)."""

    def __post_init__(self) -> None:
        positive(**{"eval.samples_per_prompt": self.samples_per_prompt})
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
            one_of("pipeline.stages[...]", stage, ("sft", "rm", "rlvr", "rlhf", "eval"))
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"pipeline.stages={self.stages} names a stage twice")
        if (
            "rlhf" in self.stages
            and "rm" in self.stages
            and self.stages.index("rm") > self.stages.index("rlhf")
        ):
            raise ValueError("pipeline.stages: rm must come before rlhf, which uses its reward model")


@dataclass
class CompareConfig:
    recipe: str = "rlvr"
    """The stage every arm runs (rlvr or rlhf), composed as if run alone with its recipe."""
    overrides: list[str] = field(default_factory=list)
    """Overrides every arm gets after its recipe and the command's own, e.g. [rollout.mismatch_noise=0.3]."""
    arms: dict[str, list[str]] = field(default_factory=dict)
    """Arm name → its own overrides, applied last, e.g. {none: [algo.correction=none]}."""

    def __post_init__(self) -> None:
        one_of("compare.recipe", self.recipe, ("rlvr", "rlhf"))
        for name in self.arms:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(
                    f"compare.arms: the name {name!r} is a folder name: use letters, digits, - and _"
                )
